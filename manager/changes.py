"""Edits of the desired state: what the management commands ask of the cluster.

Router thread. Each edit checks what it can without waiting (names, settings, requests
that would be cut), changes the registrations, persists them, and hands the reconciler a
``Change``: its future ends when every placement the edit concerns has converged, or with
the error once the edit has been undone. Nothing here waits or touches a board; what must
be checked on the boards before anything is stopped is checked by the command first
(operations.check_board / check_files).
"""
from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from typing import Callable

from infinibrain.errors import make_error

from .operations import gather
from .reconciler import Change, Reconciler
from .registry import Placement, Registration, Registry, Stable
from .dispatch import Dispatcher
from .settings import InferenceSettings

Sink = Callable[[dict], None] | None


@dataclass
class Snapshot:
    """A registration's desired state (not what runs), to undo an edit with."""

    config: InferenceSettings
    revision: int
    stable: Stable | None
    boards: dict[str, tuple[str, bool]]  # board -> (distribution, running)

    @classmethod
    def of(cls, reg: Registration) -> "Snapshot":
        return cls(reg.config, reg.revision, reg.stable, {b: (p.distribution, p.running) for b, p in reg.boards.items()})

    def touched(self, reg: Registration) -> list[str]:
        """The boards whose desired state ``reg`` now differs from this snapshot on."""
        if reg.revision != self.revision:
            return sorted(set(reg.boards) | set(self.boards))
        now = {b: (p.distribution, p.running) for b, p in reg.boards.items()}
        return sorted(b for b in set(now) | set(self.boards) if now.get(b) != self.boards.get(b))

    def restore(self, reg: Registration) -> None:
        reg.config, reg.revision, reg.stable = self.config, self.revision, self.stable
        for board in [b for b in reg.boards if b not in self.boards]:
            del reg.boards[board]
        for board, (distribution, running) in self.boards.items():
            p = reg.boards.setdefault(board, Placement())
            p.distribution, p.running = distribution, running


@dataclass
class LoadPlan:
    """What a load_inference of one config will do (decided before anything changes)."""

    cfg: InferenceSettings
    boards: list[str]  # the boards it names
    new: bool  # a new registration
    replace: bool  # new settings (or force_update): a new revision, rolled out everywhere
    work: list[str]  # the boards where containers will be made or started

    @property
    def name(self) -> str:
        return self.cfg.name


class Changes:
    def __init__(self, reconciler: Reconciler, registry: Registry, dispatcher: Dispatcher) -> None:
        self.reconciler = reconciler
        self.registry = registry
        self.dispatcher = dispatcher

    @property
    def registrations(self) -> dict[str, Registration]:
        return self.registry.registrations

    def _settled(self, reg: Registration) -> None:
        self.dispatcher.open_service(reg)
        self.registry.persist(reg.name)

    def _watch(self, what: str, reg: Registration, boards: list[str], undo: Callable[[], None] | None,
               sink: Sink = None, commit: Callable[[], None] | None = None,
               before: Snapshot | None = None) -> concurrent.futures.Future:
        """Hand the edit just made to ``reg`` to the reconciler. ``before``: the desired state
        before it (None: a new registration), so a failure waits for what it changed only."""
        self._settled(reg)
        touched = list(boards) if before is None else before.touched(reg)

        def done() -> concurrent.futures.Future:
            if commit is not None:
                commit()
            if self.registrations.get(reg.name) is reg:
                reg.stable = None  # every placement is ready on the new revision
            return self.registry.persist(reg.name)  # after every write before it

        return self.reconciler.watch(Change(what, reg.name, boards, commit=done, undo=undo, sink=sink, touched=touched))

    def _undo_to(self, reg: Registration) -> tuple[Callable[[], None], Snapshot]:
        """How to undo an edit about to be made to ``reg``, and its desired state before it."""
        snap = Snapshot.of(reg)

        def undo() -> None:
            snap.restore(reg)
            self._settled(reg)

        return undo, snap

    def _roll(self, reg: Registration, cfg: InferenceSettings) -> None:
        """New settings (or the same, to make new containers): a new revision, and the
        current one kept as the one to go back to."""
        if reg.stable is None:
            reg.stable = Stable(reg.revision, reg.config)
        reg.config = cfg
        reg.new_revision()

    # ---- load_inference ---------------------------------------------------------------------

    def plan_load(self, cfg: InferenceSettings, boards: list[str]) -> LoadPlan:
        """203 for a changed tag, 302 for other settings, both without force_update."""
        existing = self.registrations.get(cfg.name)
        if existing is None:
            return LoadPlan(cfg, boards, True, False, list(boards))
        old = existing.config
        if old.image_tag != cfg.image_tag and not cfg.force_update:
            raise make_error(203, old.image_tag, cfg.image_tag)
        if _settings(old) != _settings(cfg) and not cfg.force_update:
            raise make_error(302, detail=f"inference {cfg.name!r} is registered with other settings; "
                                         "set force_update=True in its ContainerConfig to replace them")
        if cfg.force_update:
            return LoadPlan(cfg, boards, False, True, list(dict.fromkeys([*existing.boards, *boards])))
        ready = {i.board for i in self.reconciler.instances_of(cfg.name) if i.revision == existing.revision and i.serving}
        return LoadPlan(cfg, boards, False, False, [b for b in boards if b not in ready])

    def load(self, plan: LoadPlan, sink: Sink) -> concurrent.futures.Future:
        name = plan.name
        if plan.new:
            reg = Registration(name, plan.cfg, {b: Placement() for b in plan.boards})
            self.registrations[name] = reg
            return self._watch("load_inference", reg, plan.boards, lambda: self._drop(name, "was unloaded: its load failed"), sink)
        reg = self.registrations[name]
        undo, before = self._undo_to(reg)
        if plan.replace:
            self._roll(reg, plan.cfg)
        for board in plan.boards:
            reg.boards.setdefault(board, Placement()).running = True
        concerned = list(reg.boards) if plan.replace else plan.boards
        return self._watch("load_inference", reg, concerned, undo, sink, before=before)

    def _drop(self, name: str, why: str) -> None:
        """Forget a registration whose containers are (being) removed."""
        if self.registrations.pop(name, None) is not None:
            self.dispatcher.close_service(name, why)
            self.registry.persist(name)

    # ---- unload_inference -----------------------------------------------------------------

    def check_unload(self, name: str, board: str) -> None:
        """300, or 303 if removing ``name``'s containers (on ``board``) would cut requests."""
        reg = self.registry.registered(name)
        boards = [b for b in reg.boards if not board or b == board]
        whole = len(boards) == len(reg.boards)
        instances = [i for i in self.reconciler.instances_of(name) if i.board in boards]
        queued = self.dispatcher.queued(name) if whole else 0
        running = sum(len(i.in_flight) for i in instances)
        # Unloading some of its boards leaves the queue to the others: only running
        # requests are in the way then.
        if queued or running:
            raise make_error(303, detail=f"{name!r} has {queued} queued and {running} running requests")

    def unload(self, name: str, board: str) -> concurrent.futures.Future:
        """Remove ``name``'s containers (on ``board``; "" = everywhere)."""
        self.check_unload(name, board)
        reg = self.registry.registered(name)
        boards = [b for b in reg.boards if not board or b == board]
        whole = len(boards) == len(reg.boards)
        if whole:
            self.dispatcher.close_service(name, "was unloaded")
        slots = [self.reconciler.slot(name, b) for b in boards]
        for s in slots:
            s.removing = True

        def commit() -> concurrent.futures.Future:
            for s in slots:
                s.removing = False
                reg.boards.pop(s.board, None)
            if not reg.boards:
                self.registry.files.drop(name)
                self._drop(name, "was unloaded")
            return self.registry.persist(name)

        def undo() -> None:
            for s in slots:
                s.removing = False
            if whole:
                self.dispatcher.open_service(reg)

        return self.reconciler.watch(Change("unload_inference", name, boards, commit=commit, undo=undo, touched=boards))

    # ---- reload_inference -----------------------------------------------------------------

    def reload(self, from_file: Registration, sink: Sink) -> concurrent.futures.Future:
        """Start the inference's containers again from its file: its settings (a new
        revision, rolled out), boards and switches."""
        name = from_file.name
        reg = self.registrations.get(name)
        if reg is None:
            self.registrations[name] = from_file
            from_file.stable = None
            return self._watch("reload_inference", from_file, list(from_file.boards),
                               lambda: self._drop(name, "was unloaded: its reload failed"), sink)
        undo, before = self._undo_to(reg)
        self._roll(reg, from_file.config)
        for board, placement in from_file.boards.items():
            mine = reg.boards.setdefault(board, Placement())
            mine.distribution, mine.running = placement.distribution, placement.running
        gone = [b for b in reg.boards if b not in from_file.boards]
        for board in gone:
            self.reconciler.slot(name, board).removing = True

        def commit() -> None:
            for board in gone:
                self.reconciler.slot(name, board).removing = False
                reg.boards.pop(board, None)

        def undo_all() -> None:
            for board in gone:
                self.reconciler.slot(name, board).removing = False
            undo()

        return self._watch("reload_inference", reg, list(reg.boards), undo_all, sink, commit, before)

    # ---- one board, one container -----------------------------------------------------------

    def add(self, name: str, board: str, sink: Sink) -> concurrent.futures.Future:
        reg = self.registry.registered(name)
        undo, before = self._undo_to(reg)
        reg.boards.setdefault(board, Placement()).running = True
        return self._watch("add_inference", reg, [board], undo, sink, before=before)

    def set_running(self, what: str, name: str, board: str, running: bool, sink: Sink) -> concurrent.futures.Future:
        """Start (or stop) the container of ``name`` on ``board``, keeping its files."""
        reg = self.registry.registered(name)
        undo, before = self._undo_to(reg)
        reg.boards[board].running = running
        return self._watch(what, reg, [board], undo, sink, before=before)

    def restart(self, name: str, sink: Sink) -> concurrent.futures.Future:
        """New containers for every board, rolled out as new settings would be (so files
        put_file changed are read afresh), the old ones serving until the new are ready."""
        reg = self.registry.registered(name)
        undo, before = self._undo_to(reg)
        self._roll(reg, reg.config)
        return self._watch("restart_inference", reg, list(reg.boards), undo, sink, before=before)

    def distribution(self, pairs: list[tuple[str, str]], on: bool) -> concurrent.futures.Future:
        """Switch distribution of the placements ``pairs`` (inference, board); done when written."""
        state = "on" if on else "off"
        for name, board in pairs:
            self.registrations[name].boards[board].distribution = state
        names = sorted({n for n, _ in pairs})
        for name in names:
            self.dispatcher.pump(name)
        return gather([self.registry.persist(n) for n in names])



def _settings(cfg: InferenceSettings) -> InferenceSettings:
    return cfg.replace(force_update=False)
