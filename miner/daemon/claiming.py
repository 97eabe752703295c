"""Claiming: one poll at a time per slot, paced so the coordinator is never hammered.

* A coordinator that long-polls holds an empty poll for about ``max_wait_seconds``; then
  the next poll goes out at once (no sleep of our own).
* One that answers 204 at once (the reference service) gets paced polling: the poll
  interval with jitter, doubling while the queue stays empty, up to the idle ceiling.
* A token bucket shared by every slot keeps the total under ``max_polls_per_minute``.
* 429 waits ``Retry-After``; errors back off exponentially with jitter.

:meth:`Claimer.wait_turn` (the pacing) may be cancelled at any time; :meth:`Claimer.poll`
is never cancelled on purpose, because an answered poll may carry an assignment.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from miner.daemon.client import AssignedJob, CoordinatorClient
from miner.daemon.pacing import Backoff, TokenBucket
from miner.wire.errors import AuthenticationFailed, CoordinatorError, NotRegistered, RateLimited

log = structlog.get_logger("miner.daemon.claiming")

AUTH_RETRY_S = 30.0
ERROR_BACKOFF_MAX_S = 15.0
# A 204 faster than this share of the wait asked for means "this coordinator does not long-poll".
LONG_POLL_HELD_SHARE = 0.5


@dataclass
class SlotPacing:
    """Per-slot pacing state: how long to wait before the next poll."""

    index: int
    idle_polls: int = 0
    wait_s: float = 0.0
    errors: Backoff | None = None  # set by the Claimer: starts at the poll interval


class Claimer:
    """Claims jobs for the slots of one miner (see the module docstring)."""

    def __init__(
        self,
        client: CoordinatorClient,
        *,
        long_poll_s: float,
        poll_interval_s: float,
        idle_backoff_max_s: float,
        max_polls_per_minute: int,
        slots: int,
        on_not_registered: Callable[[], None] | None = None,
        clock: Callable[[], float] | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.client = client
        self.long_poll_s = long_poll_s
        self.poll_interval_s = poll_interval_s
        self.idle_backoff_max_s = max(idle_backoff_max_s, poll_interval_s)
        loop_clock = clock or asyncio.get_running_loop().time
        # Bursts stay small so the total in any minute stays under the reference's 100.
        self.bucket = TokenBucket(max_polls_per_minute, capacity=max(1, min(slots, 5)), clock=loop_clock)
        self._clock = loop_clock
        self._rng = rng
        self._on_not_registered = on_not_registered
        self.polls = 0
        self.empty_polls = 0
        # How polls were answered: job | empty | rate_limited | not_registered | auth | error.
        self.answers: Counter[str] = Counter()

    def _jitter(self, seconds: float) -> float:
        return seconds * (0.8 + 0.4 * self._rng())

    def _idle_wait(self, slot: SlotPacing) -> float:
        slot.idle_polls += 1
        base = min(self.poll_interval_s * (2 ** min(slot.idle_polls - 1, 16)), self.idle_backoff_max_s)
        return self._jitter(base)

    def _wait_after(self, slot: SlotPacing, exc: CoordinatorError) -> float:
        """How long ``slot`` waits after a failed poll (429: Retry-After; errors: backoff)."""
        if isinstance(exc, RateLimited):
            wait = exc.retry_after * (1.0 + 0.1 * self._rng())  # spread the slots out
            log.warning("poll_rate_limited", slot=slot.index, retry_in_s=round(wait, 1))
            return wait
        if isinstance(exc, NotRegistered):
            if self._on_not_registered is not None:
                self._on_not_registered()
            return self.poll_interval_s
        if isinstance(exc, AuthenticationFailed):
            log.error("credentials_refused", error=str(exc), retry_in_s=AUTH_RETRY_S)
            return AUTH_RETRY_S
        if slot.errors is None:
            slot.errors = Backoff(self.poll_interval_s, max(ERROR_BACKOFF_MAX_S, self.poll_interval_s), rng=self._rng)
        wait = slot.errors.next_delay()
        log.warning("poll_failed", slot=slot.index, error=str(exc), retry_in_s=round(wait, 2))
        return wait

    async def claim(self, slot: SlotPacing) -> AssignedJob | None:
        """Wait as paced, poll once, and return the job or ``None``. Never raises a coordinator error."""
        await self.wait_turn(slot)
        return await self.poll(slot)

    async def wait_turn(self, slot: SlotPacing) -> None:
        """Sleep as paced and take a token. Safe to cancel: nothing has been asked yet."""
        if slot.wait_s > 0:
            await asyncio.sleep(slot.wait_s)
            slot.wait_s = 0.0
        await self.bucket.acquire()

    async def poll(self, slot: SlotPacing) -> AssignedJob | None:
        """One poll. Once sent, let it finish: the coordinator may already have assigned a job."""
        started = self._clock()
        self.polls += 1
        try:
            job = await self.client.poll(self.long_poll_s)
        except CoordinatorError as exc:
            self.answers[_answer_kind(exc)] += 1
            slot.wait_s = self._wait_after(slot, exc)
            return None
        if slot.errors is not None:
            slot.errors.reset()
        if job is not None:
            self.answers["job"] += 1
            slot.idle_polls = 0
            return job
        self.answers["empty"] += 1
        self.empty_polls += 1
        held = self._clock() - started
        if self.long_poll_s > 0 and held >= LONG_POLL_HELD_SHARE * self.long_poll_s:
            slot.idle_polls = 0  # a real long-poll already waited for us
        else:
            slot.wait_s = self._idle_wait(slot)
        return None


def _answer_kind(exc: CoordinatorError) -> str:
    """The ``answers`` key of a failed poll."""
    if isinstance(exc, RateLimited):
        return "rate_limited"
    if isinstance(exc, NotRegistered):
        return "not_registered"
    if isinstance(exc, AuthenticationFailed):
        return "auth"
    return "error"
