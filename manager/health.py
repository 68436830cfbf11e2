"""Health: whether a running container may be sent requests. The one place that decides it.

A READY container becomes UNHEALTHY, and gets no requests, when it is

- **late**: it held a request past the request's deadline (the request ended with 401);
- **silent**: its Connector, which beats while idle, has said nothing for
  ``liveness_timeout_ms`` while it had nothing to do;
- **gone**: its connection closed (its last subscription went), while its process may run.

It is READY again

- late: as soon as it has answered every request it held past its deadline, or beats
  while idle (it then holds nothing): a late answer is itself proof that it lives;
- silent: at its next beat (or any message, from a Connector too old to beat);
- gone: when it connects again.

Late and hung are told apart by time: a container that stays unhealthy for
``liveness_timeout_ms`` (a late one that neither answered nor beat meanwhile: hung) is
restarted when its restart policy allows (``hung``, which the reconciler asks); a process
that exited is gone for good (``exited``). Lateness alone never leaves an inference with
nowhere to send requests: a late container is the last resort when no container of the
inference is healthy (service.py, the last-replica rule).

health.py observes and decides; the reconciler acts (restarts, asks boards, fails) and is
told through the ``Nudge``. Router thread, all of it.
"""
from __future__ import annotations

import logging

from .state import RUNNING_STATES, Clock, Instance, Nudge, Request, State

log = logging.getLogger("infinibrain.manager.health")

PROBE_INTERVAL = 5.0  # a disconnected container's board is asked this often whether it still runs

LATE, SILENT, GONE = "late", "silent", "gone"


class Health:
    def __init__(self, liveness: float, nudge: Nudge, clock: Clock) -> None:
        self.liveness = liveness  # seconds (liveness_timeout_ms)
        self.nudge = nudge
        self.clock = clock

    def _unfit(self, c: Instance, unfit: str, why: str) -> None:
        if c.state is State.READY:
            c.enter(State.UNHEALTHY, why, self.clock())
        elif c.state is State.UNHEALTHY:
            c.why = why
        else:
            return
        c.unfit = unfit
        self.nudge.set()

    def _fit(self, c: Instance, unfit: tuple[str, ...]) -> bool:
        """READY again if it was unhealthy for one of ``unfit``; whether it is routable now."""
        if c.state is not State.UNHEALTHY or c.unfit not in unfit:
            return False
        log.warning("container %s shows life again (%s before): it serves", c.id, c.unfit)
        c.enter(State.READY, "", self.clock())
        self.nudge.set()
        return True

    # ---- what the wire shows (the router tells) ---------------------------------------------

    def overdue(self, c: Instance, req: Request) -> None:
        """``c`` held ``req`` past its deadline (it ended with 401)."""
        c.late.add(req.mkey)
        self._unfit(c, LATE, f"it held request {req.rid} past its {req.answer_timeout:g} s deadline")

    def answered(self, c: Instance, mkey: int) -> bool:
        """``c`` answered request ``mkey``, which it no longer holds (late, or a duplicate);
        whether it became routable again."""
        if mkey not in c.late:
            return False
        c.late.discard(mkey)
        return not c.late and self._fit(c, (LATE,))

    def heard(self, c: Instance, now: float, beat: bool) -> bool:
        """Any message from ``c`` (``beat``: an idle heartbeat); whether it became routable."""
        c.last_heard = now
        if beat:
            c.heartbeats = True
        elif c.heartbeats or c.state is not State.UNHEALTHY:
            return False
        # Idle (or too old to say so: any message counts): it holds nothing late any more.
        c.late.clear()
        return self._fit(c, (LATE, SILENT))

    def connected(self, c: Instance) -> bool:
        """``c``'s Connector has proven its paths (again); whether it became routable."""
        self.nudge.set()  # a starting container: the reconciler takes it from here
        return self._fit(c, (GONE,))

    def lost(self, c: Instance, why: str) -> None:
        """``c``'s connection closed: what it held has ended (402) or been sent elsewhere."""
        c.late.clear()
        self._unfit(c, GONE, f"its connection closed ({why})")

    # ---- what time shows (timer passes) ---------------------------------------------------------

    def check_silence(self, instances: list[Instance], now: float) -> None:
        """A Connector that beats while idle and has fallen silent with nothing to do."""
        for c in instances:
            if (c.state is State.READY and c.heartbeats and not c.in_flight and c.connected
                    and now - c.last_heard > self.liveness):
                self._unfit(c, SILENT, f"its Connector has been silent for {now - c.last_heard:.0f} s")

    def exited(self, instances: list[Instance], stepping: set[str]) -> list[tuple[Instance, int]]:
        """The running instances whose process has exited, with its status; not those a
        step is starting or stopping now (``stepping``: their ids), whose step says."""
        out = []
        for c in instances:
            if not c.running or c.state not in RUNNING_STATES or c.id in stepping:
                continue
            code = c.runtime.exited(c.spec)
            if code is not None:
                out.append((c, code))
        return out

    # ---- what the reconciler asks ------------------------------------------------------------------

    def hung(self, c: Instance, now: float) -> bool:
        """Unhealthy for the whole liveness timeout: restart it (if its policy allows)."""
        return c.state is State.UNHEALTHY and now - c.since >= self.liveness

    def probe_due(self, c: Instance, now: float, asked_since: float | None) -> bool:
        """Whether to ask the board if ``c``'s process still runs (it lost its connection but
        is believed to run): at once when a command started at ``asked_since`` waits on it,
        else now and then (a remote board's poll may be stale)."""
        if asked_since is not None and c.probed_at < asked_since:
            return True
        return now - c.lost_at >= PROBE_INTERVAL and now - c.probed_at >= PROBE_INTERVAL
