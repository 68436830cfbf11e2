"""The registry: every loaded inference, kept as one inference config file (JSON) each.

This is the manager's desired state and the only state that survives a restart. A file is
written atomically (temporary file, fsync, rename, fsync of the folder), so a crash leaves
either the old or the new version, never half of one.

File ``<state_dir>/inferences/<name>.json``::

    {"format": 1, "name": "...", "config": {ContainerConfig attributes},
     "boards": {"<board>": {"distribution": "on", "running": true,
                            "pid": 1234, "pid_start": 98765, "created": "..."}}}
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from infinibrain.errors import InfinibrainException, make_error

from .validate import normalize_config

log = logging.getLogger(__name__)

FORMAT = 1


@dataclass
class Placement:
    """One inference on one board: what should be true there, and the process we run."""

    distribution: str = "on"
    running: bool = True
    pid: int | None = None
    pid_start: int | None = None
    created: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Registration:
    name: str
    config: dict
    boards: dict[str, Placement] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "name": self.name,
            "config": self.config,
            "boards": {b: p.to_dict() for b, p in self.boards.items()},
        }


class Registry:
    def __init__(self, state_dir: str | os.PathLike) -> None:
        self.dir = Path(state_dir) / "inferences"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(Path(state_dir), 0o700)

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def load_all(self) -> dict[str, Registration]:
        """Every readable registration; unreadable files are logged and left in place."""
        found: dict[str, Registration] = {}
        for path in sorted(self.dir.glob("*.json")):
            try:
                reg = self.read(path.stem)
            except InfinibrainException as exc:
                log.error("registry: skipping %s: %s", path, exc)
                continue
            found[reg.name] = reg
        return found

    def read(self, name: str) -> Registration:
        """The registration in ``name``'s file: 205 missing, 206 not JSON, 207 mismatch."""
        path = self.path(name)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise make_error(205, detail=str(path)) from None
        except OSError as exc:
            raise make_error(205, detail=f"{path}: {exc.strerror}") from None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise make_error(206, detail=f"{path}: {exc}") from None
        return self._parse(name, path, data)

    @staticmethod
    def _parse(name: str, path: Path, data: object) -> Registration:
        def mismatch(why: str) -> InfinibrainException:
            return make_error(207, detail=f"{path}: {why}")

        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise mismatch(f"not an inference config file of format {FORMAT}")
        if data.get("name") != name:
            raise mismatch(f"it names inference {data.get('name')!r}, expected {name!r}")
        config = data.get("config")
        if not isinstance(config, dict) or config.get("name") != name:
            raise mismatch("its config does not name the same inference")
        try:
            config = normalize_config(config)
        except InfinibrainException as exc:
            raise mismatch(f"its config is invalid ({exc.message})") from None
        boards = data.get("boards")
        if not isinstance(boards, dict):
            raise mismatch("'boards' is missing")
        placements = {}
        for board, raw in boards.items():
            if not isinstance(raw, dict) or raw.get("distribution") not in ("on", "off"):
                raise mismatch(f"board {board!r} entry is invalid")
            known = {k: raw[k] for k in Placement.__dataclass_fields__ if k in raw}
            placements[board] = Placement(**known)
        return Registration(name, config, placements)

    def save(self, reg: Registration) -> None:
        self.write_dict(reg.name, reg.to_dict())

    def write_dict(self, name: str, data: dict) -> None:
        atomic_write(self.path(name), json.dumps(data, indent=2, sort_keys=True))

    def remove(self, name: str) -> None:
        try:
            self.path(name).unlink()
        except FileNotFoundError:
            pass
        _fsync_dir(self.dir)


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
