"""Placements as they run: a ``Slot`` per inference and board, and the ``Change`` a command waits on.

A placement (an inference on a board; the reference's ContainerHandler) runs one instance
per revision (manager/state.py); the control plane keeps, for each, the slow step under
way there, its restart backoff and the command's change it belongs to.

Router thread (data only).
"""
from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field
from typing import Callable

from infinibrain.errors import InfinibrainException

from .restarts import Backoff
from .state import Instance

STEP_RETRY_FIRST, STEP_RETRY_MAX = 1.0, 30.0  # a failed stop or remove is tried again, backing off


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
    started: float = 0.0  # on the control plane's clock: set when it is watched (Rollouts.watch)
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

    def at(self, revision: int) -> Instance | None:
        """Its instance at ``revision``, if it has one."""
        return next((i for i in self.instances.values() if i.revision == revision), None)

    def only(self) -> Instance | None:
        """Its one instance, if it has exactly one."""
        return next(iter(self.instances.values())) if len(self.instances) == 1 else None


class Slots(dict[tuple[str, str], Slot]):
    """Every placement's slot, by (inference, board)."""

    def of(self, name: str, board: str) -> Slot:
        """The slot of ``name`` on ``board``, made if there is none."""
        key = (name, board)
        found = self.get(key)
        if found is None:
            found = self[key] = Slot(name, board)
        return found

    def instances_of(self, name: str) -> list[Instance]:
        return [i for s in self.values() if s.name == name for i in s.instances.values()]

    def stepping(self) -> set[str]:
        """The instances a step is starting or stopping now (by id)."""
        return {s.busy_with for s in self.values() if s.busy_with}
