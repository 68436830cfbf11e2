"""The reconcile loop: makes what runs on the boards match what the registry wants.

Runs on the router thread (its ``tick`` is one of the router's timers). For every
placement (an inference on a board; a ``Slot`` here) it compares the desired state in the
registry (settings revision, running or stopped, placed or not) with the instances that
run there (``state.State``) and starts the next step towards it on a worker
(manager/operations.py): one step at a time per placement, placements in parallel. The
steps report back on the router thread, and the next pass goes on from there. Nothing
else starts or stops containers, so restarting a container that failed, bringing back
what the registry wants after a manager restart, rolling out new settings and rolling
back a change that failed are all the same loop reaching a desired state.

Rolling out a new revision on a board: the new instance is started beside the old one
(the board's ``surge``, default on), and only when it is READY does the old one stop
receiving requests, drain the requests it holds, and stop. On a board without surge the
old one is drained and stopped first, one board of the inference at a time, while the
others serve. A command that changes the desired state (``Change``) waits until every
placement it concerns has converged; if one fails, its edit is undone, the loop brings
the previous revision back where it had gone, and the command's error says what failed,
with the container's last log lines, and what serves now.

Healing: an instance whose Connector does not connect (and answer its warm-up) within the
ready timeout has failed; one that exits has failed; one that holds a request past its
deadline, or whose Connector falls silent while idle, is UNHEALTHY: it gets no requests
until it shows life again, and is restarted when its restart policy allows.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from infinibrain.errors import InfinibrainException, make_error

from . import operations as ops
from .boards import Board
from .config import ManagerConfig
from .registry import InstanceRecord, Placement, Registration, Registry
from .restarts import Backoff, policy_of
from .router import Router
from .runtimes.base import ContainerSpec
from .state import RUNNING_STATES, Instance, Request, State, instance_id
from .validate import default_sub_name

log = logging.getLogger(__name__)

PROBE_INTERVAL = 5.0  # a disconnected container's board is asked this often whether it still runs
PASS_INTERVAL = 0.25  # a full pass at least this often, and at once after anything changed
EXIT_CHECK_INTERVAL = 0.5
STEP_RETRY_FIRST, STEP_RETRY_MAX = 1.0, 30.0  # a failed stop or remove is tried again, backing off
CHANGE_BOUND = 3600.0  # no change waits longer, whatever its steps do
ROLLBACK_BOUND = 60.0  # how long a failed change waits for the old version to be back


@dataclass(eq=False)
class Change:
    """A command's edit of the desired state, waiting for its placements to converge.

    ``commit`` runs on success (on the router thread); ``undo`` restores the desired state
    as it was when the change fails. ``future`` ends with ``commit``'s result or the error.
    """

    what: str
    name: str
    boards: list[str]
    commit: Callable[[], object] = lambda: None  # noqa: E731
    undo: Callable[[], None] | None = None
    sink: Callable[[dict], None] | None = None
    touched: list[str] = field(default_factory=list)  # the boards whose desired state it changed
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    started: float = field(default_factory=time.monotonic)
    error: InfinibrainException | None = None
    undone_at: float = 0.0


@dataclass(eq=False)
class Slot:
    """One placement as it runs: its instances and the step under way there."""

    name: str
    board: str
    instances: dict[str, Instance] = field(default_factory=dict)
    busy: str = ""  # the step a worker runs for it now ("" = none)
    busy_with: str = ""  # the instance that step is for
    retry_at: float = 0.0  # a failed step is not tried again before this
    retry: Backoff = field(default_factory=lambda: Backoff(STEP_RETRY_FIRST, STEP_RETRY_MAX))
    error: InfinibrainException | None = None  # what its last failed step said
    error_at: float = 0.0
    restarts: Backoff = field(default_factory=Backoff)  # the restart policy's tries in a row
    restart_at: float = 0.0
    restarting: str = ""  # why the step under way is a restart ("" = it is not)
    ran_since: float = 0.0  # when its instance last became ready
    gave_up: int = 0  # the revision whose restarts were given up (told once)
    replacing: bool = False  # no surge: its old instance went down for the update
    removing: bool = False  # being unloaded: converged when no instance is left
    change: Change | None = None


class Reconciler:
    """Router thread only (every method), but for what it hands to ``Operations``."""

    def __init__(self, router: Router, registry: Registry, boards: dict[str, Board], config: ManagerConfig,
                 operations: ops.Operations) -> None:
        self.router = router
        self.registry = registry
        self.boards = boards
        self.config = config
        self.ops = operations
        self.slots: dict[tuple[str, str], Slot] = {}
        self.changes: list[Change] = []
        self._dirty = True
        self._next_pass = 0.0
        self._next_exit_check = 0.0
        self.liveness = config.liveness_timeout_ms / 1000
        router.lifecycle = self

    @property
    def registrations(self) -> dict[str, Registration]:
        return self.registry.registrations

    def poke(self) -> None:
        """Something changed: the next timer pass converges at once."""
        self._dirty = True

    # ---- what commands use ----------------------------------------------------------------

    def slot(self, name: str, board: str) -> Slot:
        key = (name, board)
        found = self.slots.get(key)
        if found is None:
            found = self.slots[key] = Slot(name, board)
        return found

    def watch(self, change: Change) -> concurrent.futures.Future:
        """Converge ``change``'s placements; its future tells the outcome."""
        for board in change.boards:
            s = self.slot(change.name, board)
            s.change, s.error = change, None
            s.restarts.reset()
            s.gave_up, s.restart_at = 0, 0.0
            for inst in s.instances.values():
                if inst.state is State.FAILED and not inst.running:
                    self._set(inst, State.STOPPED, "a command asks for it")  # to be started again
        self.changes.append(change)
        self.poke()
        return change.future

    def current(self, name: str, board: str) -> Instance | None:
        """The instance that stands for a placement: the one at the wanted revision, else the newest."""
        s = self.slots.get((name, board))
        if s is None or not s.instances:
            return None
        reg = self.registrations.get(name)
        wanted = [i for i in s.instances.values() if reg is not None and i.revision == reg.revision]
        return wanted[0] if wanted else max(s.instances.values(), key=lambda i: i.revision)

    def instances_of(self, name: str) -> list[Instance]:
        return [i for s in self.slots.values() if s.name == name for i in s.instances.values()]

    # ---- the loop -------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        if now >= self._next_exit_check:
            self._next_exit_check = now + EXIT_CHECK_INTERVAL
            self._check_exits()
            self._check_silence(now)
        if not self._dirty and now < self._next_pass:
            return
        timed_only = not self._dirty  # nothing happened: only what waits on the clock can move
        self._dirty = False
        self._next_pass = now + PASS_INTERVAL
        for name, reg in list(self.registrations.items()):
            for board, placement in list(reg.boards.items()):
                s = self.slot(name, board)
                if timed_only and placement.running and self._settled(s, reg):
                    continue
                self._converge(s, reg, placement, now)
        for key, s in list(self.slots.items()):
            owner = self.registrations.get(s.name)
            if owner is None or s.board not in owner.boards:
                self._converge(s, None, None, now)
                if not s.instances and not s.busy:
                    del self.slots[key]
        for change in list(self.changes):
            self._follow(change, now)

    @staticmethod
    def _settled(s: Slot, reg: Registration) -> bool:
        """Its one instance is the wanted revision, ready and connected, and no step or
        change is under way: ``_converge`` would do nothing, now or later, until something
        happens (which pokes a full pass). Many idle containers then cost the loop little."""
        if s.busy or s.change is not None or s.removing or s.replacing or len(s.instances) != 1:
            return False
        inst = next(iter(s.instances.values()))
        return inst.state is State.READY and inst.revision == reg.revision and inst.connected

    def _converge(self, s: Slot, reg: Registration | None, placement: Placement | None, now: float) -> None:
        if s.busy or now < s.retry_at:
            return
        if reg is None or placement is None or s.removing:
            return self._retire_all(s, now, remove=True)
        if not placement.running:
            return self._retire_all(s, now, remove=False)
        target = next((i for i in s.instances.values() if i.revision == reg.revision), None)
        olds = [i for i in s.instances.values() if i is not target]
        if target is None:
            if reg.config["implementation_type"] == "other" and olds:
                return self._relabel(s, olds[0], reg)
            if s.error is not None and s.change is not None:
                return  # its change failed here: the change undoes itself
            if olds and not self.boards[s.board].config.surge:
                live = [i for i in olds if i.state not in (State.STOPPED, State.FAILED)]
                if live:
                    if not s.replacing and any(o.replacing for o in self.slots.values() if o.name == s.name and o is not s):
                        return  # one board of the inference at a time
                    s.replacing = True
                    return self._retire(s, live[0], now, remove=True)
            target = self._new_instance(s, reg)
        state = target.state
        if state is State.PENDING:
            self._start(s, target, fresh=True)
        elif state is State.STARTING:
            if target.running and self._serves(target) and target.warmup_key is None:
                self._begin_ready(s, target)
            elif target.running and now >= target.ready_deadline:
                self._fail(s, target, f"did not become ready within {self._ready_timeout(target):g} s ({self._not_ready_why(target)})")
        elif state in (State.READY, State.UNHEALTHY) and not target.connected and self._probe_due(s, target, now):
            self._probe(s, target, now)
        elif state is State.READY:
            s.replacing = False
            if olds and target.serving:
                self._retire(s, olds[0], now, remove=True)
        elif state is State.UNHEALTHY:
            if now - target.since >= self.liveness:
                self._maybe_restart(s, target, reg, now, f"unhealthy: {target.why}")
        elif state is State.FAILED:
            if s.change is not None and s.change.error is None:
                return  # a change is waiting on it: the change decides (no restarts meanwhile)
            if reg.stable is not None and s.change is None:
                return self._revert(reg, f"{target.suffix} failed ({target.why})")
            self._maybe_restart(s, target, reg, now, target.why)
        elif state is State.STOPPED:
            self._start(s, target, fresh=False)
        elif state is State.STOPPING:
            self._retire(s, target, now, remove=False)  # stopped, then started again: placement wants it

    # ---- instances ------------------------------------------------------------------------

    def _new_instance(self, s: Slot, reg: Registration) -> Instance:
        inst = self.make_instance(reg, s.board, reg.revision, reg.config)
        self._record(inst)
        return inst

    def make_instance(self, reg: Registration, board_name: str, revision: int, cfg: dict, iid: str = "") -> Instance:
        """An instance of ``reg`` at ``revision`` (settings ``cfg``) on a board, known to the
        router; ``iid`` names one that exists already (restored from the registry)."""
        board = self.boards[board_name]
        suffix = f"{reg.name}-{board_name}"
        iid = iid or (suffix if cfg["implementation_type"] == "other" else instance_id(suffix, revision))
        work_dir, log_path = board.paths(iid, suffix)
        env = board.environment(self.config)
        env.update(
            INFINIBRAIN_CONTAINER=suffix,
            INFINIBRAIN_INSTANCE=iid,
            INFINIBRAIN_INFERENCE=reg.name,
            INFINIBRAIN_SUB_NAME=default_sub_name(cfg),
            INFINIBRAIN_BOARD=board_name,
        )
        if (cfg.get("max_batch_size") or 1) > 1:  # the Connector's batch size unless its program says
            env["INFINIBRAIN_MAX_BATCH_SIZE"] = str(cfg["max_batch_size"])
        env.update(self.router.guard.container_env())
        spec = ContainerSpec(iid, reg.name, board.config, cfg, work_dir, log_path, env, suffix=suffix,
                             files=self.registry.files.of(reg.name))
        inst = Instance(iid, suffix, reg.name, board_name, revision, spec, board.runtime(cfg["implementation_type"]),
                        since=time.monotonic())
        self.slot(reg.name, board_name).instances[iid] = inst
        self.router.add_instance(inst)
        return inst

    def _relabel(self, s: Slot, inst: Instance, reg: Registration) -> None:
        """An ``other`` container is run by someone else: new settings are only ours to know
        (the same instance goes on, its requests with it)."""
        board = self.boards[s.board]
        inst.revision = reg.revision
        inst.spec = dataclasses.replace(inst.spec, config=reg.config)
        inst.runtime = board.runtime(reg.config["implementation_type"])
        self._record(inst)
        self.poke()

    def _set(self, inst: Instance, state: State, why: str = "") -> None:
        if inst.state is not state:
            log.log(logging.WARNING if state in (State.FAILED, State.UNHEALTHY) else logging.DEBUG,
                    "container %s: %s -> %s%s", inst.id, inst.state, state, f" ({why})" if why else "")
        inst.state, inst.since, inst.why = state, time.monotonic(), why
        self.poke()

    def _ready_timeout(self, inst: Instance) -> float:
        return (inst.spec.config.get("ready_timeout") or self.config.container_start_timeout_ms) / 1000

    def _record(self, inst: Instance) -> None:
        """Keep the instance in the registry (pid, start time), so a restarted manager finds it."""
        reg = self.registrations.get(inst.inference)
        placement = reg.boards.get(inst.board) if reg is not None else None
        if placement is None:
            return
        records = [r for r in placement.instances if r.id != inst.id]
        if inst.id in self.slot(inst.inference, inst.board).instances:
            records.append(InstanceRecord(inst.id, inst.revision, inst.pid, inst.pid_start, inst.created))
        placement.instances = sorted(records, key=lambda r: r.revision)
        self.registry.persist(inst.inference)

    def _forget(self, s: Slot, inst: Instance) -> None:
        s.instances.pop(inst.id, None)
        self.router.remove_instance(inst)
        self._record(inst)

    # ---- steps ------------------------------------------------------------------------------

    def _step(self, s: Slot, inst: Instance, what: str, fn: Callable, *args: object,
              done: Callable[[concurrent.futures.Future], None]) -> None:
        """Run one slow step for ``inst`` of ``s`` on a worker; ``done(future)`` on the router thread."""
        s.busy, s.busy_with = f"{what} {inst.id}", inst.id
        sink = s.change.sink if s.change is not None else None
        fut = self.ops.submit(fn, *args, sink=sink, board=s.board)

        def finished(f: concurrent.futures.Future) -> None:
            s.busy = s.busy_with = ""
            self.poke()
            error = f.exception()
            if error is not None and not isinstance(error, InfinibrainException):
                log.error("%s %s/%s failed", what, s.name, s.board, exc_info=error)
            done(f)

        fut.add_done_callback(lambda f: self.router.call_soon(finished, f))

    def _failed_step(self, s: Slot, what: str, error: BaseException | None, backoff: bool = True) -> InfinibrainException:
        exc = error if isinstance(error, InfinibrainException) else make_error(999, detail=f"{type(error).__name__}: {error}")
        s.error, s.error_at = exc, time.monotonic()
        if backoff:
            s.retry_at = time.monotonic() + s.retry.next_delay()
        log.warning("%s of %s on %s failed: %s", what, s.name, s.board, exc.text)
        return exc

    def _start(self, s: Slot, inst: Instance, fresh: bool) -> None:
        self._set(inst, State.STARTING)
        inst.warmup_key = None
        inst.deploy_started = inst.started_at = time.monotonic()
        self._step(s, inst, "starting", ops.start, inst.spec, inst.runtime, fresh, done=lambda f: self._started(s, inst, f))

    def _started(self, s: Slot, inst: Instance, f: concurrent.futures.Future) -> None:
        if f.exception() is not None:
            exc = self._failed_step(s, "starting", f.exception(), backoff=False)
            inst.running = False
            self._set(inst, State.FAILED, exc.detail or exc.message)
            s.restarting = ""
            return
        s.retry.reset()
        started: ops.Started = f.result()
        info = started.info
        inst.running = True
        inst.pid, inst.pid_start, inst.created = info.pid, info.pid_start, info.created
        inst.deployment = {**started.figures, "board": s.board}
        inst.warmup = started.warmup
        inst.ready_deadline = time.monotonic() + self._ready_timeout(inst)
        if started.figures.get("image_bytes"):
            self.registry.bring(s.board, started.figures.get("image") or inst.spec.config.get("image_tag") or "")
        self._record(inst)
        if inst.runtime.kind == "other":
            return self._ready(s, inst)  # someone else starts it: registered is all we can make it
        if self._serves(inst):
            self._begin_ready(s, inst)

    @staticmethod
    def _serves(inst: Instance) -> bool:
        """Connected, and (if it takes requests) to the module they go to by default."""
        cfg = inst.spec.config
        return inst.connected and (cfg["input"] is None or default_sub_name(cfg) in inst.subs)

    def _not_ready_why(self, inst: Instance) -> str:
        if not inst.connected:
            return "its Connector never connected"
        if not self._serves(inst):
            wanted = default_sub_name(inst.spec.config)
            return f"its Connector serves {', '.join(sorted(inst.subs))}, not module {wanted!r} (Connector(sub_name=...))"
        return "its warm-up did not answer"

    def _begin_ready(self, s: Slot, inst: Instance) -> None:
        if inst.warmup is None:
            return self._ready(s, inst)
        payload, arr, param, sub = inst.warmup
        timeout = max(inst.ready_deadline - time.monotonic(), 1.0)
        inst.warmup_key = self.router.send_warmup(inst, payload, arr, param, sub or default_sub_name(inst.spec.config), timeout)
        self._progress(s, "warming up")

    def _ready(self, s: Slot, inst: Instance) -> None:
        self._set(inst, State.READY)
        inst.warmup_key = None
        if inst.deploy_started:
            inst.deployment["seconds"] = round(time.monotonic() - inst.deploy_started, 3)
            self.router.metrics.deployed(inst.inference, inst.board, inst.deployment["seconds"], "ready")
            if inst.deployment.get("image_bytes"):
                self.router.metrics.sent_to_board(inst.board, int(inst.deployment["image_bytes"]))
            inst.deploy_started = 0.0
        log.info("container %s is ready (revision %d)", inst.id, inst.revision)
        self._progress(s, "ready", 1, 1)
        if s.restarting:
            s.restart_at = 0.0
            self._tell_restart(0, f"container {inst.suffix} of {inst.inference} restarted (try {s.restarts.tries}): {s.restarting}",
                               inst, s.restarts.tries)
            s.restarting = ""
        s.ran_since = time.monotonic()
        self.router.pump(inst.inference)

    def _fail(self, s: Slot, inst: Instance, why: str) -> None:
        """``inst`` failed while starting: stop it (it may run) and fail it with its log's tail."""
        inst.warmup_key = None
        if inst.deploy_started:
            self.router.metrics.deployed(inst.inference, inst.board, time.monotonic() - inst.deploy_started, "failed")
            inst.deploy_started = 0.0

        def done(f: concurrent.futures.Future) -> None:
            tail = f.result() if f.exception() is None else ""
            inst.running = False
            self.router.container_lost(inst, why, announce=False)
            text = f"container {inst.suffix} on board {inst.board!r} {why}"
            self._set(inst, State.FAILED, f"{text}; last log lines:\n{tail}" if tail.strip() else text)
            s.restarting = ""

        self._step(s, inst, "giving up on", ops.give_up, inst.spec, inst.runtime, done=done)

    def _retire_all(self, s: Slot, now: float, remove: bool) -> None:
        for inst in list(s.instances.values()):
            if inst.state in (State.STOPPED, State.FAILED) and not inst.running:
                if remove or (s.name in self.registrations and inst.revision != self.registrations[s.name].revision):
                    self._step(s, inst, "removing", ops.stop, inst.spec, inst.runtime, True,
                               done=functools.partial(self._removed, s, inst))
                    return
                continue
            return self._retire(s, inst, now, remove)

    def _retire(self, s: Slot, inst: Instance, now: float, remove: bool) -> None:
        """Take ``inst`` out of service: no new requests, its requests drain (bounded by
        their deadlines), then it stops (and, with ``remove``, is deleted)."""
        if inst.state is not State.STOPPING:
            inst.drain_deadline = max([r.answer_deadline for r in inst.in_flight.values()] + [now])
            self._set(inst, State.STOPPING, "retired")
        if inst.in_flight and now < inst.drain_deadline:
            return  # draining
        self._step(s, inst, "stopping", ops.stop, inst.spec, inst.runtime, remove,
                   done=lambda f: self._stopped(s, inst, remove, f))

    def _stopped(self, s: Slot, inst: Instance, remove: bool, f: concurrent.futures.Future) -> None:
        if f.exception() is not None:
            self._failed_step(s, "stopping", f.exception())
            return  # still STOPPING: tried again after the backoff
        s.retry.reset()
        inst.running = False
        self.router.container_lost(inst, "it was stopped", announce=False)
        if remove:
            self._forget(s, inst)
        else:
            self._set(inst, State.STOPPED)
            self._record(inst)

    def _removed(self, s: Slot, inst: Instance, f: concurrent.futures.Future) -> None:
        if f.exception() is not None:
            self._failed_step(s, "removing", f.exception())
            return
        s.retry.reset()
        self._forget(s, inst)

    def _probe_due(self, s: Slot, inst: Instance, now: float) -> bool:
        """A container that lost its connection but is believed to run: ask its board now
        when a command waits on it, else now and then (a remote board's poll may be stale)."""
        if s.change is not None and inst.probed_at < s.change.started:
            return True
        return now - inst.lost_at >= PROBE_INTERVAL and now - inst.probed_at >= PROBE_INTERVAL

    def _probe(self, s: Slot, inst: Instance, now: float) -> None:
        inst.probed_at = now

        def done(f: concurrent.futures.Future) -> None:
            if f.exception() is not None:
                self._failed_step(s, "asking about", f.exception())
            elif not f.result() and inst.state in (State.READY, State.UNHEALTHY) and not inst.connected:
                inst.running = False
                # A command that wants it running starts it again; otherwise it failed.
                self._set(inst, State.STOPPED if s.change is not None else State.FAILED, "its process is gone")

        self._step(s, inst, "asking about", ops.alive, inst.spec, inst.runtime, done=done)

    # ---- restarts ---------------------------------------------------------------------------

    def _maybe_restart(self, s: Slot, inst: Instance, reg: Registration, now: float, why: str) -> None:
        try:
            policy = policy_of(inst.spec.config)
        except InfinibrainException:
            policy = None
        if policy is None:
            return
        if s.ran_since and now - s.ran_since > self.config.restart_stable_after_ms / 1000 and s.restarts.tries and not s.restart_at:
            s.restarts.reset()  # it had recovered: this is a new failure, not the same one
        if not s.restart_at:
            if policy.max_retries is not None and s.restarts.tries >= policy.max_retries:
                if s.gave_up != inst.revision:
                    s.gave_up = inst.revision
                    log.error("container %s: not restarted again after %d tries (%s)", inst.id, s.restarts.tries, why)
                    self._tell_restart(302, f"container {inst.suffix} of {inst.inference} was not restarted: "
                                            f"{s.restarts.tries} tries failed ({why})", inst, s.restarts.tries)
                return
            delay = s.restarts.next_delay()
            s.restart_at = now + delay
            log.warning("container %s ended (%s); restarting it in %.1f s (try %d)", inst.id, why, delay, s.restarts.tries)
            return
        if now < s.restart_at:
            return
        s.restart_at = 0.0
        s.restarting = why
        if inst.state is State.UNHEALTHY:
            self._set(inst, State.STARTING, "restarting")
            inst.deploy_started = inst.started_at = time.monotonic()
            self.router.container_lost(inst, f"it is restarted ({why})", announce=False)
            self._step(s, inst, "restarting", ops.restart, inst.spec, inst.runtime, done=lambda f: self._started(s, inst, f))
        else:
            self._start(s, inst, fresh=False)

    def _tell_restart(self, code: int, text: str, inst: Instance, tries: int) -> None:
        """A restart (0: ``text`` is the message) or giving up (302: ``text`` is the detail)."""
        info = {"inference_name": inst.inference, "suffix_name": inst.suffix, "coprocessor": inst.board, "tries": tries}
        if code == 0:
            self.router.announce(0, info=info, what="restart", message=text)
        else:
            self.router.announce(code, info=info, what="restart", detail=text)

    # ---- what the wire shows (router.Lifecycle) ---------------------------------------------------

    def connected(self, inst: Instance) -> None:
        s = self.slots.get((inst.inference, inst.board))
        if (s is not None and inst.state is State.STARTING and inst.running and not s.busy and inst.warmup_key is None
                and self._serves(inst)):
            self._begin_ready(s, inst)

    def heard(self, inst: Instance, beat: bool) -> None:
        if inst.state is State.UNHEALTHY and (beat or not inst.heartbeats):
            log.warning("container %s shows life again: it serves", inst.id)
            self._set(inst, State.READY)
            self.router.pump(inst.inference)

    def overdue(self, inst: Instance, req: Request) -> None:
        if inst.state is State.READY:
            self._set(inst, State.UNHEALTHY, f"it held request {req.rid} past its {req.answer_timeout:g} s deadline")

    def warmed(self, inst: Instance, code: int, message: str) -> None:
        s = self.slots.get((inst.inference, inst.board))
        if s is None or inst.warmup_key is None or inst.state is not State.STARTING:
            return
        if code == 0:
            self._ready(s, inst)
        else:
            self._fail(s, inst, f"failed its warm-up: [{code}] {message}")

    def stranger(self, wire_id: str, sub: str) -> Instance | None:
        """A Connector started by hand without a container identity: it becomes the
        instance of the first ``other`` container that serves module ``sub`` and has no
        program connected."""
        for name, reg in self.registrations.items():
            svc = self.router.services.get(name)  # its modules, as the router routes them
            if reg.config["implementation_type"] != "other" or svc is None or sub not in svc.modules:
                continue
            for board in reg.boards:
                inst = self.current(name, board)
                if inst is None or inst.connected or inst.state is not State.READY:
                    continue
                s = self.slot(name, board)
                s.instances.pop(inst.id, None)
                self.router.rekey(inst, wire_id)
                s.instances[inst.id] = inst
                self._record(inst)
                log.info("a Connector started by hand for module %r serves %s", sub, inst.suffix)
                return inst
        log.warning("a Connector started by hand for module %r: no 'other' container of that module is free", sub)
        return None

    def _check_exits(self) -> None:
        for inst in list(self.router.containers.values()):
            if not inst.running or inst.state not in RUNNING_STATES:
                continue
            s = self.slots.get((inst.inference, inst.board))
            if s is None or s.busy_with == inst.id:
                continue  # a step is starting or stopping it: its outcome says
            code = inst.runtime.exited(inst.spec)
            if code is None:
                continue
            inst.running = False
            self.router.container_lost(inst, f"its process exited with status {code}")
            if inst.state is State.STOPPING:
                continue
            if inst.state is State.STARTING and not s.busy:
                self._fail(s, inst, f"exited with status {code} while starting")
            elif s.change is not None and s.change.error is None and inst.started_at < s.change.started:
                # It was running before the command that now wants it: that command starts it again.
                self._set(inst, State.STOPPED, f"exited with status {code}")
            else:
                self._set(inst, State.FAILED, f"exited with status {code}")

    def _check_silence(self, now: float) -> None:
        """A Connector that beats while idle and has fallen silent with nothing to do."""
        for inst in self.router.containers.values():
            if (inst.state is State.READY and inst.heartbeats and not inst.in_flight and inst.connected
                    and now - inst.last_heard > self.liveness):
                self._set(inst, State.UNHEALTHY, f"its Connector has been silent for {now - inst.last_heard:.0f} s")

    # ---- changes ------------------------------------------------------------------------------

    def _converged(self, s: Slot) -> bool:
        if s.busy:
            return False
        reg = self.registrations.get(s.name)
        placement = reg.boards.get(s.board) if reg is not None else None
        if placement is None or s.removing:
            return not s.instances
        if not placement.running:
            return all(i.state in (State.STOPPED, State.FAILED) and not i.running for i in s.instances.values())
        if len(s.instances) != 1:
            return False
        inst = next(iter(s.instances.values()))
        # Ready means serving: connected (an ``other`` container is run by someone else).
        assert reg is not None
        return inst.revision == reg.revision and inst.state is State.READY and (inst.connected or inst.runtime.kind == "other")

    def _broken(self, s: Slot, change: Change) -> str:
        """Why placement ``s`` failed ``change`` ("" = it did not)."""
        if s.error is not None and s.error_at >= change.started:
            return s.error.detail or s.error.message
        reg = self.registrations.get(s.name)
        if reg is None or s.board not in reg.boards or not reg.boards[s.board].running:
            return ""
        target = next((i for i in s.instances.values() if i.revision == reg.revision), None)
        if target is not None and target.state is State.FAILED and not s.busy:
            return target.why or f"container {target.suffix} failed"
        return ""

    def _follow(self, change: Change, now: float) -> None:
        slots = [self.slot(change.name, b) for b in change.boards]
        if change.error is None:
            broken = [(s, why) for s in slots if (why := self._broken(s, change))]
            if not broken and all(self._converged(s) for s in slots):
                return self._finish(change, slots, None)
            if not broken and now - change.started <= CHANGE_BOUND:
                return
            s, why = broken[0] if broken else (slots[0], f"it did not finish within {CHANGE_BOUND:g} s")
            code = s.error.code if s.error is not None and s.error_at >= change.started else 302
            change.error = make_error(code, detail=f"{change.what} of {change.name!r} on board {s.board!r} failed: {why}")
            change.undone_at = now
            if change.undo is not None:
                change.undo()
            for s in slots:
                s.error = None
            self.poke()
            return
        # Undone: wait for what the edit had changed to be as it was, or for the step that
        # would get it there to fail (a board that cannot be reached), bounded.
        waiting = [s for s in slots if s.board in change.touched]
        stuck = [s for s in waiting if not s.busy and s.error is not None and s.error_at >= change.undone_at]
        back = all(self._converged(s) for s in waiting)
        if back or now - change.undone_at > ROLLBACK_BOUND or all(self._converged(s) or s in stuck for s in waiting):
            why = (stuck[0].error.detail or stuck[0].error.message) if stuck and stuck[0].error is not None else ""
            self._finish(change, slots, change.error, back, why)

    def _finish(self, change: Change, slots: list[Slot], error: InfinibrainException | None, back: bool = True,
                stuck: str = "") -> None:
        self.changes.remove(change)
        for s in slots:
            if s.change is change:
                s.change = None
        if error is None:
            try:
                result = change.commit()
            except Exception as exc:
                change.future.set_exception(exc)
                return
            # A commit's answer may be the write of the registry: the command ends once it is on disk.
            if isinstance(result, concurrent.futures.Future):
                result.add_done_callback(lambda f: change.future.set_exception(f.exception()) if f.exception()
                                         else change.future.set_result(None))
            else:
                change.future.set_result(result)
            return
        detail = error.detail or error.message
        if change.undo is not None:
            serving = sorted({i.suffix for i in self.instances_of(change.name) if i.serving})
            if not back:
                detail += f"; rolling back has not finished yet ({stuck or 'it goes on'})"
            if serving:
                detail += f"; the previous version keeps serving on {', '.join(serving)}"
            elif change.name not in self.registrations:
                detail += "; nothing was left behind"
        change.future.set_exception(make_error(error.code, detail=detail))

    def _revert(self, reg: Registration, why: str) -> None:
        """A rollout that no command waits for (it was under way when the manager stopped)
        failed: go back to the settings that were ready everywhere."""
        stable = reg.stable
        assert stable is not None
        log.error("inference %s: revision %d failed (%s); going back to revision %d", reg.name, reg.revision, why, stable.revision)
        reg.config, reg.revision, reg.stable = stable.config, stable.revision, None
        self.router.open_service(reg)
        self.registry.persist(reg.name)
        self.poke()

    def _progress(self, s: Slot, stage: str, done: int = 0, total: int = 0) -> None:
        if s.change is not None and s.change.sink is not None:
            s.change.sink({"stage": stage, "done": done, "total": total, "board": s.board})

    # ---- start-up ----------------------------------------------------------------------------

    def restore(self) -> None:
        """Before the loop runs: take the registry's registrations, and adopt the instances an
        earlier manager left running (asked of the boards in parallel). What is not found
        again is started by the loop, as anything else the registry wants."""
        adopting: list[tuple[Instance, concurrent.futures.Future]] = []
        for name, reg in self.registry.load_all().items():
            self.registrations[name] = reg
            self.router.open_service(reg)
            for board_name, placement in reg.boards.items():
                if board_name not in self.boards:
                    log.error("inference %s is placed on unknown board %r; left alone", name, board_name)
                    continue
                for record in placement.instances:
                    inst = self.make_instance(reg, board_name, record.revision, reg.config_of(record.revision) or reg.config,
                                              record.id)
                    inst.pid, inst.pid_start, inst.created = record.pid, record.pid_start, record.created
                    adopting.append((inst, self.ops.submit(ops.adopt, inst.spec, inst.runtime, record.pid, record.pid_start)))
            if reg.stable is not None:  # a change was under way: finish it, or go back if it fails
                self.watch(Change("rollout", name, list(reg.boards), commit=functools.partial(self._settle, reg)))
        for inst, fut in adopting:
            try:
                adopted = fut.result(timeout=self.config.engine_timeout_ms / 1000 + 30)
            except Exception:
                adopted = False
            inst.running = adopted
            inst.state = State.STARTING if adopted else State.STOPPED
            if adopted and inst.runtime.kind == "other":
                inst.state = State.READY  # someone else runs it: registered is all we can make it
            inst.ready_deadline = time.monotonic() + self._ready_timeout(inst)
        self.poke()

    def _settle(self, reg: Registration) -> concurrent.futures.Future:
        reg.stable = None
        return self.registry.persist(reg.name)
