"""Boards: where containers run. A board is its configuration plus one runtime per
implementation type. A ``local`` board is this machine; an ``ssh`` board is a remote
machine reached through one ``SSHLink`` that its process runtimes (through an ``SSHHost``)
and its Docker engine (an ``SSHEngine``) share. Local boards on one Docker engine share one
``Engine``.

Made on the main thread at start-up; worker threads use the runtimes, the router thread a board's paths and environment.
"""
from __future__ import annotations

import logging
import posixpath
from pathlib import Path

import os
import sys

from infinibrain import protocol as P
from infinibrain import shm

from . import image_registry
from .config import BoardConfig, ManagerConfig
from .image_registry import ImageRegistry
from .runtimes.docker_runtime import DockerRuntime
from .runtimes.engine import Engine, engine_url
from .runtimes.external import ExternalRuntime
from .runtimes.hosts import LocalHost, SSHHost
from .runtimes.base import Runtime
from .runtimes.process import LoopRuntime, ProcessRuntime
from .runtimes.ssh_engine import SSHEngine
from .ssh import SSHLink

log = logging.getLogger(__name__)


class Board:
    def __init__(self, config: BoardConfig, manager: ManagerConfig, engine: Engine, link: SSHLink | None = None) -> None:
        self.config = config
        self.name = config.name
        self.engine = engine
        self.link = link
        self.containers_dir, self.logs_dir = board_dirs(config, manager)
        stop_timeout = manager.container_stop_timeout_ms / 1000
        self.host = SSHHost(link, config.python) if link is not None else LocalHost()
        self.runtimes: dict[str, Runtime] = {
            "process": ProcessRuntime(stop_timeout, self.host),
            "Loop": LoopRuntime(stop_timeout, self.host),
            "other": ExternalRuntime(stop_timeout, self.host),
            "docker": DockerRuntime("docker", engine, stop_timeout),
            "nvidia": DockerRuntime("nvidia", engine, stop_timeout),
        }

    @property
    def ip(self) -> str:
        return self.config.address

    @property
    def host_key(self) -> str:
        """Which machine its containers run on: boards with one key share its cores."""
        return f"ssh:{self.config.address}" if self.link is not None else "local"

    def runtime(self, implementation_type: str) -> Runtime:
        """The runtime for ``implementation_type`` (validated: every board offers every type)."""
        return self.runtimes[implementation_type]

    def paths(self, instance_id: str, suffix: str) -> tuple[Path, Path]:
        """(working directory, log file) of an instance on this board: each instance has its
        own folder; the instances of one placement share its log, so it reads on across restarts."""
        return self.containers_dir / instance_id, self.logs_dir / f"{suffix}.log"

    def environment(self, manager: ManagerConfig) -> dict[str, str]:
        """The environment every container of this board gets: where the manager is, and
        (for processes) the manager's Python first on PATH."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFINIBRAIN_")}
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "/usr/bin:/bin")
        env["PYTHONUNBUFFERED"] = "1"
        env.update(
            INFINIBRAIN_HOST=self.config.manager_address,
            INFINIBRAIN_PUB_PORT=str(manager.port + P.CONTAINER_IN),
            INFINIBRAIN_SUB_PORT=str(manager.port + P.CONTAINER_OUT),
            INFINIBRAIN_MAX_MESSAGE_SIZE=str(manager.max_message_size),
            INFINIBRAIN_HEARTBEAT_MS=str(manager.container_heartbeat_ms),
            # Read it and say what it holds: then requests' data may stay in shared memory.
            INFINIBRAIN_SHM_PROBE=shm.manager_probe_name(manager.port),
        )
        return env

    def close(self) -> None:
        self.host.close()
        if self.link is not None:
            self.link.close()


def board_dirs(config: BoardConfig, manager: ManagerConfig) -> tuple[Path, Path]:
    """(containers' working directories, their logs) on a board. Here: ``work_dir`` (else
    ``<state_dir>/containers``) and ``<state_dir>/logs``; on an ssh board, under ``work_dir``
    (else ``.infinibrain/<manager port>/<board name>`` in the SSH user's home)."""
    if config.transport == "ssh":
        root = ssh_root(config, manager)
        return root / "containers", root / "logs"
    state = Path(manager.state_dir)
    return (Path(config.work_dir) if config.work_dir else state / "containers"), state / "logs"


def ssh_root(config: BoardConfig, manager: ManagerConfig) -> Path:
    """What the manager keeps on an ssh board (containers, logs, images being loaded). The
    default has the board's name in it: two boards reached as one user on one host (or
    sharing an NFS home) must never share a folder."""
    return Path(config.work_dir or posixpath.join(".infinibrain", str(manager.port), config.name))


def make_boards(config: ManagerConfig) -> dict[str, Board]:
    """Every configured board. An ssh board's key is read here: a bad one is a ConfigError."""
    engines: dict[str, Engine] = {}
    boards = {}
    manager_id, timeout = str(config.port), config.engine_timeout_ms / 1000
    registry = ImageRegistry(config.state_dir, config.registry_port)
    missing = image_registry.available()
    for b in config.boards:
        if b.transport == "ssh":
            link = SSHLink(b)
            pulls = b.image_transfer == "registry" or (b.image_transfer == "auto" and not missing)
            if b.image_transfer == "auto" and missing:
                log.info("board %s gets whole image tars over SFTP: %s", b.name, missing)
            engine = SSHEngine(link, manager_id, timeout, str(ssh_root(b, config) / "images"), registry if pulls else None)
            boards[b.name] = Board(b, config, engine, link)
            continue
        url = engine_url(b.docker_host)
        if url not in engines:
            engines[url] = Engine(url, manager_id, timeout)
        boards[b.name] = Board(b, config, engines[url])
    return boards


def close_boards(boards: dict[str, Board]) -> None:
    for engine in {id(b.engine): b.engine for b in boards.values()}.values():
        engine.close()
        if isinstance(engine, SSHEngine) and engine.registry is not None:
            engine.registry.stop()
    for board in boards.values():
        board.close()
