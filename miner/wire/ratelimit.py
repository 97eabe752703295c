"""A token bucket that never waits: it says how long the caller would have to.

The daemon paces its polls with it (:class:`miner.daemon.pacing.TokenBucket` sleeps the
answer away) and the local coordinator enforces published per-client limits with one per
key (it turns the answer into ``429`` and ``Retry-After``). Imports nothing of ours.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """Holds at most ``capacity`` tokens, refilled evenly at ``rate_per_s``; starts full.

    Contract: :meth:`take` never blocks and never sleeps. ``clock`` is monotonic seconds
    (injectable for tests). Not thread-safe: callers on one event loop need no lock, others
    bring their own.
    """

    def __init__(self, capacity: float, rate_per_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not capacity >= 1 or not rate_per_s > 0:
            raise ValueError(
                f"a token bucket needs capacity >= 1 and rate_per_s > 0, got {capacity!r} and {rate_per_s!r}"
            )
        self.capacity = float(capacity)
        self.rate_per_s = float(rate_per_s)
        self._clock = clock
        self._tokens = self.capacity
        self._stamp = clock()

    def take(self) -> float | None:
        """Take one token: ``None`` when one was there, else the seconds until one will be."""
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate_per_s)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return None
        return (1.0 - self._tokens) / self.rate_per_s
