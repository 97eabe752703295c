"""The one stop-condition rule every runner uses: shutdown, then cancel, then deadline."""

from __future__ import annotations

import time

import pytest

from miner.wire.errors import ErrorCode, JobError
from runners.base import Job, stop_error
from runners.params import parse_text_payload


def _job(deadline: float | None = None) -> Job:
    return Job("j1", parse_text_payload({"model": "m", "prompt": "p"}), deadline=deadline)


def test_a_running_job_has_no_stop_error() -> None:
    """A job neither cancelled nor past its deadline may go on, and raise_if_stopped is silent."""
    job = _job(deadline=time.monotonic() + 3600)
    assert stop_error(job) is None
    job.raise_if_stopped()


def test_shutdown_wins_over_cancel_and_cancel_over_deadline() -> None:
    """The code says the most specific reason: SHUTDOWN, else CANCELLED, else DEADLINE_EXCEEDED."""
    job = _job(deadline=time.monotonic() - 1)
    assert (err := stop_error(job)) is not None and err.code == ErrorCode.DEADLINE_EXCEEDED
    job.cancel()
    assert (err := stop_error(job)) is not None and err.code == ErrorCode.CANCELLED
    assert (err := stop_error(job, closing=True)) is not None and err.code == ErrorCode.SHUTDOWN


def test_raise_if_stopped_raises_the_same_error() -> None:
    """Job.raise_if_stopped raises exactly what stop_error returns, message included."""
    job = _job(deadline=time.monotonic() - 1)
    with pytest.raises(JobError) as raised:
        job.raise_if_stopped()
    assert (raised.value.code, raised.value.message) == (
        ErrorCode.DEADLINE_EXCEEDED,
        "the job passed its deadline (TTL) while running",
    )


def test_the_deadline_message_says_what_the_job_was_doing() -> None:
    """``during`` ends the DEADLINE_EXCEEDED message so a runner can say where time ran out."""
    err = stop_error(_job(deadline=time.monotonic() - 1), during="while the engine was generating")
    assert err is not None and err.message == "the job passed its deadline (TTL) while the engine was generating"
