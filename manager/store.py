"""Where the registry keeps its registrations: a ``Store``. ``FileStore``: one JSON file
per inference in ``<state_dir>/inferences/`` and ``images.json`` (a single manager, the
default); ``EtcdStore``: the same texts as keys of a manager group's etcd, each write
fenced by the leader's term (manager/group.py).

The files are written atomically (temporary file, fsync, rename, fsync of the folder), so
a crash leaves either the old or the new version of a file, never half of one.

The registry's writer thread writes, in the order the router thread asked; reading is
done at start-up (``load_all``) or by a command (``read``).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator, Protocol

from infinibrain.errors import make_error

log = logging.getLogger(__name__)


class Store(Protocol):
    def load_all(self) -> Iterator[tuple[str, str, str]]:
        """(name, where it is kept, its text) of every registration stored."""

    def read(self, name: str) -> tuple[str, str]:
        """(where, text) of ``name``'s registration; 205 when there is none."""

    def write(self, name: str, data: dict) -> None: ...

    def remove(self, name: str) -> None: ...

    def read_brought(self) -> dict[str, set[str]]: ...

    def write_brought(self, brought: dict[str, list[str]]) -> None: ...


def _text(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True)


def _brought(text: str | bytes) -> dict[str, set[str]]:
    try:
        data = json.loads(text)
        return {b: set(t) for b, t in data.items() if isinstance(t, list)}
    except (ValueError, AttributeError):
        return {}


class FileStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "inferences"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(state_dir, 0o700)
        self.brought_path = state_dir / "images.json"

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def load_all(self) -> Iterator[tuple[str, str, str]]:
        for path in sorted(self.dir.glob("*.json")):
            try:
                yield path.stem, str(path), path.read_text()
            except OSError as exc:
                log.error("registry: skipping %s: %s", path, exc.strerror)

    def read(self, name: str) -> tuple[str, str]:
        path = self.path(name)
        try:
            return str(path), path.read_text()
        except FileNotFoundError:
            raise make_error(205, detail=str(path)) from None
        except OSError as exc:
            raise make_error(205, detail=f"{path}: {exc.strerror}") from None

    def write(self, name: str, data: dict) -> None:
        atomic_write(self.path(name), _text(data))

    def remove(self, name: str) -> None:
        try:
            self.path(name).unlink()
        except FileNotFoundError:
            pass
        _fsync_dir(self.dir)

    def read_brought(self) -> dict[str, set[str]]:
        try:
            return _brought(self.brought_path.read_text())
        except OSError:
            return {}

    def write_brought(self, brought: dict[str, list[str]]) -> None:
        atomic_write(self.brought_path, json.dumps(brought, indent=2, sort_keys=True))


class EtcdStore:
    """A manager group's registry: ``<prefix>/inferences/<name>`` and ``<prefix>/images``.
    A write that etcd does not take (no quorum, fenced) raises: the command that made the
    change hears it."""

    def __init__(self, writer, reader) -> None:  # manager.group.Writer: one for the writer thread, one for reads
        self.writer, self.reader = writer, reader

    def load_all(self) -> Iterator[tuple[str, str, str]]:
        for kv in self.reader.load("inferences/", prefix=True):
            yield kv["key"].rsplit("/", 1)[-1], f"etcd {kv['key']}", kv["value"].decode()

    def read(self, name: str) -> tuple[str, str]:
        found = self.reader.load(f"inferences/{name}")
        if not found:
            raise make_error(205, detail=f"etcd {self.reader.group.key('inferences', name)}")
        return f"etcd {found[0]['key']}", found[0]["value"].decode()

    def write(self, name: str, data: dict) -> None:
        self.writer.put(f"inferences/{name}", _text(data))

    def remove(self, name: str) -> None:
        self.writer.delete(f"inferences/{name}")

    def read_brought(self) -> dict[str, set[str]]:
        found = self.reader.load("images")
        return _brought(found[0]["value"]) if found else {}

    def write_brought(self, brought: dict[str, list[str]]) -> None:
        self.writer.put("images", json.dumps(brought, sort_keys=True))


def atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
