"""Fixtures: real manager processes on free loopback ports, and clients connected to them.

Every wait is bounded, every process started here is stopped here by its pid.
"""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from infinibrain import AICluster
from infinibrain.errors import InfinibrainException

SCRIPTS = Path(__file__).parent / "scripts"

# A state folder of the session's own for every manager and client started here (the
# default state folder holds the access files of CURVE managers): nothing lands in the
# user's home, and a developer's own managers cannot answer for a test's.
if "INFINIBRAIN_TEST_STATE_HOME" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["INFINIBRAIN_TEST_STATE_HOME"] = os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="ib-test-state-")
    atexit.register(shutil.rmtree, os.environ["XDG_STATE_HOME"], True)


def free_base_port(count: int = 6) -> int:
    """A base port with ``count`` consecutive free ports on 127.0.0.1 (the manager's five
    and its metrics port)."""
    # Below the kernel's ephemeral range, so that no outgoing connection of this machine
    # (which takes its local port from that range) can hold one of them meanwhile.
    low = 10000
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            ephemeral_low = int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    high = max(low + 1000, ephemeral_low - 1) - count
    for _ in range(200):
        base = random.randint(low, high)
        socks = []
        try:
            for offset in range(count):
                s = socket.socket()
                s.bind(("127.0.0.1", base + offset))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def _toml(value: object) -> str:
    import json

    return json.dumps(value)  # strings, integers and booleans are written alike in JSON and TOML


class ManagerProcess:
    """A real ``infinibrain-manager`` in a subprocess, with its own config and state."""

    def __init__(self, tmp: Path, boards: tuple[str, ...] = ("local", "b2"), board_settings: dict | None = None, **manager: object) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.port = free_base_port()
        self.state_dir = tmp / "state"
        self.config_path = tmp / "manager.toml"
        self.log_path = tmp / "manager.log"
        settings = {"port": self.port, "state_dir": str(self.state_dir), "log_level": "DEBUG", **manager}
        lines = ["[manager]"] + [f"{k} = {_toml(v)}" for k, v in settings.items()]
        for b in boards:
            lines += ["[[coprocessor]]", f'name = "{b}"']
            lines += [f"{k} = {_toml(v)}" for k, v in (board_settings or {}).get(b, {}).items()]
        self.config_path.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def spawn(self) -> None:
        """The manager's process, started (its log in ``log_path``)."""
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "infinibrain.manager", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()

    def start(self) -> "ManagerProcess":
        self.spawn()
        assert self.proc is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"manager exited: {self.log_path.read_text()[-2000:]}")
            try:
                AICluster(port=self.port, timeout=0.5).release()
                return self
            except InfinibrainException:
                time.sleep(0.1)
        raise RuntimeError("manager did not come up")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kw) -> AICluster:
        return AICluster(port=self.port, **kw)

    def cleanup(self) -> None:
        """Remove what a stopped or killed manager left: container processes, Docker containers."""
        kill_leftovers(self.state_dir)
        remove_containers(self.port)


def kill_leftovers(state_dir: Path) -> None:
    """Stop container processes a killed manager left behind (their pids are in the registry)."""
    import json

    for f in (state_dir / "inferences").glob("*.json"):
        try:
            data = json.loads(f.read_text())
        except ValueError:
            continue
        for placement in data.get("boards", {}).values():
            for instance in placement.get("instances") or [placement]:
                pid = instance.get("pid")
                if pid:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass


@contextmanager
def running_manager(tmp: Path, **kw) -> Iterator[ManagerProcess]:
    """A started manager, stopped and cleaned up after."""
    m = ManagerProcess(tmp, **kw).start()
    try:
        yield m
    finally:
        m.stop()
        m.cleanup()


@contextmanager
def connected(m: ManagerProcess) -> Iterator[AICluster]:
    """A client of ``m``, released after."""
    c = m.client()
    try:
        yield c
    finally:
        c.release()


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    with running_manager(tmp_path_factory.mktemp("manager")) as m:
        yield m


@pytest.fixture
def fresh_manager(tmp_path):
    """A manager of the test's own, for tests that stop, kill or restart it."""
    made: list[ManagerProcess] = []

    def make(**kw) -> ManagerProcess:
        m = ManagerProcess(tmp_path / f"m{len(made)}", **kw)
        made.append(m)
        return m

    yield make
    for m in made:
        m.stop()
        m.cleanup()


@pytest.fixture
def cluster(manager):
    with connected(manager) as c:
        yield c


@pytest.fixture
def name():
    """A fresh inference name per test, so tests sharing a manager never collide."""
    return "t" + uuid.uuid4().hex[:8]


def echo_config(name: str, **kw):
    from infinibrain import ContainerConfig, InferenceModulesConfig

    base = dict(
        name=name,
        implementation_type="process",
        input="Main",
        output="Main",
        script_path=str(SCRIPTS),
        inference_modules=InferenceModulesConfig(sub_inference_name="echo", script="echo.py"),
    )
    base.update(kw)
    return ContainerConfig(**base)


def relay_config(name: str, **kw):
    """A process inference running tests/scripts/relay.py, which calls other inferences."""
    from infinibrain import ContainerConfig

    return ContainerConfig(**{**dict(name=name, implementation_type="process", input="Main", output="Main",
                                     script_path=str(SCRIPTS), run_command="python relay.py"), **kw})


@pytest.fixture
def jetson_path(monkeypatch):
    """This machine as a Jetson (a device that cannot be had here): a ``tegrastats`` on PATH
    printing a real Orin line of NVIDIA's documentation (tests/jetson, tests/data)."""
    monkeypatch.setenv("PATH", f"{Path(__file__).parent / 'jetson'}:{os.environ['PATH']}")


def mem_total() -> int:
    """This machine's MemTotal in bytes, as /proc says."""
    return int(Path("/proc/meminfo").read_text().split()[1]) * 1024


def manager_stats(cluster: AICluster) -> dict:
    """The manager's own figures (the ``stats`` command): dropped frames, queues, memory."""
    return cluster.stats()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def in_manager(cluster: AICluster, name: str) -> int:
    """How many of inference ``name``'s requests the manager holds: sent to its containers
    and not yet answered, or waiting in its queue."""
    rows = cluster.get_container_status(name)
    return sum(s.send_data_num for s in rows) + (rows[0].queue_num if rows else 0)  # one queue per inference


# ---- raw ZeroMQ peers ---------------------------------------------------------------------
# What a raw socket sends before its connection is up is lost without a trace: a PUB drops
# messages for a peer whose subscription has not reached it yet, an XSUB those sent before
# its connection was attached. Tests wait for the connection instead of sleeping.


def connect_raw(sock, endpoint: str, timeout: float = 10.0) -> None:
    """Connect ``sock`` to ``endpoint`` and wait until the ZMTP handshake has succeeded (a
    socket monitor event) and the socket has taken the connection in: what an XSUB sends
    next goes out. A PUB also needs the manager's subscription, which nothing on the PUB
    shows: repeat a probe with ``send_until`` until the manager shows it got one."""
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        sock.connect(endpoint)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not monitor.poll(left * 1000):
                raise AssertionError(f"no handshake with {endpoint} within {timeout} s")
            if recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                break
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
    sock.get(zmq.EVENTS)  # makes the socket process its pending commands: the new connection is attached


def send_until(send, seen, timeout: float = 10.0, interval: float = 0.05) -> int:
    """Call ``send()`` until ``seen()`` is true (checked after each send); returns how many
    times it sent."""
    sent = 0

    def attempt():
        nonlocal sent
        send()
        sent += 1
        return seen()

    wait_for(attempt, timeout, interval)
    return sent


# ---- Docker -------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
REQUIRE_DOCKER = os.environ.get("INFINIBRAIN_REQUIRE_DOCKER") == "1"  # set by .ci/run: no skips


def _docker_client():
    import docker

    client = docker.from_env(version="auto", timeout=300)
    client.ping()
    return client


def _unavailable(reason: str):
    if REQUIRE_DOCKER:
        pytest.fail(f"Docker is required here (INFINIBRAIN_REQUIRE_DOCKER=1): {reason}")
    pytest.skip(reason)


class DockerKit:
    """A Docker engine with infinibrain's images, and a ``docker save`` tar of the example
    image under a tag of this test session's own (so loading it from the tar is real)."""

    def __init__(self, client, folder: Path) -> None:
        self.client = client
        self.tag = f"ib-test/classifier:{uuid.uuid4().hex[:8]}"
        image = client.images.get("infinibrain/example-classifier:latest")
        image.tag(*self.tag.split(":"))
        self.tar = folder / "classifier.tar"
        with open(self.tar, "wb") as fh:
            for chunk in client.images.get(self.tag).save(named=True):
                fh.write(chunk)
        client.images.remove(self.tag)  # the first load must come from the tar

    def has_image(self, tag: str) -> bool:
        return _has_image(self.client, tag)

    def containers(self, manager: "ManagerProcess") -> list:
        return self.client.containers.list(all=True, filters={"label": f"infinibrain.manager={manager.port}"})


@pytest.fixture(scope="session")
def docker_kit(tmp_path_factory):
    """The Docker engine and infinibrain's images, which ``make test`` starts and builds
    before pytest runs (scripts/prereqs.sh); skipped with the reason where they are missing
    (failed under INFINIBRAIN_REQUIRE_DOCKER=1, as in CI)."""
    try:
        client = _docker_client()
    except Exception as exc:
        _unavailable(f"no Docker engine answers ({exc}); `make test` starts one (scripts/prereqs.sh)")
    missing = [t for t in ("infinibrain/runtime:latest", "infinibrain/example-classifier:latest")
               if not _has_image(client, t)]
    if missing:
        _unavailable(f"images {', '.join(missing)} are missing; `make test` builds them first (or `make images`)")
    kit = DockerKit(client, tmp_path_factory.mktemp("images"))
    yield kit
    if kit.has_image(kit.tag):
        client.images.remove(kit.tag)
    client.close()


def _has_image(client, tag: str) -> bool:
    import docker

    try:
        client.images.get(tag)
        return True
    except docker.errors.ImageNotFound:
        return False


def image_with_layer(client, base_tag: str, new_tag: str, folder: Path, mb: int, seed: int = 7) -> Path:
    """``new_tag``: ``base_tag`` plus one layer of ``mb`` MB of random bytes (a new model),
    written as a docker save tar into ``folder``."""
    import io
    import tarfile

    import numpy as np

    files = {"Dockerfile": f"FROM {base_tag}\nCOPY layer.bin /opt/layer-{seed}.bin\n".encode(),
             "layer.bin": np.random.default_rng(seed).bytes(mb * 1_000_000)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as ctx:
        for filename, data in files.items():
            info = tarfile.TarInfo(filename)
            info.size = len(data)
            ctx.addfile(info, io.BytesIO(data))
    buf.seek(0)
    client.images.build(fileobj=buf, custom_context=True, tag=new_tag, rm=True, network_mode="none")
    tar = folder / (new_tag.split("/")[-1].replace(":", "_") + ".tar")
    with open(tar, "wb") as fh:
        for chunk in client.images.get(new_tag).save(named=True):
            fh.write(chunk)
    return tar


def remove_containers(port: int) -> None:
    """Remove the Docker containers of the manager on ``port`` (if there is an engine)."""
    try:
        client = _docker_client()
    except Exception:
        return
    for c in client.containers.list(all=True, filters={"label": f"infinibrain.manager={port}"}):
        c.remove(force=True)
    client.close()


# ---- SSH boards ---------------------------------------------------------------------------


class SSHBoards:
    """Emulated SSH boards (scripts/boards.py): real sshd processes on 127.0.0.2, 127.0.0.3."""

    def __init__(self, folder: Path, count: int) -> None:
        self.dir = folder
        self.count = count

    def _script(self, *args: str) -> dict | None:
        import json

        out = subprocess.run([sys.executable, str(ROOT / "scripts" / "boards.py"), *args, "--dir", str(self.dir)],
                             capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"scripts/boards.py {' '.join(args)} failed: {out.stderr.strip() or out.stdout.strip()}")
        return json.loads(out.stdout) if "--json" in args else None

    def start(self, board: str | None = None) -> dict:
        return self._script("start", "--count", str(self.count), "--json", *(["--board", board] if board else []))

    def stop(self, board: str | None = None) -> None:
        self._script("stop", *(["--board", board] if board else []))

    def settings(self, name: str, **overrides: object) -> dict:
        """The [[coprocessor]] settings of board ``name`` (b1, b2, ...)."""
        import getpass

        index = int(name[1:])
        return {
            "transport": "ssh", "address": f"127.0.0.{index + 1}", "ssh_port": 2222, "ssh_user": getpass.getuser(),
            "ssh_key": str(self.dir / "id_ed25519"), "known_hosts": str(self.dir / "known_hosts"),
            "manager_address": "127.0.0.1", "python": sys.executable, "work_dir": str(self.dir / name / "work"),
            "ssh_connect_timeout_ms": 3000, "ssh_command_timeout_ms": 20000,
            "image_transfer": "sftp",  # the whole-tar path; tests of the registry path say "registry"
            **overrides,
        }

    def manager(self, tmp: Path, boards: tuple[str, ...] = ("b1", "b2"), overrides: dict | None = None, **kw) -> ManagerProcess:
        settings = {b: self.settings(b, **(overrides or {}).get(b, {})) for b in boards}
        return ManagerProcess(tmp, boards=boards, board_settings=settings, **kw)

    def host_key(self, name: str) -> str:
        """Board ``name``'s host key line ("ssh-ed25519 AAAA...")."""
        return " ".join((self.dir / name / "ssh_host_ed25519_key.pub").read_text().split()[:2])


@pytest.fixture(scope="session")
def ssh_boards(tmp_path_factory):
    """Two emulated SSH boards for the whole session; skipped (failed under
    INFINIBRAIN_REQUIRE_DOCKER=1, as in CI) when no sshd can be installed or started."""
    boards = SSHBoards(tmp_path_factory.mktemp("boards"), 2)
    try:
        boards.start()
    except Exception as exc:
        boards.stop()
        _unavailable(f"emulated SSH boards cannot be started: {exc}")
    yield boards
    boards.stop()
