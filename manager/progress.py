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
def reporting(sink: Callable[[dict], None] | None) -> Iterator[None]:
    """Send this thread's progress events to ``sink`` while the block runs (None: nowhere)."""
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


class Transfer:
    """The bytes of one transfer or image load: reported to the sink (rate-limited) and
    logged every 10 % with its rate, whatever moves them (SFTP, an engine reading a tar)."""

    def __init__(self, where: str, stage: str, size: int) -> None:
        self.where, self.stage, self.size = where, stage, size
        self.next_log = LOG_STEP
        self.started = time.monotonic()

    def __call__(self, done: int) -> None:
        report(self.stage, done, self.size)
        share = done / self.size if self.size else 1.0
        if share >= self.next_log and share < 1.0:
            rate = done / 1e6 / max(time.monotonic() - self.started, 1e-6)
            log.info("%s: %s %3.0f%% (%.0f of %.0f MB, %.0f MB/s)", self.where, self.stage, 100 * share,
                     done / 1e6, self.size / 1e6, rate)
            while self.next_log <= share:
                self.next_log += LOG_STEP


class CountingReader:
    """A file object that counts what is read from it into a Transfer (an image tar that
    an engine reads)."""

    def __init__(self, fh, transfer: Transfer) -> None:
        self.fh, self.transfer, self.read_bytes = fh, transfer, 0

    def read(self, n: int = -1) -> bytes:
        chunk = self.fh.read(n)
        self.read_bytes += len(chunk)
        self.transfer(self.read_bytes)
        return chunk

    def __len__(self) -> int:
        return self.transfer.size
