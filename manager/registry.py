"""The registry: the manager's desired state, and the only state that survives a restart.

One inference config file (JSON) per inference says what should run: its settings and
their revision, the boards it is placed on, and for each board whether it should run and
receive requests. It also records the instances that run there (ids, pids), so that a
manager started again adopts them instead of starting duplicates. While a change rolls
out, ``stable`` keeps the settings that were last all ready, to go back to if the change
fails (even after a manager restart).

The registrations are kept in a store (manager/store.py): one file per inference in the
state_dir, written atomically, or a manager group's etcd, each write fenced by the
leader's term. One writer thread writes, in the order the router thread asked.

``<state_dir>/inferences/<name>.json`` (or etcd's ``<prefix>/inferences/<name>``)::

    {"format": 2, "name": "...", "revision": 3, "next_revision": 4,
     "config": {ContainerConfig attributes},
     "stable": null | {"revision": 2, "config": {...}},
     "boards": {"<board>": {"distribution": "on", "running": true,
                            "instances": [{"id": "<suffix>.r3", "revision": 3,
                                           "pid": 1234, "pid_start": 98765, "created": "..."}]}}}

Format 1 files (one unnamed instance per board, ``pid``/``pid_start`` on the board entry)
are read as revision 1 with an instance named as the container was.

What ``put_file`` gave an inference is kept beside it, in ``<state_dir>/files/<name>/``
(``rel/`` for targets relative to the container's working folder, ``abs/`` for absolute
ones), so that every container made later (a rolling restart, a new board) has it too.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import posixpath
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from infinibrain.errors import InfinibrainException, make_error

from .runtimes.hosts import copy_atomic
from .store import FileStore, Store
from .validate import normalize_config
from .settings import InferenceSettings

log = logging.getLogger(__name__)

FORMAT = 2


@dataclass
class InstanceRecord:
    """What runs (or ran) for a placement: enough to find it again after a restart."""

    id: str
    revision: int
    pid: int | None = None
    pid_start: int | None = None
    created: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Placement:
    """One inference on one board: what should be true there, and what runs there."""

    distribution: str = "on"
    running: bool = True
    instances: list[InstanceRecord] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"distribution": self.distribution, "running": self.running,
                "instances": [i.to_dict() for i in self.instances]}

    @property
    def created(self) -> str:
        return self.instances[-1].created if self.instances else ""


@dataclass
class Stable:
    """The settings that were last ready everywhere, kept while a change rolls out."""

    revision: int
    config: InferenceSettings


@dataclass
class Registration:
    name: str
    config: InferenceSettings
    boards: dict[str, Placement] = field(default_factory=dict)
    revision: int = 1
    next_revision: int = 2
    stable: Stable | None = None

    def new_revision(self) -> int:
        """A revision number never used before for this inference."""
        self.revision, self.next_revision = self.next_revision, self.next_revision + 1
        return self.revision

    def config_of(self, revision: int) -> InferenceSettings | None:
        """The settings of ``revision`` if the registration still knows them."""
        if revision == self.revision:
            return self.config
        if self.stable is not None and revision == self.stable.revision:
            return self.stable.config
        return None

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "name": self.name,
            "revision": self.revision,
            "next_revision": self.next_revision,
            "config": self.config.to_dict(),
            "stable": None if self.stable is None else {"revision": self.stable.revision, "config": self.stable.config.to_dict()},
            "boards": {b: p.to_dict() for b, p in self.boards.items()},
        }


class Registry:
    """The registrations (read and changed on the router thread), kept in a ``Store``: the
    state_dir's files, or a manager group's etcd (manager/store.py)."""

    def __init__(self, state_dir: str | os.PathLike, store: Store | None = None) -> None:
        self.store = store or FileStore(Path(state_dir))
        self.files = Overlay(Path(state_dir) / "files")
        self.registrations: dict[str, Registration] = {}
        # Image tags the manager brought to each board (loaded from a tar, or pulled): the only
        # ones delete_image removes again (never one built or put there by someone else).
        self.brought: dict[str, set[str]] = self.store.read_brought()
        self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry")
        # Names whose last write failed: added by the writer thread, taken by the router thread.
        self._unwritten: set[str] = set()

    def close(self) -> None:
        self._writer.shutdown(wait=True)

    def registered(self, name: str) -> Registration:
        """The registration of ``name`` (router thread); 300 if there is none."""
        reg = self.registrations.get(name)
        if reg is None:
            raise make_error(300, detail=f"inference {name!r}")
        return reg

    # ---- router thread ------------------------------------------------------------

    def persist(self, name: str) -> concurrent.futures.Future:
        """Write ``name``'s registration as it is now (or delete it if it is gone). A write
        the store does not take (a group's etcd without quorum) is done again by
        ``write_again`` until it is taken, so what runs is never left unrecorded."""
        reg = self.registrations.get(name)
        # The snapshot is taken now, on the router thread, so the writes keep their order.
        fut = (self._writer.submit(self.store.remove, name) if reg is None
               else self._writer.submit(self.store.write, name, reg.to_dict()))
        fut.add_done_callback(lambda f: self._failed(f, name))
        return fut

    def _failed(self, fut: concurrent.futures.Future, name: str) -> None:
        if fut.exception() is not None:  # the writer thread: a set's add is one step
            self._unwritten.add(name)

    def write_again(self, now: float = 0.0) -> None:
        """Persist again what the store did not take (a loop timer on the router thread)."""
        names, self._unwritten = self._unwritten, set()  # a name failing again waits for the next call
        for name in sorted(names):
            self.persist(name)

    def bring(self, board: str, tag: str, brought: bool = True) -> None:
        """Record that the manager brought ``tag`` to ``board`` (or, ``brought=False``, that it is gone)."""
        tags = self.brought.setdefault(board, set())
        if (tag in tags) != brought:
            tags.add(tag) if brought else tags.discard(tag)
            self._writer.submit(self.store.write_brought, {b: sorted(t) for b, t in self.brought.items() if t})

    # ---- any thread -----------------------------------------------------------------

    def load_all(self) -> dict[str, Registration]:
        """Every readable registration; unreadable ones are logged and left in place."""
        found: dict[str, Registration] = {}
        for name, where, text in self.store.load_all():
            try:
                reg = _parsed(name, where, text)
            except InfinibrainException as exc:
                log.error("registry: skipping %s: %s", where, exc)
                continue
            found[reg.name] = reg
        return found

    def read(self, name: str) -> Registration:
        """The registration stored for ``name``: 205 missing, 206 not JSON, 207 mismatch."""
        where, text = self.store.read(name)
        return _parsed(name, where, text)


def _parsed(name: str, where: str, text: str) -> Registration:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise make_error(206, detail=f"{where}: {exc}") from None
    return parse(name, Path(where), data)


def parse(name: str, path: Path, data: object) -> Registration:
    """A registration from a file's JSON (format 1 or 2); 207 naming what does not fit."""

    def mismatch(why: str) -> InfinibrainException:
        return make_error(207, detail=f"{path}: {why}")

    if not isinstance(data, dict) or data.get("format") not in (1, FORMAT):
        raise mismatch(f"not an inference config file of format 1 or {FORMAT}")
    if data.get("name") != name:
        raise mismatch(f"it names inference {data.get('name')!r}, expected {name!r}")

    def settings(raw: object, where: str) -> InferenceSettings:
        if not isinstance(raw, dict) or raw.get("name") != name:
            raise mismatch(f"its {where} does not name the same inference")
        try:
            return normalize_config(raw)
        except InfinibrainException as exc:
            raise mismatch(f"its {where} is invalid ({exc.text})") from None

    config = settings(data.get("config"), "config")
    legacy = data["format"] == 1
    revision = 1 if legacy else data.get("revision")
    if not isinstance(revision, int) or revision < 1:
        raise mismatch("'revision' must be a positive integer")
    next_revision = data.get("next_revision", revision + 1)
    if not isinstance(next_revision, int) or next_revision <= revision:
        next_revision = revision + 1
    stable = None
    raw_stable = data.get("stable")
    if raw_stable is not None:
        if not isinstance(raw_stable, dict) or not isinstance(raw_stable.get("revision"), int):
            raise mismatch("'stable' is invalid")
        stable = Stable(raw_stable["revision"], settings(raw_stable.get("config"), "stable config"))
        next_revision = max(next_revision, stable.revision + 1)
    boards = data.get("boards")
    if not isinstance(boards, dict):
        raise mismatch("'boards' is missing")
    placements = {}
    for board, raw in boards.items():
        if not isinstance(raw, dict) or raw.get("distribution") not in ("on", "off"):
            raise mismatch(f"board {board!r} entry is invalid")
        if legacy:  # one container per board, named as the suffix
            records = [{"id": f"{name}-{board}", "revision": 1, "pid": raw.get("pid"),
                        "pid_start": raw.get("pid_start"), "created": raw.get("created") or ""}]
        else:
            records = raw.get("instances") or []
        instances = [i for i in map(_record, records) if i is not None]
        if len(instances) != len(records):
            raise mismatch(f"board {board!r}: its instances are invalid")
        placements[board] = Placement(raw["distribution"], bool(raw.get("running", True)), instances)
    return Registration(name, config, placements, revision, next_revision, stable)


def _record(raw: object) -> InstanceRecord | None:
    """One instance of a file, None if it is not one."""
    if not isinstance(raw, dict) or not isinstance(raw.get("id"), str) or not isinstance(raw.get("revision"), int):
        return None
    pid, start = raw.get("pid"), raw.get("pid_start")
    return InstanceRecord(raw["id"], raw["revision"], pid if isinstance(pid, int) else None,
                          start if isinstance(start, int) else None, str(raw.get("created") or ""))


class Overlay:
    """The files put_file gave each inference, laid over its script_path in new containers."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def of(self, name: str) -> Path | None:
        folder = self.root / name
        return folder if folder.is_dir() else None

    def add(self, name: str, source: str, target_dir: str) -> None:
        """Keep ``source`` as ``target_dir/<its name>`` (worker threads: it may be large)."""
        part = "abs" if target_dir.startswith("/") else "rel"
        inside = posixpath.normpath(posixpath.join(target_dir.lstrip("/") or ".", os.path.basename(source)))
        if inside.startswith(".."):
            raise make_error(302, detail=f"path {target_dir!r} points outside the container")
        copy_atomic(source, str(self.root / name / part / inside), mode=0o700)

    def drop(self, name: str) -> None:
        shutil.rmtree(self.root / name, ignore_errors=True)
