"""The manager's one event loop: sockets, timers, and the door into its thread.

Every socket's messages, every timer and every call from another thread run here, on the
router thread (``run``), one at a time; that is why the routing state needs no lock.
Worker threads hand work in through ``call`` / ``call_soon`` (a queue and a wake-up pipe
in the poll set): the only door into this thread. ``call_later`` and ``every`` are for
the router thread itself.

The loop never dies: an exception in a reader, a timer or a call is logged with its
traceback, counted by where it happened (``errors``, the metrics'
``infinibrain_loop_errors_total``) and the loop goes on. A message a reader refuses with
``ProtocolError`` (or any other exception) is handed to that reader's ``dropped``.
"""
from __future__ import annotations

import concurrent.futures
import heapq
import itertools
import logging
import math
import os
import queue
import time
from collections import Counter
from typing import Any, Callable

import zmq

from infinibrain import protocol as P

log = logging.getLogger("infinibrain.manager.router")

BATCH = 256  # messages taken from one socket per pass, so no socket starves the others
TICK = 0.05  # seconds between timer passes

Reader = Callable[[list], None]
Dropped = Callable[[zmq.Socket, Exception], None]


class Loop:
    def __init__(self, tick: float = TICK, fence: Callable[[], bool] | None = None) -> None:
        """``fence``: asked every time the loop wakes, before anything is handled; when it
        says False the loop ends (a manager group's leader that lost the lead)."""
        self.tick = tick
        self.fence = fence
        self.fenced = False
        self.errors: Counter[str] = Counter()
        self._poller = zmq.Poller()
        self._readers: dict[zmq.Socket, tuple[Reader, Dropped]] = {}
        self._timers: list[Callable[[float], None]] = []
        self._later: list[tuple[float, int, Callable, tuple]] = []
        self._later_seq = itertools.count()
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller.register(self._wake_r, zmq.POLLIN)
        self._stop = False
        self._closed = False  # the wake-up pipe is closed: its numbers may be someone else's now
        self._next_tick = 0.0

    # ---- what runs here (router thread; before ``run`` or from the loop itself) ----------

    def reader(self, sock: zmq.Socket, handle: Reader, dropped: Dropped) -> None:
        """``handle(frames)`` for each message on ``sock``; ``dropped(sock, exc)`` for one it refuses."""
        self._readers[sock] = (handle, dropped)
        self._poller.register(sock, zmq.POLLIN)

    def every(self, timer: Callable[[float], None], interval: float = 0.0) -> None:
        """``timer(now)`` at every timer pass (each ``tick``), in the order they were added;
        with ``interval``, at the first pass and then at the first pass ``interval``
        seconds or more after the last call."""
        self._timers.append(throttled(timer, interval))

    def call_later(self, delay: float, fn: Callable, *args: Any) -> None:
        """Run ``fn(*args)`` after ``delay`` seconds (router thread only)."""
        heapq.heappush(self._later, (time.monotonic() + delay, next(self._later_seq), fn, args))

    # ---- the door (any thread) --------------------------------------------------------------

    def call_soon(self, fn: Callable, *args: Any) -> None:
        """Run ``fn(*args)`` on the router thread."""
        self._calls.put((fn, args, None))
        self._wake()

    def call(self, fn: Callable, *args: Any, timeout: float = 30.0) -> Any:
        """Run ``fn(*args)`` on the router thread and return its result (from a worker)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((fn, args, fut))
        self._wake()
        return fut.result(timeout)

    def stop(self) -> None:
        self._stop = True
        self._wake()

    def close(self) -> None:
        self._closed = True
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _wake(self) -> None:
        if self._closed:  # the loop has ended: nothing to wake, and no file to write into
            return
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full, so the loop is awake anyway

    # ---- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        while not self._stop:
            try:
                due = min(self._next_tick, self._later[0][0]) if self._later else self._next_tick
                timeout = max(0.0, due - time.monotonic())
                events = self._poller.poll(math.ceil(timeout * 1000))
                if self.fence is not None and not self.fence():
                    log.warning("router: this manager no longer leads its group: the loop ends, nothing more is routed")
                    self.fenced = True
                    return
                for sock, _ in events:
                    if sock == self._wake_r:
                        self._run_calls()
                    else:
                        self._drain(sock, *self._readers[sock])
                now = time.monotonic()
                if now >= self._next_tick:
                    self._timers_pass(now)
                elif self._later and self._later[0][0] <= now:  # between ticks: a held batch's delay
                    self._run_later(now)
            except zmq.ContextTerminated:
                return
            except Exception:  # never reached by the guarded parts below; the last line of defence
                self.failed("loop")
                time.sleep(0.01)  # a fault that repeats must not spin a core

    def failed(self, where: str) -> None:
        """An exception where the loop must go on: logged with its traceback, counted."""
        self.errors[where.split()[0]] += 1
        log.exception("router: %s failed; the router goes on", where)

    def _drain(self, sock: zmq.Socket, handle: Reader, dropped: Dropped) -> None:
        for frames in P.received(sock, BATCH, polled=True):
            try:
                handle(frames)
            except P.ProtocolError as exc:
                dropped(sock, exc)
            except Exception as exc:  # one bad message must never stop the loop
                dropped(sock, exc)
                log.debug("handler failure", exc_info=True)

    def _timers_pass(self, now: float) -> None:
        self._next_tick = now + self.tick
        # Each part on its own: one that fails must not keep the others from running.
        for part in (self._run_later, *self._timers):
            try:
                part(now)
            except Exception:
                self.failed(f"timer {getattr(part, '__name__', part)}")

    def _run_later(self, now: float) -> None:
        while self._later and self._later[0][0] <= now:
            _, _, fn, args = heapq.heappop(self._later)
            try:
                fn(*args)
            except Exception:
                self.failed(f"timed {getattr(fn, '__name__', fn)}")

    def _run_calls(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                fn, args, fut = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                result = fn(*args)
            except BaseException as exc:  # handed back to the worker, or logged and counted
                if fut is None:
                    self.failed("call " + getattr(fn, "__name__", type(fn).__name__))
                else:
                    fut.set_exception(exc)
            else:
                if fut is not None:
                    fut.set_result(result)


class _Throttled:
    """A timer called at most once per ``interval`` seconds of the ``now`` it is given."""

    __slots__ = ("timer", "interval", "due", "__name__")

    def __init__(self, timer: Callable[[float], None], interval: float) -> None:
        self.timer, self.interval, self.due = timer, interval, 0.0
        self.__name__ = getattr(timer, "__name__", repr(timer))

    def __call__(self, now: float) -> None:
        if now >= self.due:
            self.due = now + self.interval
            self.timer(now)


def throttled(timer: Callable[[float], None], interval: float) -> Callable[[float], None]:
    """``timer``, called at most once per ``interval`` seconds (0: at every call)."""
    return _Throttled(timer, interval) if interval > 0 else timer
