"""Following a command's change until every placement it concerns has converged, or undoing it.

A command edits the desired state (manager/changes.py) and hands the reconciler a
``Change``; the reconciler's passes move the placements, and ``Rollouts.follow`` looks at
each change on every pass: done when its placements have converged (then ``commit``), or
failed when one of them broke (then ``undo``, and the command's error once what the edit
had changed is back as it was, or that cannot happen).

Router thread.
"""
from __future__ import annotations

import concurrent.futures
import logging

from infinibrain.errors import InfinibrainException, make_error

from .dispatch import Dispatcher
from .placement import Change, Slot, Slots
from .registry import Registration, Registry
from .state import Clock, Nudge, State

log = logging.getLogger("infinibrain.manager.reconciler")

CHANGE_BOUND = 3600.0  # no change waits longer, whatever its steps do
ROLLBACK_BOUND = 60.0  # how long a failed change waits for the old version to be back


class Rollouts:
    def __init__(self, registry: Registry, slots: Slots, dispatcher: Dispatcher, nudge: Nudge, clock: Clock) -> None:
        self.registry = registry
        self.clock = clock
        self.slots = slots
        self.dispatcher = dispatcher
        self.nudge = nudge
        self.changes: list[Change] = []

    @property
    def registrations(self) -> dict[str, Registration]:
        return self.registry.registrations

    def watch(self, change: Change) -> concurrent.futures.Future:
        """Converge ``change``'s placements; its future tells the outcome."""
        change.started = self.clock()
        for board in change.boards:
            s = self.slots.of(change.name, board)
            s.change, s.error = change, None
            s.restarts.reset()
            s.gave_up, s.restart_at = 0, 0.0
            for inst in s.instances.values():
                if inst.state is State.FAILED and not inst.running:
                    inst.enter(State.STOPPED, "a command asks for it", self.clock())  # to be started again
        self.changes.append(change)
        self.nudge.set()
        return change.future

    def follow(self, now: float) -> None:
        for change in list(self.changes):
            self._follow(change, now)

    def converged(self, s: Slot) -> bool:
        if s.busy:
            return False
        reg = self.registrations.get(s.name)
        placement = reg.boards.get(s.board) if reg is not None else None
        if placement is None or s.removing:
            return not s.instances
        if not placement.running:
            return all(i.state in (State.STOPPED, State.FAILED) and not i.running for i in s.instances.values())
        inst = s.only()
        # Ready means serving: connected (an ``other`` container is run by someone else).
        assert reg is not None
        return (inst is not None and inst.revision == reg.revision and inst.state is State.READY
                and (inst.connected or inst.runtime.kind == "other"))

    def _broken(self, s: Slot, change: Change) -> str:
        """Why placement ``s`` failed ``change`` ("" = it did not)."""
        if s.error is not None and s.error_at >= change.started:
            return s.error.detail or s.error.message
        reg = self.registrations.get(s.name)
        if reg is None or s.board not in reg.boards or not reg.boards[s.board].running:
            return ""
        target = s.at(reg.revision)
        if target is not None and target.state is State.FAILED and not s.busy:
            return target.why or f"container {target.suffix} failed"
        return ""

    def _follow(self, change: Change, now: float) -> None:
        slots = [self.slots.of(change.name, b) for b in change.boards]
        if change.error is None:
            broken = [(s, why) for s in slots if (why := self._broken(s, change))]
            if not broken and all(self.converged(s) for s in slots):
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
            self.nudge.set()
            return
        # Undone: wait for what the edit had changed to be as it was, or for the step that
        # would get it there to fail (a board that cannot be reached), bounded.
        waiting = [s for s in slots if s.board in change.touched]
        stuck = [s for s in waiting if not s.busy and s.error is not None and s.error_at >= change.undone_at]
        back = all(self.converged(s) for s in waiting)
        if back or now - change.undone_at > ROLLBACK_BOUND or all(self.converged(s) or s in stuck for s in waiting):
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
            serving = sorted({i.suffix for i in self.slots.instances_of(change.name) if i.serving})
            if not back:
                detail += f"; rolling back has not finished yet ({stuck or 'it goes on'})"
            if serving:
                detail += f"; the previous version keeps serving on {', '.join(serving)}"
            elif change.name not in self.registrations:
                detail += "; nothing was left behind"
        change.future.set_exception(make_error(error.code, detail=detail))

    def revert(self, reg: Registration, why: str) -> None:
        """A rollout that no command waits for (it was under way when the manager stopped)
        failed: go back to the settings that were ready everywhere."""
        stable = reg.stable
        assert stable is not None
        log.error("inference %s: revision %d failed (%s); going back to revision %d", reg.name, reg.revision, why, stable.revision)
        reg.config, reg.revision, reg.stable = stable.config, stable.revision, None
        self.dispatcher.open_service(reg)
        self.registry.persist(reg.name)
        self.nudge.set()
