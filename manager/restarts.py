"""Restart on failure: an inference may ask the manager to start its containers again
when their process ends by itself.

The policy is the ``docker run`` option everyone knows, in ``run_option``, for every
implementation type: ``--restart no`` (the default) or ``--restart on-failure[:N]``
(at most N tries in a row; no N = no limit). A container whose process exits while it is
wanted running is started again after 0.5 s, 1 s, 2 s, ... (at most 30 s, with jitter);
a container that then runs for 10 s starts from the first delay again. Each restart, and
giving up, reaches every client's manage callback with cmd "restart". A container that is
stopped or unloaded on purpose is never restarted.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from infinibrain.errors import InfinibrainException, make_error

from .runtimes.run_options import option_value

if TYPE_CHECKING:
    from .state import Container

log = logging.getLogger(__name__)

FIRST_DELAY = 0.5
MAX_DELAY = 30.0
STABLE_AFTER = 10.0  # seconds of running that count as recovered (as Docker counts)
BUSY_RETRY = 1.0  # a management command holds the inference: look again after this


@dataclass(frozen=True)
class Policy:
    max_retries: int | None  # None: no limit


def policy_of(cfg: dict) -> Policy | None:
    """The restart policy in ``cfg``'s run_option (None: no restarts); 302 for a bad one."""
    value = option_value(cfg.get("run_option"), "--restart")
    if value is None or value == "no":
        return None
    kind, _, count = value.partition(":")
    if kind != "on-failure" or (count and not count.isdigit()):
        raise make_error(302, detail=f"run_option: --restart {value!r}: use no or on-failure[:N]")
    return Policy(int(count) if count else None)


class Restarts:
    """Watches for container exits (router thread) and restarts on worker threads, holding
    the inference like a management command so the two never overlap."""

    def __init__(self, router, deployer, commands) -> None:
        self.router = router
        self.deployer = deployer
        self.commands = commands
        self.tries: dict[str, int] = {}  # container id -> restarts in a row
        self.started: dict[str, float] = {}  # container id -> when we last restarted it
        router.on_exit.append(self._on_exit)

    # ---- router thread ---------------------------------------------------------------

    def _wanted(self, name: str, board: str) -> dict | None:
        reg = self.router.registrations.get(name)
        placement = reg.boards.get(board) if reg is not None else None
        return reg.config if placement is not None and placement.running else None

    def _on_exit(self, c: Container, code: int) -> None:
        if c.stopping or c.inference in self.commands.busy:
            return  # on purpose, or a command (or a restart) already deals with it
        cfg = self._wanted(c.inference, c.board)
        if cfg is None:
            return
        try:
            policy = policy_of(cfg)
        except InfinibrainException:
            return
        if policy is None:
            return
        last = self.started.get(c.id)
        if last is not None and time.monotonic() - last > STABLE_AFTER:
            self.tries[c.id] = 0  # it had recovered: this is a new failure, not the same one
        self._schedule(c.id, c.inference, c.board, policy, f"exit status {code}")

    def _schedule(self, cid: str, name: str, board: str, policy: Policy, why: str) -> None:
        tries = self.tries.get(cid, 0)
        if policy.max_retries is not None and tries >= policy.max_retries:
            log.error("container %s: not restarted again after %d tries (%s)", cid, tries, why)
            self._tell(302, f"container {cid} of {name} was not restarted: {tries} tries failed ({why})", cid, name, board, tries)
            return
        delay = min(FIRST_DELAY * 2 ** tries, MAX_DELAY) * random.uniform(0.8, 1.2)
        self.tries[cid] = tries + 1
        log.warning("container %s ended (%s); restarting it in %.1f s (try %d)", cid, why, delay, tries + 1)
        self.router.call_later(delay, self._begin, cid, name, board, policy)

    def _begin(self, cid: str, name: str, board: str, policy: Policy) -> None:
        if self._wanted(name, board) is None:
            return  # unloaded or stopped meanwhile
        if name in self.commands.busy:
            self.router.call_later(BUSY_RETRY, self._begin, cid, name, board, policy)
            return
        self.commands.busy.add(name)
        self.commands.pool.submit(self._run, cid, name, board, policy)

    def _done(self, cid: str, name: str, board: str, policy: Policy, error: InfinibrainException | None) -> None:
        self.commands.busy.discard(name)
        if error is None:
            self.started[cid] = time.monotonic()
            tries = self.tries.get(cid, 1)
            log.info("container %s restarted (try %d)", cid, tries)
            self._tell(0, f"container {cid} of {name} restarted (try {tries})", cid, name, board, tries)
        elif self._wanted(name, board) is not None:
            self._schedule(cid, name, board, policy, error.message)

    def _tell(self, code: int, message: str, cid: str, name: str, board: str, tries: int) -> None:
        info = {"inference_name": name, "suffix_name": cid, "coprocessor": board, "tries": tries}
        self.router.announce(code, info=info, what="restart", message=message)

    # ---- worker thread ---------------------------------------------------------------

    def _run(self, cid: str, name: str, board: str, policy: Policy) -> None:
        error = None
        try:
            self.deployer.launch(name, board, rebuild=False)
        except InfinibrainException as exc:
            error = exc
        except Exception as exc:  # never let a restart die silently
            log.exception("restarting %s failed", cid)
            error = make_error(999, detail=f"{type(exc).__name__}: {exc}")
        self.router.call_soon(self._done, cid, name, board, policy, error)
