"""Pacing primitives: jittered exponential backoff, bounded retries, and a token bucket.

Nothing here sleeps with ``time.sleep``: waiting is ``asyncio.sleep`` (or an injected
``sleep`` for tests), so callers never block the event loop.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from miner.wire import ratelimit
from miner.wire.errors import CoordinatorUnavailable, RateLimited

log = structlog.get_logger("miner.daemon.pacing")

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]


class Backoff:
    """Exponential backoff with "equal jitter": each delay is in ``[d/2, d]`` where ``d``
    doubles from ``base_s`` up to ``max_s``. ``reset()`` after a success.
    """

    def __init__(self, base_s: float = 0.5, max_s: float = 30.0, *, rng: Callable[[], float] = random.random) -> None:
        if base_s <= 0 or max_s < base_s:
            raise ValueError("need 0 < base_s <= max_s")
        self.base_s = base_s
        self.max_s = max_s
        self._rng = rng
        self.failures = 0

    def next_delay(self) -> float:
        ceiling = min(self.max_s, self.base_s * (2.0 ** min(self.failures, 32)))
        self.failures += 1
        return ceiling / 2 + self._rng() * ceiling / 2

    def reset(self) -> None:
        self.failures = 0


async def retry(
    call: Callable[[], Awaitable[T]],
    *,
    what: str,
    attempts: int = 5,
    backoff: Backoff | None = None,
    max_retry_after_s: float = 300.0,
    sleep: Sleep = asyncio.sleep,
) -> T:
    """Await ``call()`` up to ``attempts`` times.

    Transient failures (:class:`CoordinatorUnavailable`) wait a jittered backoff; a
    :class:`RateLimited` answer waits its ``retry_after`` (capped at ``max_retry_after_s``).
    Every retry logs the attempts left. Any other error, or the last failure, propagates.
    """
    backoff = backoff or Backoff()
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except (CoordinatorUnavailable, RateLimited) as exc:
            left = attempts - attempt
            if left <= 0:
                raise
            delay = min(exc.retry_after, max_retry_after_s) if isinstance(exc, RateLimited) else backoff.next_delay()
            log.warning(
                "coordinator_call_failed",
                call=what,
                error=str(exc),
                attempts_left=left,
                retry_in_s=round(delay, 2),
            )
            await sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


class TokenBucket:
    """At most ``rate_per_minute`` acquisitions per minute on average, bursts up to ``capacity``.

    Shared by every claim loop so the total poll rate stays under the coordinator's limit
    however many slots there are. The arithmetic is :class:`miner.wire.ratelimit.TokenBucket`;
    this adds the waiting, first come first served. ``clock`` is monotonic seconds and
    ``sleep`` the wait (both injectable for tests).
    """

    def __init__(
        self,
        rate_per_minute: float,
        capacity: float = 1.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if rate_per_minute <= 0 or capacity < 1:
            raise ValueError("need rate_per_minute > 0 and capacity >= 1")
        self._bucket = ratelimit.TokenBucket(capacity, rate_per_minute / 60.0, clock=clock)
        self._sleep = sleep
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        """Wait until a token is available and take it (first come, first served)."""
        async with self._lock:
            while (wait := self._bucket.take()) is not None:
                await self._sleep(wait)
