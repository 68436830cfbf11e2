"""Progress of slow work, reported to the client that asked for it.

A management command's worker thread sets a sink (``reporting``); deep inside, an image
transfer or load calls ``report(stage, done, total)`` without knowing who listens. Events
are rate-limited (one per stage every 0.25 s, and always the last of a stage) and carry
the board the work is for (``on_board``). Nothing is reported where no sink is set.
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

INTERVAL = 0.25
LOG_STEP = 0.10

log = logging.getLogger(__name__)

_local = threading.local()


@contextmanager
def reporting(sink: Callable[[dict], None]) -> Iterator[None]:
    """Send this thread's progress events to ``sink`` while the block runs."""
    previous = getattr(_local, "sink", None)
    _local.sink, _local.last = sink, {}
    try:
        yield
    finally:
        _local.sink = previous


@contextmanager
def on_board(board: str) -> Iterator[None]:
    previous = getattr(_local, "board", "")
    _local.board = board
    try:
        yield
    finally:
        _local.board = previous


def report(stage: str, done: int = 0, total: int = 0) -> None:
    """One step of ``stage``: ``done`` of ``total`` (bytes, or 0 of 0 for a step without a size)."""
    sink = getattr(_local, "sink", None)
    if sink is None:
        return
    now = time.monotonic()
    last = _local.last.get(stage, 0.0)
    if total and done < total and now - last < INTERVAL:
        return
    _local.last[stage] = now
    sink({"stage": stage, "done": done, "total": total, "board": getattr(_local, "board", "")})


class CountingReader:
    """A file object that reports how much of it has been read (an image tar going to an
    engine), to the sink and, every 10 %, to the manager's log."""

    def __init__(self, fh, size: int, stage: str, where: str = "") -> None:
        self.fh, self.size, self.stage, self.where, self.read_bytes = fh, size, stage, where, 0
        self.next_log = LOG_STEP

    def read(self, n: int = -1) -> bytes:
        chunk = self.fh.read(n)
        self.read_bytes += len(chunk)
        report(self.stage, self.read_bytes, self.size)
        share = self.read_bytes / self.size if self.size else 1.0
        if share >= self.next_log and share < 1.0:
            log.info("%s%s %3.0f%% (%.0f of %.0f MB)", self.where, self.stage, 100 * share, self.read_bytes / 1e6, self.size / 1e6)
            while self.next_log <= share:
                self.next_log += LOG_STEP
        return chunk

    def __len__(self) -> int:
        return self.size
