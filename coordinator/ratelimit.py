"""Rate limits: published per-client-key limits (token bucket) and the reference
service's per-IP, per-endpoint fixed windows (quirks mode)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from miner.wire.ratelimit import TokenBucket


@dataclass(frozen=True)
class ClientRateLimits:
    """Requests per ``window_s`` per client key, as published (status covers cancel,
    payment and receipts too; result is ``GET /v1/jobs/{id}/result``)."""

    submit: int = 100
    status: int = 1000
    result: int = 500
    window_s: float = 60.0

    def limit(self, category: str) -> int:
        return int(getattr(self, category))


class TokenBuckets:
    """One token bucket per key: ``limit`` tokens, refilled evenly over ``window_s``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

    def take(self, key: tuple[str, str], limit: int, window_s: float) -> float | None:
        """Take one token; ``None`` when allowed, else the seconds to wait for one."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(limit, limit / window_s, clock=self._clock)
        return bucket.take()


class FixedWindows:
    """Reference-service limiting: at most ``limit`` calls per key per window."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[tuple[str, str], tuple[float, int]] = {}

    def take(self, key: tuple[str, str], limit: int, window_s: float) -> bool:
        now = self._clock()
        start, count = self._windows.get(key, (now, 0))
        if now - start >= window_s:
            start, count = now, 0
        if count >= limit:
            self._windows[key] = (start, count)
            return False
        self._windows[key] = (start, count + 1)
        return True


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` in whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
