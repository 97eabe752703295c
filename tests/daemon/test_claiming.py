"""Claim pacing: long-poll aware, idle backoff against a coordinator that answers at once, 429 waits."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx

from miner.daemon.claiming import Claimer, SlotPacing
from miner.daemon.client import CoordinatorClient


def _claimer(handler: Callable[[httpx.Request], Any], **kwargs: Any) -> Claimer:
    client = CoordinatorClient(
        "http://c.test", api_key="key-123456", miner_id="m", transport=httpx.MockTransport(handler)
    )
    options: dict[str, Any] = {
        "long_poll_s": 0.2,
        "poll_interval_s": 1.0,
        "idle_backoff_max_s": 8.0,
        "max_polls_per_minute": 6000,
        "slots": 1,
        "rng": lambda: 0.5,  # no jitter: 0.8 + 0.4 * 0.5 = 1.0
    }
    options.update(kwargs)
    return Claimer(client, **options)


def test_quick_empty_polls_are_paced_with_growing_idle_backoff() -> None:
    """A coordinator that answers 204 at once gets poll_interval, doubling up to the idle ceiling."""

    async def scenario() -> list[float]:
        claimer = _claimer(lambda r: httpx.Response(204))
        slot = SlotPacing(0)
        waits = []
        for _ in range(6):
            slot.wait_s = 0.0  # skip the sleep itself; we only read what the claimer decided
            assert await claimer.claim(slot) is None
            waits.append(slot.wait_s)
        await claimer.client.aclose()
        return waits

    assert asyncio.run(scenario()) == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_a_held_long_poll_is_not_followed_by_a_sleep() -> None:
    """After an empty long-poll the coordinator really held, the next poll goes out at once."""

    async def held(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.15)  # more than half of long_poll_s = 0.2
        return httpx.Response(204)

    async def scenario() -> float:
        claimer = _claimer(held)
        slot = SlotPacing(0, idle_polls=3)
        assert await claimer.claim(slot) is None
        await claimer.client.aclose()
        assert slot.idle_polls == 0
        return slot.wait_s

    assert asyncio.run(scenario()) == 0.0


def test_a_job_resets_the_idle_backoff() -> None:
    """Claiming a job clears the idle state so the next poll is immediate."""
    answers = iter(
        [httpx.Response(204), httpx.Response(200, json={"job_id": "j", "payload": {"model": "m", "prompt": "p"}})]
    )

    async def scenario() -> tuple[int, float]:
        claimer = _claimer(lambda r: next(answers))
        slot = SlotPacing(0)
        await claimer.claim(slot)
        slot.wait_s = 0.0
        assigned = await claimer.claim(slot)
        await claimer.client.aclose()
        assert assigned is not None and assigned.job_id == "j"
        return slot.idle_polls, slot.wait_s

    assert asyncio.run(scenario()) == (0, 0.0)


def test_429_waits_retry_after_and_errors_back_off() -> None:
    """429 sets the wait from Retry-After; server errors back off exponentially from the poll interval."""
    answers = iter([httpx.Response(429, headers={"Retry-After": "30"}), httpx.Response(500), httpx.Response(500)])

    async def scenario() -> list[float]:
        claimer = _claimer(lambda r: next(answers), rng=lambda: 0.0)
        slot = SlotPacing(0)
        waits = []
        await claimer.claim(slot)
        waits.append(slot.wait_s)
        claimer.client._blocked_until.clear()  # the test skips the 30 s wait itself
        for _ in range(2):
            slot.wait_s = 0.0
            await claimer.claim(slot)
            waits.append(slot.wait_s)
        await claimer.client.aclose()
        return waits

    assert asyncio.run(scenario()) == [30.0, 0.5, 1.0]
