"""Real etcd members (Debian's etcd-server) and manager groups on loopback, for the tests
and benchmarks of manager groups (manager/group.py). Each etcd member is a process of
ours, ended by its pid; each manager of a group its own host (127.0.0.1, 127.0.0.2, ...)
on one base port."""
from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

from conftest import ManagerProcess, free_base_port, remove_containers, wait_for

ETCD = shutil.which("etcd")


class EtcdCluster:
    """``size`` etcd members on 127.0.0.1, each with its own data folder; with ``tls``
    (files "ca", "cert", "key": Certificates.make), clients must speak TLS and show a
    certificate the CA signed."""

    def __init__(self, folder: Path, size: int = 1, tls: dict[str, Path] | None = None) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.scheme = "https" if tls else "http"
        base = free_base_port()
        self.names = [f"e{i}" for i in range(size)]
        self.client_ports = {n: base + i for i, n in enumerate(self.names)}
        self.peer_ports = {n: base + size + i for i, n in enumerate(self.names)}
        self.procs: dict[str, subprocess.Popen] = {}
        self.token = f"ib-{base}"

    @property
    def urls(self) -> str:
        return ",".join(f"{self.scheme}://127.0.0.1:{self.client_ports[n]}" for n in self.names)

    def start(self, *names: str) -> "EtcdCluster":
        cluster = ",".join(f"{n}=http://127.0.0.1:{self.peer_ports[n]}" for n in self.names)
        for n in names or self.names:
            log = open(self.folder / f"{n}.log", "ab")
            self.procs[n] = subprocess.Popen(
                [ETCD, "--name", n, "--data-dir", str(self.folder / n), "--logger", "zap", "--log-outputs", "stderr",
                 "--listen-client-urls", f"{self.scheme}://127.0.0.1:{self.client_ports[n]}",
                 "--advertise-client-urls", f"{self.scheme}://127.0.0.1:{self.client_ports[n]}",
                 *(["--cert-file", str(self.tls["cert"]), "--key-file", str(self.tls["key"]), "--client-cert-auth",
                    "--trusted-ca-file", str(self.tls["ca"])] if self.tls else []),
                 "--listen-peer-urls", f"http://127.0.0.1:{self.peer_ports[n]}",
                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_ports[n]}",
                 "--initial-cluster", cluster, "--initial-cluster-state", "new", "--initial-cluster-token", self.token,
                 "--listen-metrics-urls", ""],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            log.close()
        wait_for(self.healthy, timeout=30, interval=0.1)
        return self

    def healthy(self) -> bool:
        context = None
        if self.tls:
            context = ssl.create_default_context(cafile=str(self.tls["ca"]))
            context.load_cert_chain(str(self.tls["cert"]), str(self.tls["key"]))
        try:
            with urllib.request.urlopen(f"{self.scheme}://127.0.0.1:{self.client_ports[self.up()[0]]}/health", timeout=1,
                                        context=context) as r:
                return json.loads(r.read()).get("health") == "true"
        except (OSError, ValueError, IndexError):
            return False

    def etcdctl(self, *args: str) -> subprocess.CompletedProcess:
        tls = ["--cacert", str(self.tls["ca"]), "--cert", str(self.tls["cert"]), "--key", str(self.tls["key"])] if self.tls else []
        return subprocess.run(["etcdctl", f"--endpoints={self.urls}", *tls, *args], capture_output=True, text=True,
                              timeout=30, env={**os.environ, "ETCDCTL_API": "3"})

    def up(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is None]

    def kill(self, name: str) -> None:
        p = self.procs[name]
        p.send_signal(signal.SIGKILL)
        p.wait(10)

    def stop(self) -> None:
        for name in list(self.procs):
            if self.procs[name].poll() is None:
                self.kill(name)


class GroupMember(ManagerProcess):
    """A manager of a group: its own host, the group's port, state and etcd."""

    def __init__(self, tmp: Path, host: str, port: int, etcd: EtcdCluster, hosts: list[str], work: Path,
                 boards: tuple[str, ...] = ("local",), **manager: object) -> None:
        settings = {"metrics_port": -1, "telemetry_interval_ms": 0, **manager}
        if settings["metrics_port"] != -1:
            settings["metrics_host"] = host  # each member's metrics on its own address
        super().__init__(tmp, boards=boards, board_settings={b: {"work_dir": str(work / b)} for b in boards},
                         host=host, etcd=etcd.urls, group_hosts=",".join(hosts), **settings)
        self.host = host
        self.port = port  # every member on the group's port
        text = self.config_path.read_text().splitlines()
        self.config_path.write_text("\n".join(f"port = {port}" if line.startswith("port = ") else line for line in text) + "\n")

    def start(self) -> "GroupMember":
        self.spawn()  # a standby answers nobody: it is up once it says it stands by
        try:
            wait_for(lambda: "standing by" in self.log() or self.proc.poll() is not None, timeout=20)
        except AssertionError:
            raise AssertionError(f"group member {self.host} did not start: {self.log()[-2000:]}") from None
        assert self.proc.poll() is None, self.log()[-2000:]
        return self

    def leads(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and "leading the group" in self.log().rsplit(
            "standing by", 1)[-1]

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)


class Group:
    """``size`` managers of one group on 127.0.0.1, 127.0.0.2, ...; the first started leads."""

    def __init__(self, folder: Path, etcd: EtcdCluster, size: int = 2, **manager: object) -> None:
        self.port = free_base_port()
        self.hosts = [f"127.0.0.{i + 1}" for i in range(size)]
        self.work = folder / "work"
        self.members = [GroupMember(folder / f"m{i}", h, self.port, etcd, self.hosts, self.work, **manager)
                        for i, h in enumerate(self.hosts)]

    @property
    def host_ip(self) -> str:
        return ",".join(self.hosts)

    def start(self) -> "Group":
        self.members[0].start()
        wait_for(self.members[0].leads, timeout=20)
        for m in self.members[1:]:
            m.start()
        return self

    def leader(self) -> GroupMember | None:
        leading = [m for m in self.members if m.leads()]
        return leading[0] if len(leading) == 1 else None

    def stop(self) -> None:
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                try:
                    m.resume()
                except ProcessLookupError:
                    pass
        for m in self.members:
            m.stop()
        kill_in(self.work)
        remove_containers(self.port)  # group members leave their containers running


def kill_in(work: Path) -> None:
    """End the container processes whose working folder is under ``work`` (left running by
    group members, which never stop their containers)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if cwd.startswith(str(work) + "/"):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    time.sleep(0.1)


def certificates(folder: Path) -> dict[str, Path]:
    """A CA, and a certificate it signed for 127.0.0.1 (etcd's, and its clients'), made with openssl."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60, cwd=folder)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=infinibrain test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout", "ca.key", "-out", "ca.pem")
    # What strict verifiers (urllib3 2's VERIFY_X509_STRICT) want of a leaf certificate.
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"
                                    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                                    "authorityKeyIdentifier=keyid,issuer\nsubjectKeyIdentifier=hash\n")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "etcd.key", "-out", "etcd.csr")
    run("x509", "-req", "-in", "etcd.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", "ext.cnf", "-out", "etcd.pem")
    return {"ca": folder / "ca.pem", "cert": folder / "etcd.pem", "key": folder / "etcd.key"}
