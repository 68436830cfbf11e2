"""TOML files the command line reads (deployment files, image specs): one reader, with the
numbered errors that name the file.

Pure: the command's thread.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .errors import make_error

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def read_toml(path: Path) -> dict:
    """The file's tables: 301 if it cannot be read, 200 if it is not TOML."""
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        raise make_error(301, detail=f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise make_error(200, detail=f"{path} is not valid TOML: {exc}") from None
