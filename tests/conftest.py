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
from pathlib import Path

import pytest

from infinibrain import AICluster
from infinibrain.errors import InfinibrainException

SCRIPTS = Path(__file__).parent / "scripts"


def free_base_port(count: int = 5) -> int:
    """A base port with ``count`` consecutive free ports on 127.0.0.1."""
    for _ in range(200):
        base = random.randint(20000, 60000)
        socks = []
        try:
            for offset in range(count):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", base + offset))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


class ManagerProcess:
    """A real ``infinibrain-manager`` in a subprocess, with its own config and state."""

    def __init__(self, tmp: Path, boards: tuple[str, ...] = ("local", "b2"), **manager: object) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.port = free_base_port()
        self.state_dir = tmp / "state"
        self.config_path = tmp / "manager.toml"
        self.log_path = tmp / "manager.log"
        settings = {"port": self.port, "state_dir": str(self.state_dir), "log_level": "DEBUG", **manager}
        lines = ["[manager]"] + [f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v!r}" for k, v in settings.items()]
        for b in boards:
            lines += ["[[coprocessor]]", f'name = "{b}"']
        self.config_path.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ManagerProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "infinibrain.manager", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
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


def kill_leftovers(state_dir: Path) -> None:
    """Stop container processes a killed manager left behind (their pids are in the registry)."""
    import json

    for f in (state_dir / "inferences").glob("*.json"):
        try:
            data = json.loads(f.read_text())
        except ValueError:
            continue
        for placement in data.get("boards", {}).values():
            pid = placement.get("pid")
            if pid:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    m = ManagerProcess(tmp_path_factory.mktemp("manager")).start()
    yield m
    m.stop()
    kill_leftovers(m.state_dir)


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
        kill_leftovers(m.state_dir)


@pytest.fixture
def cluster(manager):
    c = manager.client()
    yield c
    c.release()


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


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")
