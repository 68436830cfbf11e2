"""The request path's timers: acknowledgements, deadlines, and the drain rate's samples.

At every timer pass: a request not answered within ACK_DELAY is acknowledged to its client,
once, with its deadline; one that waited past its ``send_timeout`` ends with 306 (402 if
it was waiting to be sent again after its container went away); one whose container has
not answered by its deadline ends with 401, and that container is late (health.py).

Router thread (its passes run in the ``Loop``).
"""
from __future__ import annotations

from infinibrain import protocol as P

from .dispatch import Dispatcher
from .health import Health
from .loop import Loop
from .state import Request
from .wire import Wire

# A request answered sooner needs no acknowledgement: its result says it was accepted. One
# that takes longer is acknowledged (with its deadline) by the next timer pass after this.
ACK_DELAY = 0.1


class Deadlines:
    def __init__(self, loop: Loop, wire: Wire, health: Health, dispatcher: Dispatcher) -> None:
        self.wire = wire
        self.health = health
        self.dispatcher = dispatcher
        self.services = dispatcher.services
        self.containers = dispatcher.containers
        for timer in (self._ack_slow, self._expire_waiting, self._expire_in_flight, self._sample_drains):
            loop.every(timer)

    def _ack_slow(self, now: float) -> None:
        """Acknowledge, once and with its deadline, each accepted request not answered within
        ACK_DELAY. Looks at the requests still waiting or in flight only (usually a few,
        however many are answered each second; at most the queues' bound): most never
        need it."""
        cutoff = now - ACK_DELAY
        for svc in self.services.values():
            if svc.queue:
                for req in svc.queue.unordered():
                    if req.accepted <= cutoff:
                        self._ack(req)
        for c in self.containers.values():
            if c.in_flight:  # most of many containers have nothing in flight
                for req in c.in_flight.values():
                    if req.accepted <= cutoff:
                        self._ack(req)

    def _ack(self, req: Request) -> None:
        if not req.acked and req.client:
            req.acked = True
            left = req.deadline - req.accepted
            self.wire.to_client(req.client, P.ACK, {"rid": req.rid, "timeout": left if left != float("inf") else None})

    def _sample_drains(self, now: float) -> None:
        for svc in self.services.values():
            svc.drain.sample(svc.sent, now)

    def _expire_waiting(self, now: float) -> None:
        for name, svc in self.services.items():
            for req in svc.queue.expired(now):
                if req.lost:
                    self.dispatcher.end(req, 402, detail=f"{req.lost}; no other container took it in time")
                else:
                    self.dispatcher.end(req, 306, detail=f"no container of {name!r} took it in time")

    def _expire_in_flight(self, now: float) -> None:
        for c in list(self.containers.values()):
            if not c.in_flight:
                continue
            late = [r for r in c.in_flight.values() if r.answer_deadline <= now]
            for req in late:
                del c.in_flight[req.mkey]
                self.dispatcher.end(req, 401, detail=f"container {c.suffix} did not answer in {req.answer_timeout:g} s")
                if req.client:
                    self.health.overdue(c, req)
            if late:
                self.dispatcher.pump(c.inference)
