"""The control plane's steps: start, warm up, take out of service, stop, remove, ask a board.

Each slow step runs on a worker (manager/operations.py), one at a time per placement;
its outcome comes back to the router thread, which moves the instance on (``State``) and
pokes the reconciler for the next step. A step never waits on the router thread and the
router thread never waits on a step.

Router thread, but for what it hands to ``Operations``.
"""
from __future__ import annotations

import concurrent.futures
import functools
import logging
from typing import Callable

from infinibrain.errors import InfinibrainException, make_error

from . import operations as ops
from .auth import Guard
from .config import ManagerConfig
from .dispatch import Dispatcher
from .loop import Loop
from .metrics import NullMetrics
from .placement import Slot, Slots
from .registry import InstanceRecord, Registry
from .settings import resolve
from .state import Clock, Instance, Nudge, State
from .wire import Wire

log = logging.getLogger("infinibrain.manager.reconciler")


class Steps:
    def __init__(self, config: ManagerConfig, loop: Loop, wire: Wire, dispatcher: Dispatcher, registry: Registry,
                 slots: Slots, operations: ops.Operations, guard: Guard, nudge: Nudge, metrics: NullMetrics,
                 clock: Clock) -> None:
        self.config = config
        self.guard = guard
        self.clock = clock
        self.loop = loop
        self.wire = wire
        self.dispatcher = dispatcher
        self.registry = registry
        self.slots = slots
        self.ops = operations
        self.nudge = nudge
        self.metrics = metrics

    def set(self, inst: Instance, state: State, why: str = "") -> None:
        if inst.enter(state, why, self.clock()):
            self.nudge.set()

    def ready_timeout(self, inst: Instance) -> float:
        return resolve(inst.spec.config, self.config).ready_timeout

    # ---- the registry's record of what runs ---------------------------------------------------

    def record(self, inst: Instance) -> None:
        """Keep the instance in the registry (pid, start time), so a restarted manager finds it."""
        reg = self.registry.registrations.get(inst.inference)
        placement = reg.boards.get(inst.board) if reg is not None else None
        if placement is None:
            return
        records = [r for r in placement.instances if r.id != inst.id]
        if inst.id in self.slots.of(inst.inference, inst.board).instances:
            records.append(InstanceRecord(inst.id, inst.revision, inst.pid, inst.pid_start, inst.created))
        placement.instances = sorted(records, key=lambda r: r.revision)
        self.registry.persist(inst.inference)

    def forget(self, s: Slot, inst: Instance) -> None:
        """``inst`` is gone for good: out of the registry, and its key revoked."""
        s.instances.pop(inst.id, None)
        self.dispatcher.remove_instance(inst)
        self.guard.revoke(inst.id)
        self.record(inst)

    def progress(self, s: Slot, stage: str, done: int = 0, total: int = 0) -> None:
        if s.change is not None and s.change.sink is not None:
            s.change.sink({"stage": stage, "done": done, "total": total, "board": s.board})

    # ---- running a step -------------------------------------------------------------------------

    def run(self, s: Slot, inst: Instance, what: str, fn: Callable, *args: object,
            done: Callable[[concurrent.futures.Future], None]) -> None:
        """Run one slow step for ``inst`` of ``s`` on a worker; ``done(future)`` on the router thread."""
        s.busy, s.busy_with = f"{what} {inst.id}", inst.id
        sink = s.change.sink if s.change is not None else None
        fut = self.ops.submit(fn, *args, sink=sink, board=s.board)

        def finished(f: concurrent.futures.Future) -> None:
            s.busy = s.busy_with = ""
            self.nudge.set()
            error = f.exception()
            if error is not None and not isinstance(error, InfinibrainException):
                log.error("%s %s/%s failed", what, s.name, s.board, exc_info=error)
            done(f)

        fut.add_done_callback(lambda f: self.loop.call_soon(finished, f))

    def failed(self, s: Slot, what: str, error: BaseException | None, backoff: bool = True) -> InfinibrainException:
        exc = error if isinstance(error, InfinibrainException) else make_error(999, detail=f"{type(error).__name__}: {error}")
        s.error, s.error_at = exc, self.clock()
        if backoff:
            s.retry_at = self.clock() + s.retry.next_delay()
        log.warning("%s of %s on %s failed: %s", what, s.name, s.board, exc.text)
        return exc

    # ---- starting ---------------------------------------------------------------------------------

    def _starting(self, inst: Instance, why: str = "") -> None:
        self.set(inst, State.STARTING, why)
        inst.warmup_key = inst.warmed = None
        inst.deploy_started = inst.started_at = self.clock()

    def start(self, s: Slot, inst: Instance, fresh: bool) -> None:
        self._starting(inst)
        self.run(s, inst, "starting", ops.start, inst.spec, inst.runtime, fresh, done=functools.partial(self._started, s, inst))

    def restart(self, s: Slot, inst: Instance, why: str) -> None:
        """Stop an unhealthy instance and start it again (its restart policy allows it)."""
        self._starting(inst, "restarting")
        self.dispatcher.container_lost(inst, f"it is restarted ({why})", announce=False)
        self.run(s, inst, "restarting", ops.restart, inst.spec, inst.runtime, done=functools.partial(self._started, s, inst))

    def _started(self, s: Slot, inst: Instance, f: concurrent.futures.Future) -> None:
        if f.exception() is not None:
            exc = self.failed(s, "starting", f.exception(), backoff=False)
            inst.running = False
            self.set(inst, State.FAILED, exc.detail or exc.message)
            s.restarting = ""
            return
        s.retry.reset()
        started: ops.Started = f.result()
        info = started.info
        inst.running = True
        inst.pid, inst.pid_start, inst.created = info.pid, info.pid_start, info.created
        inst.deployment = {**started.figures, "board": s.board}
        inst.warmup = started.warmup
        inst.ready_deadline = self.clock() + self.ready_timeout(inst)
        if started.figures.get("image_bytes"):
            self.registry.bring(s.board, started.figures.get("image") or inst.spec.config.image_tag or "")
        self.record(inst)
        if inst.runtime.kind == "other":
            return self.ready(s, inst)  # someone else starts it: registered is all we can make it
        if serves(inst):
            self.begin_ready(s, inst)

    def begin_ready(self, s: Slot, inst: Instance) -> None:
        """A started instance serves its module: warm it up, or it is ready."""
        if inst.warmup is None:
            return self.ready(s, inst)
        payload, arr, param, sub = inst.warmup
        timeout = max(inst.ready_deadline - self.clock(), 1.0)
        inst.warmup_key = self.dispatcher.send_warmup(inst, payload, arr, param, sub or inst.spec.config.default_sub, timeout)
        self.progress(s, "warming up")

    def warmed(self, s: Slot, inst: Instance) -> None:
        """Its warm-up ended (``inst.warmed``): ready, or failed."""
        code, why = inst.warmed  # type: ignore[misc]
        inst.warmed = None
        if code == 0:
            self.ready(s, inst)
        else:
            self.fail(s, inst, f"failed its warm-up: [{code}] {why}")

    def ready(self, s: Slot, inst: Instance) -> None:
        self.set(inst, State.READY)
        inst.warmup_key = None
        if inst.deploy_started:
            inst.deployment["seconds"] = round(self.clock() - inst.deploy_started, 3)
            self.metrics.deployed(inst.inference, inst.board, inst.deployment["seconds"], "ready")
            if inst.deployment.get("image_bytes"):
                self.metrics.sent_to_board(inst.board, int(inst.deployment["image_bytes"]))
            inst.deploy_started = 0.0
        log.info("container %s is ready (revision %d)", inst.id, inst.revision)
        self.progress(s, "ready", 1, 1)
        if s.restarting:
            s.restart_at = 0.0
            self.tell_restart(0, f"container {inst.suffix} of {inst.inference} restarted (try {s.restarts.tries}): {s.restarting}",
                              inst, s.restarts.tries)
            s.restarting = ""
        s.ran_since = self.clock()
        self.dispatcher.pump(inst.inference)

    def fail(self, s: Slot, inst: Instance, why: str) -> None:
        """``inst`` failed while starting: stop it (it may run) and fail it with its log's tail."""
        inst.warmup_key = None
        if inst.deploy_started:
            self.metrics.deployed(inst.inference, inst.board, self.clock() - inst.deploy_started, "failed")
            inst.deploy_started = 0.0

        def done(f: concurrent.futures.Future) -> None:
            tail = f.result() if f.exception() is None else ""
            inst.running = False
            self.dispatcher.container_lost(inst, why, announce=False)
            text = f"container {inst.suffix} on board {inst.board!r} {why}"
            self.set(inst, State.FAILED, f"{text}; last log lines:\n{tail}" if tail.strip() else text)
            s.restarting = ""

        self.run(s, inst, "giving up on", ops.give_up, inst.spec, inst.runtime, done=done)

    def tell_restart(self, code: int, text: str, inst: Instance, tries: int) -> None:
        """A restart (0: ``text`` is the message) or giving up (302: ``text`` is the detail)."""
        info = {"inference_name": inst.inference, "suffix_name": inst.suffix, "coprocessor": inst.board, "tries": tries}
        if code == 0:
            self.wire.announce(0, info=info, what="restart", message=text)
        else:
            self.wire.announce(code, info=info, what="restart", detail=text)

    # ---- taking out of service ----------------------------------------------------------------------

    def retire_all(self, s: Slot, now: float, remove: bool) -> None:
        for inst in list(s.instances.values()):
            if inst.state in (State.STOPPED, State.FAILED) and not inst.running:
                reg = self.registry.registrations.get(s.name)
                if remove or (reg is not None and inst.revision != reg.revision):
                    self.run(s, inst, "removing", ops.stop, inst.spec, inst.runtime, True,
                             done=functools.partial(self._removed, s, inst))
                    return
                continue
            return self.retire(s, inst, now, remove)

    def retire(self, s: Slot, inst: Instance, now: float, remove: bool) -> None:
        """Take ``inst`` out of service: no new requests, its requests drain (bounded by
        their deadlines), then it stops (and, with ``remove``, is deleted)."""
        if inst.state is not State.STOPPING:
            inst.drain_deadline = max([r.answer_deadline for r in inst.in_flight.values()] + [now])
            self.set(inst, State.STOPPING, "retired")
        if inst.in_flight and now < inst.drain_deadline:
            return  # draining
        self.run(s, inst, "stopping", ops.stop, inst.spec, inst.runtime, remove,
                 done=functools.partial(self._stopped, s, inst, remove))

    def _stopped(self, s: Slot, inst: Instance, remove: bool, f: concurrent.futures.Future) -> None:
        if f.exception() is not None:
            self.failed(s, "stopping", f.exception())
            return  # still STOPPING: tried again after the backoff
        s.retry.reset()
        inst.running = False
        self.dispatcher.container_lost(inst, "it was stopped", announce=False)
        if remove:
            self.forget(s, inst)
        else:
            self.set(inst, State.STOPPED)
            self.record(inst)

    def _removed(self, s: Slot, inst: Instance, f: concurrent.futures.Future) -> None:
        if f.exception() is not None:
            self.failed(s, "removing", f.exception())
            return
        s.retry.reset()
        self.forget(s, inst)

    # ---- asking a board -----------------------------------------------------------------------------------

    def probe(self, s: Slot, inst: Instance, now: float) -> None:
        """Ask the board whether a disconnected instance's process still runs."""
        inst.probed_at = now

        def done(f: concurrent.futures.Future) -> None:
            if f.exception() is not None:
                self.failed(s, "asking about", f.exception())
            elif not f.result() and inst.state in (State.READY, State.UNHEALTHY) and not inst.connected:
                inst.running = False
                # A command that wants it running starts it again; otherwise it failed.
                self.set(inst, State.STOPPED if s.change is not None else State.FAILED, "its process is gone")

        self.run(s, inst, "asking about", ops.alive, inst.spec, inst.runtime, done=done)


def serves(inst: Instance) -> bool:
    """Connected, and (if it takes requests) to the module they go to by default."""
    cfg = inst.spec.config
    return inst.connected and (not cfg.takes_input or cfg.default_sub in inst.subs)


def not_ready_why(inst: Instance) -> str:
    if not inst.connected:
        return "its Connector never connected"
    if not serves(inst):
        wanted = inst.spec.config.default_sub
        return f"its Connector serves {', '.join(sorted(inst.subs))}, not module {wanted!r} (Connector(sub_name=...))"
    return "its warm-up did not answer"
