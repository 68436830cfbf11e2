"""Boards: where containers run. A board is its configuration plus one runtime per
implementation type; the transport ("local" now, "ssh" for remote boards) decides which
runtimes it can offer. Boards on one Docker engine share one ``Engine``.
"""
from __future__ import annotations

import logging

from infinibrain.errors import make_error

from .config import BoardConfig, ManagerConfig
from .runtimes.docker_runtime import DockerRuntime
from .runtimes.engine import Engine, engine_url
from .runtimes.external import ExternalRuntime
from .runtimes.process import LoopRuntime, ProcessRuntime

log = logging.getLogger(__name__)


class Board:
    def __init__(self, config: BoardConfig, manager: ManagerConfig, engine: Engine | None) -> None:
        self.config = config
        self.name = config.name
        self.engine = engine
        stop_timeout = manager.container_stop_timeout_ms / 1000
        self.runtimes = {}
        if config.transport == "local":
            self.runtimes = {
                "process": ProcessRuntime(stop_timeout),
                "Loop": LoopRuntime(stop_timeout),
                "other": ExternalRuntime(stop_timeout),
            }
        if engine is not None:
            self.runtimes["docker"] = DockerRuntime("docker", engine, stop_timeout)
            self.runtimes["nvidia"] = DockerRuntime("nvidia", engine, stop_timeout)

    @property
    def ip(self) -> str:
        return self.config.address

    def runtime(self, implementation_type: str):
        """The runtime for ``implementation_type`` on this board (500 for an SSH board here)."""
        if self.config.transport == "ssh":
            raise make_error(500, detail=f"board {self.name!r}: the ssh transport is not available in this build")
        return self.runtimes[implementation_type]


def make_boards(config: ManagerConfig) -> dict[str, Board]:
    engines: dict[str, Engine] = {}
    boards = {}
    for b in config.boards:
        engine = None
        if b.transport == "local":
            url = engine_url(b.docker_host)
            if url not in engines:
                engines[url] = Engine(url, str(config.port), config.engine_timeout_ms / 1000)
            engine = engines[url]
        boards[b.name] = Board(b, config, engine)
    return boards


def close_boards(boards: dict[str, Board]) -> None:
    for engine in {id(b.engine): b.engine for b in boards.values() if b.engine is not None}.values():
        engine.close()
