"""The manager's own figures: what the metrics' gauges show and the ``stats`` command answers
(and the ``boards`` command: board telemetry, energy, a manager group's status).

Router thread (a scrape reaches it through ``Loop.call``).
"""
from __future__ import annotations

import os
from typing import Callable

from .auth import Guard
from .config import ManagerConfig
from .dispatch import Dispatcher
from .loop import Loop
from .payloads import Payloads
from .energy import Energy
from .state import Client
from .telemetry import Telemetry
from .wire import Wire


class Figures:
    def __init__(self, config: ManagerConfig, loop: Loop, wire: Wire, dispatcher: Dispatcher, payloads: Payloads,
                 guard: Guard, clients: dict[str, Client], telemetry: Telemetry, energy: Energy,
                 group: Callable[[], dict] | None = None) -> None:
        """``group()``: a manager group's status (group.py), None for a single manager."""
        self.config = config
        self.group = group
        self.loop = loop
        self.wire = wire
        self.dispatcher = dispatcher
        self.payloads = payloads
        self.guard = guard
        self.clients = clients
        self.telemetry = telemetry
        self.energy = energy

    def boards(self) -> dict:
        """Each board's telemetry, and the energy per request of each inference where its
        board reports power (the ``boards`` command, the metrics, ``status``)."""
        return {
            **({"group": self.group()} if self.group is not None else {}),
            "boards": self.telemetry.readings(),
            "energy": [{"inference": inference, "board": board, "joules_per_request": round(j, 6),
                        "joules": round(self.energy.joules[(inference, board)], 3),
                        "requests": self.energy.counted[(inference, board)]}
                       for (inference, board), j in sorted(self.energy.per_request().items())],
        }

    def live(self) -> dict:
        """What the metrics' gauges show (manager/metrics.py)."""
        return {**self.boards(), **self._request_path()}

    def _request_path(self) -> dict:
        """The gauges of the request path (what ``stats`` reads too: no board telemetry)."""
        return {
            "queues": {n: len(svc.queue) for n, svc in self.dispatcher.services.items()},
            "containers": [
                {"id": c.id, "suffix": c.suffix, "inference": c.inference, "board": c.board, "in_flight": len(c.in_flight),
                 "connected": c.connected, "state": c.state.value, "revision": c.revision, "tx_bytes": c.tx_bytes,
                 "rx_bytes": c.rx_bytes}
                for c in self.dispatcher.containers.values()
            ],
            "dropped_by_port": dict(self.wire.dropped_by_port),
            "refused_keys": self.guard.denied(),
            "clients": len(self.clients),
            "loop_errors": dict(self.loop.errors),
        }

    def stats(self) -> dict:
        """What the manager has dropped and holds (the ``stats`` command): the metrics'
        figures, the non-zero ones only, plus its memory."""
        live = self._request_path()
        return {
            "instance": self.wire.instance,
            "dropped_frames": self.wire.dropped_frames,
            "dropped_by_port": live["dropped_by_port"],
            "refused_keys": live["refused_keys"],
            "clients": live["clients"],
            "queued": {n: depth for n, depth in live["queues"].items() if depth},
            "in_flight": {c["id"]: c["in_flight"] for c in live["containers"] if c["in_flight"]},
            "retried": self.dispatcher.retried,
            "batches": {"messages": self.dispatcher.batches[0], "requests": self.dispatcher.batches[1]},
            "loop_errors": live["loop_errors"],
            "max_message_size": self.config.max_message_size,
            "shared_memory": {"passed": self.payloads.passed, "read": self.payloads.read},
            "dropped_sends": dict(self.wire.dropped_sends),
            "rss_bytes": rss_bytes(),
        }


def rss_bytes() -> int:
    """This process's resident memory (Linux), 0 where /proc is not there."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
