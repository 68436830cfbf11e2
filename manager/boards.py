"""Boards: where containers run. A board is its configuration plus one runtime per
implementation type; the transport ("local" now, "ssh" for remote boards) decides which
runtimes it can offer.
"""
from __future__ import annotations

import logging

from infinibrain.errors import make_error

from .config import BoardConfig, ManagerConfig
from .runtimes.external import ExternalRuntime, UnavailableRuntime
from .runtimes.process import LoopRuntime, ProcessRuntime

log = logging.getLogger(__name__)


class Board:
    def __init__(self, config: BoardConfig, manager: ManagerConfig) -> None:
        self.config = config
        self.name = config.name
        stop_timeout = manager.container_stop_timeout_ms / 1000
        if config.transport == "local":
            engine = "this build has no Docker runtime yet; use implementation_type 'process'"
            self.runtimes = {
                "process": ProcessRuntime(stop_timeout),
                "Loop": LoopRuntime(stop_timeout),
                "other": ExternalRuntime(stop_timeout),
                "docker": UnavailableRuntime("docker", engine),
                "nvidia": UnavailableRuntime("nvidia", engine),
            }
        else:
            self.runtimes = {}

    @property
    def ip(self) -> str:
        return self.config.address

    def runtime(self, implementation_type: str):
        """The runtime for ``implementation_type`` on this board (500 for an SSH board here)."""
        if self.config.transport == "ssh":
            raise make_error(500, detail=f"board {self.name!r}: the ssh transport is not available in this build")
        return self.runtimes[implementation_type]


def make_boards(config: ManagerConfig) -> dict[str, Board]:
    return {b.name: Board(b, config) for b in config.boards}
