"""CURVE on every manager socket, and the hardening rules: who may connect, what a plain
socket gets, where secrets may (not) appear, and paths that may not escape a container."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from conftest import connected, echo_config, manager_stats, send_until
from infinibrain import AICluster, InvalidArgumentException, SocketConnectionException, security
from infinibrain.errors import InfinibrainException


class CurveSetup:
    """Keys for a CURVE manager: its own pair, an allowed client, and a stranger."""

    def __init__(self, folder: Path, extra: tuple[str, ...] = ()) -> None:
        self.dir = folder
        out = subprocess.run([sys.executable, "-m", "infinibrain.manager.keygen", str(folder / "keys"), "manager", "client1", "stranger",
                              *extra], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "secret" in out.stdout and security.load_pair(folder / "keys" / "client1.key_secret")[1].decode() not in out.stdout
        self.allowed = folder / "allowed"
        self.allowed.mkdir()
        (self.allowed / "client1.key").write_text((folder / "keys" / "client1.key").read_text())
        self.server_key = str(folder / "keys" / "manager.key")

    def secret(self, name: str) -> str:
        return security.load_pair(self.dir / "keys" / f"{name}.key_secret")[1].decode()

    def env(self, name: str | None) -> dict[str, str]:
        if name is None:
            return {}
        return {security.ENV_SERVER_KEY: self.server_key, security.ENV_CLIENT_KEY: str(self.dir / "keys" / f"{name}.key_secret")}

    def manager_settings(self) -> dict:
        return {"curve": True, "curve_secret_key": str(self.dir / "keys" / "manager.key_secret"),
                "curve_client_keys": str(self.allowed)}


@pytest.fixture
def curve(tmp_path, monkeypatch):
    setup = CurveSetup(tmp_path / "curve")
    for key, value in setup.env("client1").items():
        monkeypatch.setenv(key, value)
    return setup


def as_client(monkeypatch, setup: CurveSetup, who: str | None) -> None:
    for key in (security.ENV_SERVER_KEY, security.ENV_CLIENT_KEY):
        monkeypatch.delenv(key, raising=False)
    for key, value in setup.env(who).items():
        monkeypatch.setenv(key, value)


def test_curve_end_to_end_and_secrets_stay_out_of_logs_files_and_status(curve, fresh_manager, name):
    m = fresh_manager(**curve.manager_settings()).start()
    with connected(m) as c:
        c.load_inference(echo_config(name), "all")
        result, response = c.infer(name, b"curve")
        assert result["shape"] == [5]
        # The container was handed its keys in its environment, and talks CURVE with them.
        assert result["env"][security.ENV_SERVER_KEY] == security.load_public(curve.server_key).decode()
        container_secret = result["env"][security.ENV_SECRET_KEY]
        status = [s.__dict__ for s in c.get_container_status(name)] + [h.__dict__ for h in c.get_container_handler(name)]
        work = Path(result["cwd"])
        env_file = (work / "connection.env").read_text()
        manager_log = m.log()
        secrets = [container_secret, curve.secret("manager"), curve.secret("client1")]
        for secret in secrets:
            assert secret not in repr(status) and secret not in env_file and secret not in manager_log
        assert "INFINIBRAIN_CURVE_SERVER_KEY" in env_file  # the file is there, without the secret
        # One key per container: each speaks as itself alone; kept owner-only while it exists.
        by_board = {r["board"]: r for r in (c.infer(name, b"x")[0] for _ in range(8))}
        assert len({r["env"][security.ENV_PUBLIC_KEY] for r in by_board.values()}) == len(by_board) == 2
        instance_keys = m.state_dir / "keys" / "instances"
        owned = sorted(instance_keys.glob("*.key_secret"))
        assert len(owned) == 2 and all(stat.S_IMODE(os.stat(f).st_mode) == 0o600 for f in owned)
        c.unload_inference(name)
    keys = m.state_dir / "keys"
    assert stat.S_IMODE(os.stat(m.state_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(keys).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(instance_keys).st_mode) == 0o700
    assert not list(instance_keys.glob("*")), "a container's key is revoked (deleted) with it"
    assert stat.S_IMODE(os.stat(curve.dir / "keys" / "client1.key_secret").st_mode) == 0o600


def test_unknown_key_and_plain_client_fail_fast_with_110(curve, fresh_manager, monkeypatch):
    m = fresh_manager(**curve.manager_settings()).start()
    as_client(monkeypatch, curve, "stranger")
    started = time.monotonic()
    with pytest.raises(SocketConnectionException) as err:
        AICluster(port=m.port, timeout=10)
    assert err.value.code == 110 and "refused" in str(err.value) and "curve_client_keys" in str(err.value)
    assert time.monotonic() - started < 5  # refused at once, not after the 10 s timeout
    as_client(monkeypatch, curve, None)
    security.access_file(m.port).unlink()  # a client with no keys at all (not this user's local application)
    started = time.monotonic()
    with pytest.raises(SocketConnectionException) as err:
        AICluster(port=m.port, timeout=10)
    assert err.value.code == 110 and "CURVE" in str(err.value)
    assert time.monotonic() - started < 5
    # A key added to the allowed folder is taken without a restart.
    (curve.allowed / "stranger.key").write_text((curve.dir / "keys" / "stranger.key").read_text())
    as_client(monkeypatch, curve, "stranger")
    c = AICluster(port=m.port, timeout=10)
    assert manager_stats(c)["refused_keys"]["clients"] >= 1
    c.release()
    assert "unknown CURVE public key" in m.log()


def test_plain_sockets_get_nothing_from_a_curve_manager(curve, fresh_manager, name):
    m = fresh_manager(**curve.manager_settings()).start()
    ctx = zmq.Context()
    try:
        spies = []
        for offset, topic in ((2, b""), (3, b"")):  # results and heartbeats; requests to containers
            s = ctx.socket(zmq.SUB)
            s.linger = 0
            s.subscribe(topic)
            s.connect(f"tcp://127.0.0.1:{m.port + offset}")
            spies.append(s)
        with connected(m) as c:
            c.load_inference(echo_config(name), "local")
            for _ in range(20):
                c.infer(name, b"secret data")  # heartbeats and traffic flow meanwhile
            time.sleep(1.5)  # time, not a wait: heartbeats (every 0.5 s) would have reached a plain socket by then
            for s in spies:
                assert s.poll(200) == 0, "a plain socket received something from a CURVE manager"
            c.unload_inference(name)
    finally:
        ctx.destroy(linger=0)


def test_curve_on_ssh_and_docker_boards(curve, ssh_boards, docker_kit, tmp_path, name):
    """Containers on a remote board and on a Docker engine get their keys too; on the remote
    board the secret goes through an owner-only file that is gone once the container runs."""
    from test_docker import echo as docker_echo

    m = ssh_boards.manager(tmp_path / "m", **curve.manager_settings()).start()
    try:
        with connected(m) as c:
            c.load_inference(echo_config(name + "p"), "b1")
            result = c.infer(name + "p", b"x")[0]
            assert result["board"] == "b1" and result["env"][security.ENV_SECRET_KEY]
            assert ".ib-secrets" not in result["cwd_files"]
            assert result["env"][security.ENV_SECRET_KEY] not in m.log()
            c.load_inference(docker_echo(name + "d"), "b2")
            result = c.infer(name + "d", b"x")[0]
            assert result["board"] == "b2" and result["env"][security.ENV_PUBLIC_KEY]
            c.unload_inference(name + "p")
            c.unload_inference(name + "d", delete_image=False)  # the runtime image is shared by other tests
    finally:
        m.stop()
        m.cleanup()


def test_curve_config_is_checked(tmp_path):
    from infinibrain.manager.config import ConfigError, parse_config

    # Without a folder of other clients' keys, only the manager's own local application key passes.
    assert parse_config({"manager": {"curve": True, "state_dir": str(tmp_path)}, "coprocessor": [{"name": "a"}]}).curve
    with pytest.raises(ConfigError, match="is not a folder"):
        parse_config({"manager": {"curve": True, "state_dir": str(tmp_path), "curve_client_keys": str(tmp_path / "no")},
                      "coprocessor": [{"name": "a"}]})


def test_bad_client_key_file_is_110_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv(security.ENV_SERVER_KEY, "x" * 40)
    monkeypatch.setenv(security.ENV_CLIENT_KEY, str(tmp_path / "missing.key_secret"))
    with pytest.raises(SocketConnectionException) as err:
        AICluster(port=5999, timeout=1)
    assert "missing.key_secret" in str(err.value)


# ---- hardening --------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["../outside", "/../../etc", "a/../../b"])
def test_put_file_and_copy_cannot_escape_the_container(cluster, name, tmp_path, target):
    source = tmp_path / "payload.txt"
    source.write_text("x")
    cluster.load_inference(echo_config(name), "local")
    with pytest.raises(InfinibrainException) as err:
        cluster.put_file(name, {"file": str(source), "To": target})
    assert err.value.code == 302 and "outside the container" in str(err.value)
    cluster.unload_inference(name)
    with pytest.raises(InfinibrainException) as err:
        cluster.load_inference(echo_config(name, copy={"From": str(source), "To": target}), "local")
    assert err.value.code == 302 and "outside the container" in str(err.value)


def test_symlink_inside_the_container_cannot_lead_out(cluster, name, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    source = tmp_path / "payload.txt"
    source.write_text("x")
    cluster.load_inference(echo_config(name), "local")
    # The container's own program may make links in its folder; put_file must not follow them out.
    work = Path(cluster.infer(name, b"x")[0]["cwd"])
    (work / "door").symlink_to(outside)
    with pytest.raises(InfinibrainException) as err:
        cluster.put_file(name, {"file": str(source), "To": "door"})
    assert err.value.code == 302 and "outside the container" in str(err.value)
    assert not (outside / "payload.txt").exists()
    cluster.put_file(name, {"file": str(source), "To": "inside/"})  # an ordinary folder is fine
    assert (work / "inside" / "payload.txt").read_text() == "x"
    cluster.unload_inference(name)


def test_run_command_never_reaches_a_shell(cluster, name, tmp_path):
    marker = tmp_path / "pwned"
    # Positive control: the command runs, and what a shell would take for a separator and a
    # second command reaches the program as arguments.
    cluster.load_inference(echo_config(name, run_command=f"python argv.py ; touch {marker}"), "local")
    work = Path(cluster.infer(name, b"x")[0]["cwd"])
    assert json.loads((work / "argv.json").read_text()) == [";", "touch", str(marker)]
    assert not marker.exists()
    cluster.unload_inference(name)
    # Without the spaces the program's name is "echo.py;", which does not exist: the load fails, nothing else runs.
    with pytest.raises(InfinibrainException) as err:
        cluster.load_inference(echo_config(name, run_command=f"python echo.py; touch {marker}"), "local")
    assert err.value.code == 302 and not marker.exists()


def test_oversized_request_is_100_before_it_is_sent(fresh_manager, name):
    import numpy as np

    m = fresh_manager(max_message_size=1_000_000).start()
    with connected(m) as c:
        c.load_inference(echo_config(name), "local")
        with pytest.raises(InvalidArgumentException) as err:
            c.infer_image(name, np.zeros((1000, 1000, 3), np.uint8))
        assert err.value.code == 100 and "image_data" in str(err.value) and "max_message_size" in str(err.value)
        # A raw peer that sends too big a frame is cut off by ZeroMQ; the manager goes on.
        ctx = zmq.Context()
        try:
            raw = ctx.socket(zmq.PUB)
            raw.linger = 0
            cut_off = raw.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            raw.connect(f"tcp://127.0.0.1:{m.port}")
            # Sent until it has reached the manager, which cuts the peer off (what a PUB sends
            # before it is connected and has the manager's subscription is dropped).
            send_until(lambda: raw.send_multipart([b"m", b"\x00" * 2_000_000]), lambda: cut_off.poll(100))
        finally:
            ctx.destroy(linger=0)
        assert c.infer_image(name, np.zeros((100, 100, 3), np.uint8))["shape"] == [100, 100, 3]
        # A result over the limit is a numbered error to the caller, not a lost answer.
        with pytest.raises(InfinibrainException) as err:
            c.infer(name, b"x", {"big": 1_500_000})
        assert err.value.code == 999 and "max_message_size" in str(err.value)
        assert c.infer(name, b"x", {"big": 1000})[0]["big"] == 1000
        c.unload_inference(name)
