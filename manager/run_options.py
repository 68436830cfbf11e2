"""``run_option``: the ``docker run`` options of a ContainerConfig, as Docker SDK arguments.

The string is split like a shell would (``shlex``) but never given to one: each option
maps to an argument of ``containers.create``. Only the options people use on inference
boards are known; any other is refused with 302 naming it, so a typo or an option this
table does not know can never be dropped silently or reach a shell.

Pure: any thread.
"""
from __future__ import annotations

import os
import re
import shlex
from typing import Any, Callable

import docker.types

from infinibrain.errors import make_error


def _append(key: str, convert: Callable[[str], Any] = str) -> Callable[[dict, str], None]:
    def apply(kwargs: dict, value: str) -> None:
        kwargs.setdefault(key, []).append(convert(value))

    return apply


def _set(key: str, convert: Callable[[str], Any] = str) -> Callable[[dict, str], None]:
    def apply(kwargs: dict, value: str) -> None:
        kwargs[key] = convert(value)

    return apply


def _env(value: str) -> str:
    if "=" in value:
        return value
    # `-e NAME` passes the caller's value, as docker does; unset names are left out.
    if value in os.environ:
        return f"{value}={os.environ[value]}"
    raise ValueError(f"-e {value}: no value given and {value} is not set for the manager")


def _cpus(value: str) -> int:
    cpus = float(value)
    if cpus <= 0:
        raise ValueError("--cpus must be positive")
    return int(cpus * 1e9)


def _size(value: str) -> str:
    if not re.fullmatch(r"\d+(\.\d+)?[bkmgBKMG]?", value):
        raise ValueError(f"{value!r} is not a size such as 512m or 2g")
    return value


def _gpus(value: str) -> docker.types.DeviceRequest:
    """``--gpus all`` / ``--gpus 2`` / ``--gpus device=0,1`` / ``--gpus '"device=0,1"'``."""
    value = value.strip('"')
    if value == "all":
        return docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])
    if value.isdigit():
        return docker.types.DeviceRequest(count=int(value), capabilities=[["gpu"]])
    if value.startswith("device="):
        return docker.types.DeviceRequest(device_ids=value[len("device="):].split(","), capabilities=[["gpu"]])
    raise ValueError(f"--gpus {value!r}: use all, a count, or device=ID[,ID]")


# option -> (takes a value, how it lands in the create() arguments)
OPTIONS: dict[str, tuple[bool, Callable[[dict, str], None]]] = {
    "--env": (True, _append("environment", _env)),
    "--volume": (True, _append("volumes")),
    "--dns": (True, _append("dns")),
    "--network": (True, _set("network_mode")),
    "--shm-size": (True, _set("shm_size", _size)),
    "--cpus": (True, _set("nano_cpus", _cpus)),
    "--memory": (True, _set("mem_limit", _size)),
    "--device": (True, _append("devices")),
    "--gpus": (True, _append("device_requests", _gpus)),
    "--runtime": (True, _set("runtime")),
    "--ipc": (True, _set("ipc_mode")),
    "--privileged": (False, _set("privileged", lambda _: True)),
    "--workdir": (True, _set("working_dir")),
    "--user": (True, _set("user")),
    "--entrypoint": (True, _set("entrypoint", shlex.split)),
    # Restarts are the manager's own (manager/restarts.py), for every implementation type,
    # so that it knows and tells: the engine's restart policy is never set.
    "--restart": (True, lambda kwargs, value: None),
}
ALIASES = {
    "-e": "--env", "-v": "--volume", "--net": "--network", "-m": "--memory",
    "-w": "--workdir", "-u": "--user",
}


def parse_run_option(text: str | None) -> dict[str, Any]:
    """``run_option`` as keyword arguments of ``containers.create``; 302 names a bad option."""
    kwargs: dict[str, Any] = {}
    words = _words(text)
    i = 0
    while i < len(words):
        word = words[i]
        name, value = _split(word)
        option = ALIASES.get(name, name)
        if option not in OPTIONS:
            what = f"option {name!r} is not supported" if word.startswith("-") else f"{word!r} is not an option"
            raise make_error(302, detail=f"run_option: {what} (supported: {', '.join(sorted([*OPTIONS, *ALIASES]))})")
        takes_value, apply = OPTIONS[option]
        if takes_value and value is None:
            i += 1
            if i >= len(words):
                raise make_error(302, detail=f"run_option: {name} needs a value")
            value = words[i]
        elif not takes_value and value is not None:
            raise make_error(302, detail=f"run_option: {name} takes no value")
        try:
            apply(kwargs, value if value is not None else "")
        except ValueError as exc:
            raise make_error(302, detail=f"run_option: {name}: {exc}") from None
        i += 1
    return kwargs


def option_value(text: str | None, option: str) -> str | None:
    """The value ``text`` gives the value-taking ``option`` (the last one if repeated;
    None if absent), read by the same rules as ``parse_run_option``; 302 if it has none."""
    values = option_values(text, option)
    return values[-1] if values else None


def option_values(text: str | None, option: str) -> list[str]:
    """Every value ``text`` gives the value-taking ``option`` (or one of its short names),
    in order, read by the same rules as ``parse_run_option``; 302 if one has none."""
    names = {option, *(alias for alias, full in ALIASES.items() if full == option)}
    if not any(n in (text or "") for n in names):
        return []
    words = _words(text)
    values = []
    for i, word in enumerate(words):
        name, inline = _split(word)
        if ALIASES.get(name, name) != option:
            continue
        if inline is None:
            if i + 1 >= len(words):
                raise make_error(302, detail=f"run_option: {option} needs a value")
            inline = words[i + 1]
        values.append(inline)
    return values


def _words(text: str | None) -> list[str]:
    try:
        return shlex.split(text or "")
    except ValueError as exc:
        raise make_error(302, detail=f"run_option cannot be parsed: {exc}") from None


def _split(word: str) -> tuple[str, str | None]:
    """``--opt=value`` -> (--opt, value); ``-eX=1`` -> (-e, X=1); else (word, None)."""
    if word.startswith("--") and "=" in word:
        name, value = word.split("=", 1)
        return name, value
    if re.match(r"^-[a-zA-Z].", word) and not word.startswith("--"):
        return word[:2], word[2:].lstrip("=")
    return word, None
