"""The send-wait queue of one inference: requests in the order they are to be sent.

Higher priority first; equal priorities in the order they were accepted. A waiting
request's priority grows by one for every ``aging`` seconds it waits (0: never), which
bounds starvation: a request is never overtaken by one of priority ``p`` higher that was
accepted more than ``p * aging`` seconds after it. Since every waiting request ages at the
same rate, their order never changes while they wait: the rank
``priority - accepted / aging`` orders them once and for all, so the queue is a heap.

Pure (no sockets, no clock of its own): the router thread owns each queue.
"""
from __future__ import annotations

import heapq
import math
from typing import Callable, Iterator

from .state import Request


class WaitQueue:
    __slots__ = ("aging", "_heap", "_next_deadline")

    def __init__(self, aging: float) -> None:
        self.aging = aging  # seconds of waiting worth one level of priority (0: strict)
        self._heap: list[tuple[float, int, Request]] = []
        self._next_deadline = math.inf  # the earliest send deadline, or earlier (a lower bound)

    def __len__(self) -> int:
        return len(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)

    def __iter__(self) -> Iterator[Request]:
        """The waiting requests in the order they would be sent."""
        return (entry[2] for entry in sorted(self._heap))

    def unordered(self) -> Iterator[Request]:
        """The waiting requests in no particular order (for scans that look at each)."""
        return (entry[2] for entry in self._heap)

    def _key(self, req: Request) -> float:
        if not self.aging:
            return -req.priority
        return req.accepted / self.aging - req.priority

    def push(self, req: Request) -> None:
        """Queue ``req`` (a new one, or one sent again: it keeps its place by when it was accepted)."""
        heapq.heappush(self._heap, (self._key(req), req.mkey, req))
        if req.send_deadline < self._next_deadline:
            self._next_deadline = req.send_deadline

    def head(self) -> Request | None:
        return self._heap[0][2] if self._heap else None

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[2]

    def take(self, sub: str, count: int) -> list[Request]:
        """A batch: the head, and after it up to ``count`` in all of the next requests in
        order, while they are for the same module ``sub``."""
        heap = self._heap
        batch = [heapq.heappop(heap)[2]]
        while heap and len(batch) < count and heap[0][2].sub == sub:
            batch.append(heapq.heappop(heap)[2])
        return batch

    def remove(self, chosen: Callable[[Request], bool]) -> list[Request]:
        """Take out the requests ``chosen`` selects, in queue order (the caller ends them)."""
        out: list[tuple[float, int, Request]] = []
        kept: list[tuple[float, int, Request]] = []
        for e in self._heap:
            (out if chosen(e[2]) else kept).append(e)
        if out:
            heapq.heapify(kept)
            self._heap = kept
            out.sort()
        return [e[2] for e in out]

    def expired(self, now: float) -> list[Request]:
        """Take out the requests whose send deadline has passed (usually none: looked at
        only once the earliest deadline is due)."""
        if now < self._next_deadline:
            return []
        gone = self.remove(lambda r: r.send_deadline <= now)
        self._next_deadline = min((e[2].send_deadline for e in self._heap), default=math.inf)
        return gone
