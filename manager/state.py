"""What the router keeps in memory: requests, containers, clients.

All of it is owned by the router thread; worker threads reach it only through
``Router.call`` / ``Router.call_soon``, so none of it needs a lock.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from .runtimes.base import ContainerSpec


@dataclass
class Request:
    """One inference request inside the manager, from acceptance to its answer."""

    mkey: int  # the manager's own number for it; containers answer with it
    client: str
    rid: str  # the client's request number
    pid: int
    tid: int
    inference: str
    sub: str  # module that must serve it
    param: Any
    arr: Any  # array description, or None for bytes
    payload: list
    time_stamp: list
    send_deadline: float
    answer_timeout: float
    answer_deadline: float = 0.0
    container: str | None = None
    accepted: float = 0.0  # time.monotonic() when the manager accepted it

    @property
    def queued_wall(self) -> float:
        """When the manager accepted it (wall clock), from its time stamps."""
        return next(t for stage, t in self.time_stamp if stage == "manager_receive")

    @property
    def nbytes(self) -> int:
        return sum(len(f) for f in self.payload)


@dataclass
class Container:
    """One inference on one board, as the router sees it."""

    id: str  # ContainerHandler.suffix_name
    inference: str
    board: str
    spec: ContainerSpec
    runtime: Any
    subs: set[str] = field(default_factory=set)  # subscriptions seen on the XPUB socket
    hello: bool = False  # its response path has been proven
    running: bool = False  # its process is believed to run
    stopping: bool = False  # an intentional stop is under way: no 114 for it
    in_flight: dict[int, Request] = field(default_factory=dict)
    tx_bytes: int = 0
    rx_bytes: int = 0
    last_ping: float = 0.0
    deployment: dict = field(default_factory=dict)  # what its last deployment took (image sent, seconds)
    connected_event: threading.Event = field(default_factory=threading.Event)

    @property
    def connected(self) -> bool:
        return self.hello and bool(self.subs)


@dataclass
class Client:
    id: str
    pid: int
    last_seen: float
