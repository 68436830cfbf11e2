"""The slow steps of the control plane, on worker threads.

Making, starting, stopping and removing containers on boards, reading their logs and
figures, copying files, and checking what a change needs before anything is stopped. A
step gets what it needs as arguments (an instance's ``spec`` and ``runtime``, which never
change) and never touches the router's state: its outcome goes back through the future
``submit`` returns, which the reconciler and the commands read on the router thread.

Progress: a step runs with the progress sink of the command it serves (if any) and the
board it works on, so an image transfer deep inside a runtime reports to the right client.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from infinibrain import protocol as P
from infinibrain.errors import InfinibrainException, make_error

from . import progress
from .boards import Board
from .runtimes.base import ContainerSpec, RunInfo, Runtime
from .settings import InferenceSettings

log = logging.getLogger(__name__)

WORKERS = 32  # boards are deployed in parallel: one worker per step under way


@dataclass
class Started:
    """What starting an instance gave: its process, what the deployment took, and the
    warm-up request to send it once it connects (None: it has none)."""

    info: RunInfo
    figures: dict = field(default_factory=dict)
    warmup: tuple[list, Any, dict, str] | None = None


class Operations:
    def __init__(self, fence: Callable[[], bool] | None = None) -> None:
        """``fence``: asked before each step; False (a group's leader that lost the lead)
        refuses it, so a deposed leader's workers leave the boards alone."""
        self.fence = fence
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="work")

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, fn: Callable[..., Any], *args: Any, sink: Callable[[dict], None] | None = None,
               board: str = "") -> concurrent.futures.Future:
        """Run ``fn(*args)`` on a worker, its progress going to ``sink`` for ``board``."""

        def step() -> Any:
            if self.fence is not None and not self.fence():
                raise make_error(309, "the cluster", detail="this manager no longer leads its group")
            with progress.reporting(sink), progress.on_board(board):
                return fn(*args)

        return self.pool.submit(step)


def gather(futures: list[concurrent.futures.Future]) -> concurrent.futures.Future:
    """A future of every result in order, done when all are; the first error (in order) if any."""
    out: concurrent.futures.Future = concurrent.futures.Future()
    if not futures:
        out.set_result([])
        return out
    left = [len(futures)]

    def one_done(_f: concurrent.futures.Future) -> None:
        left[0] -= 1
        if left[0]:
            return
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            out.set_exception(errors[0])
        else:
            out.set_result([f.result() for f in futures])

    for f in futures:
        f.add_done_callback(one_done)
    return out


# ---- steps (worker threads) -------------------------------------------------------------


def start(spec: ContainerSpec, runtime: Runtime, fresh: bool) -> Started:
    """Make (when ``fresh``, or when what it is made of is missing) and start a container."""
    started = time.monotonic()
    made = fresh or not runtime.prepared(spec)
    figures: dict = {}
    if made:
        progress.report("preparing")
        figures = runtime.prepare(spec) or {}
    warmup = load_warmup(spec.config)
    progress.report("starting")
    try:
        info = runtime.start(spec)
    except BaseException:
        if made:
            remove_quietly(spec, runtime)
        raise
    figures["start_seconds"] = round(time.monotonic() - started, 3)
    return Started(info, figures, warmup)


def restart(spec: ContainerSpec, runtime: Runtime) -> Started:
    """Stop (if it still runs) and start a container again, as it is."""
    runtime.stop(spec)
    return start(spec, runtime, fresh=False)


def stop(spec: ContainerSpec, runtime: Runtime, remove: bool) -> None:
    """Stop a container; with ``remove``, also delete what it was made of."""
    runtime.stop(spec)
    if remove:
        runtime.remove(spec)


def give_up(spec: ContainerSpec, runtime: Runtime, lines: int = 15) -> str:
    """Stop a container that failed (it may still run: not ready in time) and return the
    last lines of its log, for the error that names it."""
    try:
        runtime.stop(spec)
    except InfinibrainException as exc:
        log.warning("could not stop the failed container %s: %s", spec.container_id, exc.text)
    try:
        return runtime.logs(spec, lines)
    except InfinibrainException as exc:
        return f"(its log cannot be read: {exc.text})"


def remove_quietly(spec: ContainerSpec, runtime: Runtime) -> None:
    """Remove what a failed start made; the start's own error is the one to report."""
    try:
        runtime.remove(spec)
    except Exception as exc:
        log.warning("could not remove the failed container %s: %s", spec.container_id, exc)


def alive(spec: ContainerSpec, runtime: Runtime) -> bool:
    """Whether a container's process runs, asked of its board now (500 if it cannot be reached)."""
    return runtime.alive_now(spec)


def adopt(spec: ContainerSpec, runtime: Runtime, pid: int | None, pid_start: int | None) -> bool:
    """Whether a container an earlier manager left running is there (and now ours)."""
    try:
        return runtime.adopt(spec, pid, pid_start)
    except Exception as exc:  # e.g. the board's engine is down: start it again later
        log.error("cannot look for %s on %s: %s", spec.container_id, spec.board.name, exc)
        return False


def load_warmup(cfg: InferenceSettings) -> tuple[list, Any, dict, str] | None:
    """The warm-up request of a config: (payload, array description or None, param, module)."""
    warmup = cfg.warmup
    if not warmup:
        return None
    path = warmup["file"]
    try:
        if path.endswith(".npy"):
            array = np.ascontiguousarray(np.load(path, allow_pickle=False))
            payload: list = [array]
            arr = P.array_meta(array)
        else:
            with open(path, "rb") as fh:
                payload, arr = [fh.read()], None
    except (OSError, ValueError) as exc:
        raise make_error(302, detail=f"warmup file {path!r} cannot be read: {exc}") from None
    return payload, arr, dict(warmup.get("param") or {}), warmup.get("sub_inference_name") or ""


def check_board(board: Board, cfg: InferenceSettings) -> None:
    """What a change needs of one board, checked before anything is stopped: the board
    answers (its SSH connection, its Docker engine for docker/nvidia), and an image that
    the engine lacks can be loaded from a readable ``docker save`` tar."""
    if board.link is not None:
        board.link.client()  # 500 naming the board and the cause
    if cfg.implementation_type not in ("docker", "nvidia"):
        return
    tag = cfg.image_tag or ""  # validated: docker and nvidia need one
    with board.engine.errors(f"board {board.name!r}: checking image {tag}"):
        if board.engine.image(tag) is not None:
            return
    tar = cfg.image_file
    if tar is None:
        raise make_error(302, detail=f"board {board.name!r} has no image {tag!r}, and image_path/image_filename name no file to load it from")
    check_image_tar(tar)


def check_image_tar(path: str) -> None:
    """302 unless ``path`` is a readable ``docker save`` tar (it has a manifest.json)."""
    try:
        with tarfile.open(path) as tar:
            tar.getmember("manifest.json")
    except OSError as exc:
        raise make_error(302, detail=f"image file {path!r} cannot be opened on the main board: {exc.strerror or exc}") from None
    except KeyError:
        raise make_error(302, detail=f"image file {path!r} could not be loaded: it is not a docker save tar (no manifest.json)") from None
    except tarfile.TarError as exc:
        raise make_error(302, detail=f"image file {path!r} could not be loaded: it is not a docker save tar ({exc})") from None


def check_files(cfg: InferenceSettings) -> None:
    """The main board's files a change needs: script_path readable (every file), the warm-up."""
    root = cfg.script_path
    if root:
        for folder, _dirs, names in os.walk(root):
            for n in names:
                path = os.path.join(folder, n)
                if not os.access(path, os.R_OK):
                    raise make_error(302, detail=f"script_path file {path!r} cannot be read")
    load_warmup(cfg)
