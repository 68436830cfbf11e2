"""The callback thread: where applications' callbacks run, one at a time, in order.

A callback that raises is logged; the thread goes on (as pyzmq's ZMQStream does).
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable


class CallbackThread:
    def __init__(self, name: str, logger: logging.Logger | logging.LoggerAdapter) -> None:
        self.logger = logger
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def deliver(self, fn: Callable, *args: Any) -> None:
        """Run ``fn(*args)`` on the callback thread (from any thread)."""
        self._queue.put((fn, args))

    def close(self) -> None:
        """Run what was delivered, then end (waits, unless called from a callback)."""
        self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except Exception:  # an application's callback must not stop the SDK
                self.logger.exception("callback %s raised", getattr(fn, "__name__", fn))
