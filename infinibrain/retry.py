"""Retries with exponential backoff and jitter, for calls that are safe to repeat.

``AICluster(..., retry=RetryPolicy())`` turns them on for the synchronous and ``_future``
forms (the reference's ``_async`` forms report every outcome as it is). What may be
repeated:

- any management call refused with 309 (the manager did nothing: another command held
  the inference);
- queries and distribution switches (``Call.safe``) also on 111 (not connected: the SDK
  reconnects by itself) and 500 (a board's SSH link was down);
- inference, only with ``inference=True``, and only on 305, 306 and 111: the request
  never reached a container, so it cannot run twice. After a 305 it waits at least the
  ``retry_after`` the manager named (up to ``max_backoff``).

Pure: the calling thread waits between attempts (a ``_future`` call's next attempt starts on a timer thread).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

ALWAYS = frozenset({309})
SAFE = frozenset({111, 309, 500})
INFERENCE = frozenset({111, 305, 306})


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry: ``attempts`` in all (1 = no retry), waiting
    ``backoff`` s, then twice that each time up to ``max_backoff``, each wait scaled by a
    random factor in [1 - jitter, 1 + jitter]."""

    attempts: int = 4
    backoff: float = 0.2
    max_backoff: float = 5.0
    jitter: float = 0.5
    inference: bool = False
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff < 0 or self.max_backoff < 0 or not 0 <= self.jitter <= 1:
            raise ValueError("RetryPolicy: attempts >= 1, backoff and max_backoff >= 0, 0 <= jitter <= 1")

    def retries(self, code: int, attempt: int, kind: str) -> bool:
        """Whether attempt number ``attempt`` (1-based) that ended with ``code`` may be
        repeated; ``kind`` is "safe", "unsafe" or "infer"."""
        if attempt >= self.attempts:
            return False
        if kind == "infer":
            return self.inference and code in INFERENCE
        return code in (SAFE if kind == "safe" else ALWAYS)

    def may_retry(self, kind: str) -> bool:
        """Whether any outcome of a call of ``kind`` could be repeated."""
        return self.attempts > 1 and (kind != "infer" or self.inference)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after attempt number ``attempt``."""
        base = min(self.backoff * 2 ** (attempt - 1), self.max_backoff)
        return base * self.rng.uniform(1 - self.jitter, 1 + self.jitter)

    def pause(self, attempt: int, error: Exception) -> float:
        """Seconds to wait after attempt number ``attempt`` ended with ``error``: the
        backoff, or the ``retry_after`` a full queue named if that is longer (up to
        ``max_backoff``)."""
        hint = getattr(error, "retry_after", None)
        delay = self.delay(attempt)
        return max(delay, min(hint, self.max_backoff)) if isinstance(hint, (int, float)) else delay


NO_RETRY = RetryPolicy(attempts=1)

__all__ = ["NO_RETRY", "RetryPolicy"]
