"""The shared token bucket: bursts, refill, the wait it reports, and bad arguments."""

from __future__ import annotations

import pytest

from miner.wire.ratelimit import TokenBucket


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_full_bucket_allows_a_burst_of_capacity_then_reports_the_wait() -> None:
    """A new bucket lets ``capacity`` takes through at once, then says how long until the next token."""
    clock = Clock()
    bucket = TokenBucket(3, 0.5, clock=clock)
    assert [bucket.take() for _ in range(3)] == [None, None, None]
    assert bucket.take() == pytest.approx(2.0)
    clock.now += 1.0
    assert bucket.take() == pytest.approx(1.0)  # half a token has come back, not a whole one
    clock.now += 1.0
    assert bucket.take() is None


def test_refill_never_exceeds_capacity() -> None:
    """However long the bucket sits idle, it holds at most ``capacity`` tokens."""
    clock = Clock()
    bucket = TokenBucket(2, 10.0, clock=clock)
    assert bucket.take() is None and bucket.take() is None
    clock.now += 3600.0
    assert bucket.take() is None and bucket.take() is None
    assert bucket.take() == pytest.approx(0.1)


def test_a_refused_take_costs_nothing() -> None:
    """Asking while empty does not borrow against the future: the reported wait stays honest."""
    clock = Clock()
    bucket = TokenBucket(1, 1.0, clock=clock)
    assert bucket.take() is None
    assert bucket.take() == pytest.approx(1.0)
    assert bucket.take() == pytest.approx(1.0)
    clock.now += 1.0
    assert bucket.take() is None


@pytest.mark.parametrize(("capacity", "rate"), [(0, 1.0), (0.5, 1.0), (1, 0.0), (1, -1.0), (float("nan"), 1.0)])
def test_bad_arguments_are_refused_with_their_values(capacity: float, rate: float) -> None:
    """A capacity below one or a rate that is not positive raises ValueError naming both values."""
    with pytest.raises(ValueError, match="capacity >= 1 and rate_per_s > 0"):
        TokenBucket(capacity, rate)
