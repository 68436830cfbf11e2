"""Restart on failure: the policy an inference asks for, and the backoff between tries.

The policy is the ``docker run`` option everyone knows, in ``run_option``, for every
implementation type: ``--restart no`` (the default) or ``--restart on-failure[:N]``
(at most N tries in a row; no N = no limit). The reconciler (manager/reconciler.py)
restarts a container whose process ended, or that stayed unhealthy, while it is wanted
running, after 0.5 s, 1 s, 2 s, ... (at most 30 s, with jitter); a container that then
runs for ``restart_stable_after_ms`` (10 s) starts from the first delay again. Each
restart, and giving up, reaches every client's manage callback with cmd "restart". A
container that is stopped or unloaded on purpose is never restarted.

Pure: the router thread (the reconciler).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from infinibrain.errors import make_error

from .run_options import option_value

FIRST_DELAY = 0.5
MAX_DELAY = 30.0


@dataclass(frozen=True)
class Policy:
    max_retries: int | None  # None: no limit


def policy_of(run_option: str | None) -> Policy | None:
    """The restart policy in an inference's ``run_option`` (None: no restarts); 302 for a bad one."""
    value = option_value(run_option, "--restart")
    if value is None or value == "no":
        return None
    kind, _, count = value.partition(":")
    if kind != "on-failure" or (count and not count.isdigit()):
        raise make_error(302, detail=f"run_option: --restart {value!r}: use no or on-failure[:N]")
    return Policy(int(count) if count else None)


class Backoff:
    """Delays that double from ``first`` to at most ``most``, with ±20 % jitter."""

    def __init__(self, first: float = FIRST_DELAY, most: float = MAX_DELAY) -> None:
        self.first, self.most = first, most
        self.tries = 0

    def next_delay(self) -> float:
        delay = min(self.first * 2 ** self.tries, self.most) * random.uniform(0.8, 1.2)
        self.tries += 1
        return delay

    def reset(self) -> None:
        self.tries = 0
