"""Energy per inference: the joules a request of an inference costs on a board, where the
board reports its power (a Jetson's tegrastats rails: telemetry.py).

The estimate (docs/DECISIONS.md, "Telemetry"): every telemetry interval, a board's energy
over that interval (its input power × the interval) is shared among the inferences that
kept its containers busy then, by their share of the busy time (seconds from sending each
request to its answer, dispatch.py), counting only the busy part of the interval (energy
spent while no request was being served is nobody's); a request's cost is its inference's
joules divided by its answered requests. It includes what the board spends besides the
model (the container's own work, the idle floor while busy): the figure an operator pays.

Router thread (a Loop timer).
"""
from __future__ import annotations

import collections
from typing import Callable

from .dispatch import Dispatcher
from .loop import Loop


class Energy:
    def __init__(self, loop: Loop, dispatcher: Dispatcher, watts: Callable[[str], float | None], interval: float,
                 clock: Callable[[], float]) -> None:
        self.dispatcher = dispatcher
        self.watts = watts
        self.clock = clock
        self.joules: collections.defaultdict[tuple[str, str], float] = collections.defaultdict(float)  # (inference, board) -> J
        self.counted: collections.Counter[tuple[str, str]] = collections.Counter()  # requests those joules paid for
        self._last = clock()
        if interval > 0:
            loop.every(self._tick, interval)

    def _tick(self, now: float) -> None:
        window, self._last = now - self._last, now
        d = self.dispatcher  # what it counted since the last tick, taken: the counters start again
        busy, served = d.busy, d.served
        d.busy, d.served = collections.defaultdict(float), collections.Counter()
        by_board: dict[str, dict[tuple[str, str], float]] = collections.defaultdict(dict)
        for where, delta in busy.items():
            if delta > 0:
                by_board[where[1]][where] = delta
        for board, deltas in by_board.items():
            watts = self.watts(board)
            if watts is None or window <= 0:
                continue
            total = sum(deltas.values())
            scale = min(1.0, window / total)  # overlapping requests share the board's power
            for where, delta in deltas.items():
                self.joules[where] += watts * delta * scale
                self.counted[where] += served[where]

    def per_request(self) -> dict[tuple[str, str], float]:
        """Joules per answered request, by (inference, board), where the board told its power."""
        return {where: j / self.counted[where] for where, j in self.joules.items() if self.counted[where]}
