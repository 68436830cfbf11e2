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
ready timeout has failed; one that exits has failed; one that health.py finds unhealthy
(late, silent, its connection gone) gets no requests until it shows life again, and is
restarted when it stays unhealthy for the liveness timeout and its restart policy allows.

The slow steps are steps.py's, the following of a command's change rollout.py's; this
module decides which step each placement needs next. Router thread (``tick`` is one of the
loop's timers), but for what it hands to ``Operations``.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging

from infinibrain.errors import InfinibrainException

from . import operations as ops
from .auth import Guard
from .boards import Board
from .config import ManagerConfig
from .dispatch import Dispatcher
from .health import Health
from .loop import Loop
from .metrics import NullMetrics
from .placement import Change, Slot, Slots
from .registry import Placement, Registration, Registry
from .restarts import policy_of
from .rollout import Rollouts
from .runtimes.base import ContainerSpec
from .settings import InferenceSettings, resolve, runner_environment
from .state import Clock, Instance, Nudge, State, instance_id
from .steps import Steps, not_ready_why, serves
from .wire import Wire

log = logging.getLogger(__name__)

PASS_INTERVAL = 0.25  # a full pass at least this often, and at once after anything changed
EXIT_CHECK_INTERVAL = 0.5


class Reconciler:
    def __init__(self, config: ManagerConfig, loop: Loop, wire: Wire, dispatcher: Dispatcher, health: Health,
                 registry: Registry, boards: dict[str, Board], operations: ops.Operations, guard: Guard, nudge: Nudge,
                 metrics: NullMetrics, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self.dispatcher = dispatcher
        self.health = health
        self.registry = registry
        self.boards = boards
        self.ops = operations
        self.guard = guard
        self.nudge = nudge
        self.slots = Slots()
        self.steps = Steps(config, loop, wire, dispatcher, registry, self.slots, operations, guard, nudge, metrics, clock)
        self.rollouts = Rollouts(registry, self.slots, dispatcher, nudge, clock)
        self._next_pass = 0.0
        self._next_exit_check = 0.0
        loop.every(self.tick)

    @property
    def registrations(self) -> dict[str, Registration]:
        return self.registry.registrations

    # ---- what commands use ----------------------------------------------------------------

    def slot(self, name: str, board: str) -> Slot:
        return self.slots.of(name, board)

    def watch(self, change: Change) -> concurrent.futures.Future:
        """Converge ``change``'s placements; its future tells the outcome."""
        return self.rollouts.watch(change)

    def current(self, name: str, board: str) -> Instance | None:
        """The instance that stands for a placement: the one at the wanted revision, else the newest."""
        s = self.slots.get((name, board))
        if s is None or not s.instances:
            return None
        reg = self.registrations.get(name)
        wanted = s.at(reg.revision) if reg is not None else None
        return wanted if wanted is not None else max(s.instances.values(), key=lambda i: i.revision)

    def instances_of(self, name: str) -> list[Instance]:
        return self.slots.instances_of(name)

    # ---- the loop -------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        if now >= self._next_exit_check:
            self._next_exit_check = now + EXIT_CHECK_INTERVAL
            self._exits()
            self.health.check_silence(list(self.dispatcher.containers.values()), now)
        dirty = self.nudge.take()
        if not dirty and now < self._next_pass:
            return
        self._next_pass = now + PASS_INTERVAL
        for name, reg in list(self.registrations.items()):
            for board, placement in list(reg.boards.items()):
                s = self.slots.of(name, board)
                # Nothing happened: only what waits on the clock can move.
                if not dirty and placement.running and self._settled(s, reg):
                    continue
                self._converge(s, reg, placement, now)
        for key, s in list(self.slots.items()):
            owner = self.registrations.get(s.name)
            if owner is None or s.board not in owner.boards:
                self._converge(s, None, None, now)
                if not s.instances and not s.busy:
                    del self.slots[key]
        self.rollouts.follow(now)

    @staticmethod
    def _settled(s: Slot, reg: Registration) -> bool:
        """Its one instance is the wanted revision, ready and connected, and no step or
        change is under way: ``_converge`` would do nothing, now or later, until something
        happens (which pokes a full pass). Many idle containers then cost the loop little."""
        if s.busy or s.change is not None or s.removing or s.replacing:
            return False
        inst = s.only()
        return inst is not None and inst.state is State.READY and inst.revision == reg.revision and inst.connected

    def _converge(self, s: Slot, reg: Registration | None, placement: Placement | None, now: float) -> None:
        steps = self.steps
        if s.busy or now < s.retry_at:
            return
        if reg is None or placement is None or s.removing:
            return steps.retire_all(s, now, remove=True)
        if not placement.running:
            return steps.retire_all(s, now, remove=False)
        target = s.at(reg.revision)
        olds = [i for i in s.instances.values() if i is not target]
        if target is None:
            if reg.config.implementation_type == "other" and olds:
                return self._relabel(s, olds[0], reg)
            if s.error is not None and s.change is not None:
                return  # its change failed here: the change undoes itself
            if olds and not self.boards[s.board].config.surge:
                live = [i for i in olds if i.state not in (State.STOPPED, State.FAILED)]
                if live:
                    if not s.replacing and any(o.replacing for o in self.slots.values() if o.name == s.name and o is not s):
                        return  # one board of the inference at a time
                    s.replacing = True
                    return steps.retire(s, live[0], now, remove=True)
            target = self._new_instance(s, reg)
        state = target.state
        if state is State.PENDING:
            steps.start(s, target, fresh=True)
        elif state is State.STARTING:
            if target.warmup_key is not None and target.warmed is not None:
                steps.warmed(s, target)
            elif target.running and serves(target) and target.warmup_key is None:
                steps.begin_ready(s, target)
            elif target.running and now >= target.ready_deadline:
                steps.fail(s, target, f"did not become ready within {steps.ready_timeout(target):g} s ({not_ready_why(target)})")
        elif (state in (State.READY, State.UNHEALTHY) and not target.connected
              and self.health.probe_due(target, now, s.change.started if s.change is not None else None)):
            steps.probe(s, target, now)
        elif state is State.READY:
            s.replacing = False
            if olds and target.serving:
                steps.retire(s, olds[0], now, remove=True)
        elif state is State.UNHEALTHY:
            if self.health.hung(target, now):
                self._maybe_restart(s, target, now, f"unhealthy: {target.why}")
        elif state is State.FAILED:
            if s.change is not None and s.change.error is None:
                return  # a change is waiting on it: the change decides (no restarts meanwhile)
            if reg.stable is not None and s.change is None:
                return self.rollouts.revert(reg, f"{target.suffix} failed ({target.why})")
            self._maybe_restart(s, target, now, target.why)
        elif state is State.STOPPED:
            steps.start(s, target, fresh=False)
        elif state is State.STOPPING:
            steps.retire(s, target, now, remove=False)  # stopped, then started again: placement wants it

    def _exits(self) -> None:
        """Instances whose process exited by itself: their requests end (or go elsewhere),
        and they failed (or stopped, when a command that started before wants them again)."""
        for inst, code in self.health.exited(list(self.dispatcher.containers.values()), self.slots.stepping()):
            s = self.slots.get((inst.inference, inst.board))
            if s is None:
                continue
            inst.running = False
            self.dispatcher.container_lost(inst, f"its process exited with status {code}")
            if inst.state is State.STOPPING:
                continue
            if inst.state is State.STARTING and not s.busy:
                self.steps.fail(s, inst, f"exited with status {code} while starting")
            elif s.change is not None and s.change.error is None and inst.started_at < s.change.started:
                # It was running before the command that now wants it: that command starts it again.
                self.steps.set(inst, State.STOPPED, f"exited with status {code}")
            else:
                self.steps.set(inst, State.FAILED, f"exited with status {code}")

    # ---- instances ------------------------------------------------------------------------

    def _new_instance(self, s: Slot, reg: Registration) -> Instance:
        inst = self.make_instance(reg, s.board, reg.revision, reg.config)
        self.steps.record(inst)
        return inst

    def make_instance(self, reg: Registration, board_name: str, revision: int, cfg: InferenceSettings, iid: str = "") -> Instance:
        """An instance of ``reg`` at ``revision`` (settings ``cfg``) on a board, known to the
        router; ``iid`` names one that exists already (restored from the registry)."""
        board = self.boards[board_name]
        suffix = f"{reg.name}-{board_name}"
        iid = iid or (suffix if cfg.implementation_type == "other" else instance_id(suffix, revision))
        work_dir, log_path = board.paths(iid, suffix)
        env = board.environment(self.config)
        env.update(
            INFINIBRAIN_CONTAINER=suffix,
            INFINIBRAIN_INSTANCE=iid,
            INFINIBRAIN_INFERENCE=reg.name,
            INFINIBRAIN_SUB_NAME=cfg.default_sub,
            INFINIBRAIN_BOARD=board_name,
        )
        policy = resolve(cfg, self.config)
        if policy.batching:  # the Connector's batch size unless its program says
            env["INFINIBRAIN_MAX_BATCH_SIZE"] = str(policy.max_batch_size)
        if cfg.runner_modules:
            env.update(runner_environment(cfg, self._model_peers(board.host_key, reg.name, board_name)))
        env.update(self.guard.grant(iid))  # its own key: it speaks as itself alone
        spec = ContainerSpec(iid, reg.name, board.config, cfg, work_dir, log_path, env, suffix=suffix,
                             files=self.registry.files.of(reg.name))
        inst = Instance(iid, suffix, reg.name, board_name, revision, spec, board.runtime(cfg.implementation_type),
                        since=self.clock())
        self.slots.of(reg.name, board_name).instances[iid] = inst
        self.dispatcher.add_instance(inst)
        return inst

    def _model_peers(self, host_key: str, name: str, board_name: str) -> int:
        """Placements of model-runner inferences on the boards of ``host_key``'s machine,
        counting (``name`` on ``board_name``) once whether or not it is placed yet."""
        places = {(r.name, b) for r in self.registrations.values() if r.config.runner_modules
                  for b in r.boards if b in self.boards and self.boards[b].host_key == host_key}
        return len(places | {(name, board_name)})

    def _relabel(self, s: Slot, inst: Instance, reg: Registration) -> None:
        """An ``other`` container is run by someone else: new settings are only ours to know
        (the same instance goes on, its requests with it)."""
        board = self.boards[s.board]
        inst.revision = reg.revision
        inst.spec = dataclasses.replace(inst.spec, config=reg.config)
        inst.runtime = board.runtime(reg.config.implementation_type)
        self.steps.record(inst)
        self.nudge.set()

    def stranger(self, wire_id: str, sub: str) -> Instance | None:
        """A Connector started by hand without a container identity: it becomes the
        instance of the first ``other`` container that serves module ``sub`` and has no
        program connected."""
        for name, reg in self.registrations.items():
            if reg.config.implementation_type != "other" or sub not in reg.config.module_names:
                continue
            for board in reg.boards:
                inst = self.current(name, board)
                if inst is None or inst.connected or inst.state is not State.READY:
                    continue
                s = self.slots.of(name, board)
                s.instances.pop(inst.id, None)
                self.dispatcher.rekey(inst, wire_id)
                s.instances[inst.id] = inst
                self.steps.record(inst)
                log.info("a Connector started by hand for module %r serves %s", sub, inst.suffix)
                return inst
        log.warning("a Connector started by hand for module %r: no 'other' container of that module is free", sub)
        return None

    # ---- restarts ---------------------------------------------------------------------------

    def _maybe_restart(self, s: Slot, inst: Instance, now: float, why: str) -> None:
        try:
            policy = policy_of(inst.spec.config.run_option)
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
                    self.steps.tell_restart(302, f"container {inst.suffix} of {inst.inference} was not restarted: "
                                                 f"{s.restarts.tries} tries failed ({why})", inst, s.restarts.tries)
                return
            delay = s.restarts.next_delay()
            s.restart_at = now + delay
            log.warning("container %s ended (%s); restarting it in %.1f s (try %d)", inst.id, why, delay, s.restarts.tries)
            return
        if now < s.restart_at:
            return
        s.restart_at, s.restarting = 0.0, why
        if inst.state is State.UNHEALTHY:
            self.steps.restart(s, inst, why)
        else:
            self.steps.start(s, inst, fresh=False)

    # ---- start-up ----------------------------------------------------------------------------

    def restore(self) -> None:
        """Before the loop runs: take the registry's registrations, and adopt the instances an
        earlier manager left running (asked of the boards in parallel). What is not found
        again is started by the loop, as anything else the registry wants."""
        adopting: list[tuple[Instance, concurrent.futures.Future]] = []
        for name, reg in self.registry.load_all().items():
            self.registrations[name] = reg
            self.dispatcher.open_service(reg)
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
            inst.ready_deadline = self.clock() + self.steps.ready_timeout(inst)
        self.nudge.set()

    def _settle(self, reg: Registration) -> concurrent.futures.Future:
        reg.stable = None
        return self.registry.persist(reg.name)
