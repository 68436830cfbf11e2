"""A manager group on an etcd that wants what a real one does (issue 28): TLS with client
certificates, and etcd's own authentication. Real etcd (Debian's etcd-server), real
certificates made with openssl for this test."""
from __future__ import annotations

import shutil

import pytest

from conftest import echo_config, wait_for
from group_kit import ETCD, EtcdCluster, Group, certificates
from infinibrain import AICluster

pytest.importorskip("etcd3gw", reason="etcd's client is the group extra (part of the test extra)")
pytestmark = pytest.mark.skipif(ETCD is None or shutil.which("openssl") is None,
                                reason="etcd (Debian's etcd-server) or openssl is not installed")


def test_a_group_on_etcd_with_tls_and_client_certificates(tmp_path, name):
    (tmp_path / "certs").mkdir()
    tls = certificates(tmp_path / "certs")
    etcd = EtcdCluster(tmp_path / "etcd", tls=tls).start()
    g = Group(tmp_path / "group", etcd, 2, etcd_ca_file=str(tls["ca"]), etcd_cert_file=str(tls["cert"]),
              etcd_key_file=str(tls["key"]))
    try:
        g.start()
        with AICluster(g.host_ip, g.port) as c:
            c.load_inference(echo_config(name), "local")
            assert c.infer(name, b"tls")[0]["sum"] == sum(b"tls")
            assert name in etcd.etcdctl("get", "--prefix", "/infinibrain/inferences/", "--keys-only").stdout
            c.unload_inference(name)
    finally:
        g.stop()
        etcd.stop()


def test_a_group_on_etcd_with_authentication(tmp_path, name):
    etcd = EtcdCluster(tmp_path / "etcd").start()
    assert etcd.etcdctl("user", "add", "root", "--new-user-password=s3cret").returncode == 0
    assert etcd.etcdctl("auth", "enable").returncode == 0
    (tmp_path / "password").write_text("s3cret\n")
    (tmp_path / "wrong").write_text("guess\n")
    g = Group(tmp_path / "group", etcd, 2, etcd_user="root", etcd_password_file=str(tmp_path / "password"))
    stranger = Group(tmp_path / "stranger", etcd, 2, etcd_user="root", etcd_password_file=str(tmp_path / "wrong"))
    try:
        g.start()
        with AICluster(g.host_ip, g.port) as c:
            c.load_inference(echo_config(name), "local")
            assert c.infer(name, b"auth")[0]["sum"] == sum(b"auth")
            stranger.members[0].start()  # a manager with the wrong password never leads, and says why
            wait_for(lambda: "authentication failed" in stranger.members[0].log(), timeout=15)
            assert not stranger.members[0].leads()
            c.unload_inference(name)
    finally:
        stranger.stop()
        g.stop()
        etcd.stop()
