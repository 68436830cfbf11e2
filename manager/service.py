"""One inference as the router serves it: its queue, its containers, and the choice between them.

As the ZeroMQ guide's Majordomo broker has a service per name, the router has a
``Service`` per registered inference: its policy (settings with defaults filled in), its
send-wait queue (priority order, waitqueue.py), its instances, and the rules that pick
the container a request goes to:

- only a container that is ready, connected, subscribed to the request's module and
  distributing takes requests, and only while it has credit (``max_send_num`` requests in
  flight; batches in flight for a container that takes batches);
- among those, the least loaded; equals take turns;
- the last-replica rule: when no container of the inference is healthy but some are
  unhealthy only for being late (health.py), requests go to the least late of those
  rather than nowhere (Envoy's panic threshold); its late requests count against its credit;
- a batch (``max_batch_size``) is the head of the queue and the requests after it in
  order, for one module; a short one is held back up to ``max_queue_delay`` for more,
  unless its head's priority is above 0 (an urgent request does not wait for company).

``retry_after`` turns the measured rate at which the queue drains into the time a refused
caller should wait. Pure: the router thread owns each service; nothing here sends.
"""
from __future__ import annotations

import itertools
from collections import deque

from .registry import Registration
from .settings import InferencePolicy, InferenceSettings
from .state import Instance, State
from .waitqueue import WaitQueue

RATE_SPAN = 5  # seconds over which the drain rate is measured


class DrainRate:
    """Requests sent to containers per second, over the last RATE_SPAN seconds, from the
    service's count of requests sent (``Service.sent``) sampled about once a second (a
    timer's work, not the request path's)."""

    __slots__ = ("_samples",)

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque(maxlen=RATE_SPAN + 1)  # (when, requests sent by then)

    def sample(self, sent: int, now: float) -> None:
        if not self._samples or now - self._samples[-1][0] >= 1.0:
            self._samples.append((now, sent))

    def rate(self, sent: int, now: float) -> float:
        start = next(((t, n) for t, n in self._samples if now - t <= RATE_SPAN + 1), None)
        if start is None or now - start[0] < 0.05:
            return 0.0
        return (sent - start[1]) / (now - start[0])


class Service:
    """One registered inference as the router routes it (router thread)."""

    def __init__(self, reg: Registration, policy: InferencePolicy, aging: float) -> None:
        self.queue = WaitQueue(aging)
        self.instances: dict[str, Instance] = {}
        self.sent = 0  # requests sent to containers so far
        self.drain = DrainRate()
        self.batch_timer = 0.0  # when a pump is due for a batch held back (0: none)
        self._turns = itertools.count()
        self.update(reg, policy)

    def update(self, reg: Registration, policy: InferencePolicy) -> None:
        """New settings (a change of the registration); the queue and instances stay."""
        self.reg = reg
        self.policy = policy
        settings: InferenceSettings = reg.config
        self.name = reg.name
        self.takes_input = settings.takes_input
        self.replies = settings.replies
        self.modules = settings.module_names
        self.default_sub = settings.default_sub

    def distributing(self, c: Instance) -> bool:
        placement = self.reg.boards.get(c.board)
        return placement is not None and placement.distribution == "on"

    def batch_size(self, c: Instance, sub: str) -> int:
        """Requests per message to ``c`` for module ``sub``: 1 unless both the inference
        and the instance's Connector batch."""
        return min(self.policy.max_batch_size, c.batch.get(sub, 1))

    def _load(self, c: Instance, sub: str) -> int:
        if self.policy.batching and self.batch_size(c, sub) > 1:
            return len({r.batch for r in c.in_flight.values()})
        return len(c.in_flight)

    def pick(self, sub: str) -> Instance | None:
        """The container the next request for module ``sub`` goes to; None when none may
        take it now. Looks at this inference's instances only."""
        limit = self.policy.max_send_num
        best: list[Instance] = []
        least = limit
        healthy = False
        late: list[Instance] = []
        for c in self.instances.values():
            if not c.hello or sub not in c.subs or not self.distributing(c):
                continue
            if c.state is not State.READY:
                if c.state is State.UNHEALTHY and c.unfit == "late":
                    late.append(c)
                continue
            healthy = True
            load = self._load(c, sub)
            if load >= limit or load > least:
                continue
            if load < least:
                best, least = [c], load
            else:
                best.append(c)
        if best:
            return best[next(self._turns) % len(best)] if len(best) > 1 else best[0]
        if healthy or not late:
            return None
        # The last-replica rule: the least late one that still has credit.
        spare = [(len(c.late), load, c) for c in late if (load := self._load(c, sub) + len(c.late)) < limit]
        return min(spare, key=lambda t: (t[0], t[1]))[2] if spare else None

    def hold_until(self, size: int, now: float) -> float:
        """When a short batch (fewer than ``size`` waiting) should be sent at the latest;
        0 to send it now."""
        head = self.queue.head()
        if not self.policy.batch_delay or head is None or len(self.queue) >= size or head.priority > 0:
            return 0.0
        due = head.accepted + self.policy.batch_delay
        return due if due > now else 0.0

    def full(self) -> bool:
        return len(self.queue) >= self.policy.max_queue_size

    def retry_after(self, now: float) -> float:
        """Seconds a caller refused with 305 should wait: the time the queue takes to drain
        at the rate it drained over the last few seconds; ``send_timeout`` when nothing
        drained (by then every request waiting now has been sent or has ended)."""
        rate = self.drain.rate(self.sent, now)
        if rate <= 0:
            return round(self.policy.send_timeout, 3)
        return round(min(max(len(self.queue) / rate, 0.001), self.policy.send_timeout), 3)
