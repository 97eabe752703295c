"""Reference-quirks mode reproduces the reference service's behaviour (docs/protocol.md, section 4)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.client import Client
from coordinator.quirks import MinerRateLimits
from tests.coordinator.helpers import ScriptedMiner
from tests.servers import RunningCoordinator, run_coordinator

PAYLOAD = {"model": "tiny", "prompt": "hello"}


@pytest.fixture
def reference(tmp_path: Path) -> Iterator[RunningCoordinator]:
    with run_coordinator(tmp_path / "ref.db", rate_limits=None, quirks="reference") as running:
        yield running


@pytest.fixture
def client(reference: RunningCoordinator) -> Iterator[Client]:
    with Client(reference.url, reference.client_key) as c:
        yield c


def test_poll_ignores_max_wait(reference: RunningCoordinator) -> None:
    """An empty poll answers 204 at once, however long max_wait_seconds asks to wait."""
    with ScriptedMiner(reference) as miner:
        miner.register()
        started = time.monotonic()
        assert miner.poll(20).status_code == 204
        assert time.monotonic() - started < 10, "the poll was held: reference mode must not long-poll"


def test_fail_keeps_the_slot_until_a_heartbeat_reports_it(reference: RunningCoordinator, client: Client) -> None:
    """After /fail a concurrency-1 miner gets 204 until a heartbeat overwrites its in-flight count."""
    first, second = (client.submit_job(PAYLOAD)["job_id"] for _ in range(2))
    with ScriptedMiner(reference) as miner:
        miner.register(concurrency=1)
        assert miner.claim(0)["job_id"] == first
        assert miner.fail(first, "RUNNER_ERROR", "boom").status_code == 200
        assert client.get_job(first)["error"] == "boom"
        assert miner.poll(0).status_code == 204
        assert miner.heartbeat(inflight=0).json() == {"status": "ok"}
        assert miner.claim(0)["job_id"] == second


def test_heartbeat_overwrites_inflight(reference: RunningCoordinator, client: Client) -> None:
    """A heartbeat reporting 0 in flight lets a busy concurrency-1 miner claim another job."""
    ids = [client.submit_job(PAYLOAD)["job_id"] for _ in range(2)]
    with ScriptedMiner(reference) as miner:
        miner.register(concurrency=1)
        assert miner.claim(0)["job_id"] == ids[0]
        assert miner.poll(0).status_code == 204
        miner.heartbeat(inflight=0)
        assert miner.claim(0)["job_id"] == ids[1]


def test_cancel_is_canceled_and_not_told_to_the_miner(reference: RunningCoordinator, client: Client) -> None:
    """Cancel spells CANCELED and clears the assignment; the heartbeat has no cancelled_jobs; a late result wins."""
    job_id = client.submit_job(PAYLOAD)["job_id"]
    with ScriptedMiner(reference) as miner:
        miner.register()
        miner.claim(0)
        answer = client.cancel_job(job_id)
        assert answer["state"] == "CANCELED" and answer["assigned_miner_id"] is None
        assert "cancelled_jobs" not in miner.heartbeat().json()
        assert miner.result(job_id).status_code == 200
    assert client.get_job(job_id)["state"] == "COMPLETED"


def test_no_ownership_checks(reference: RunningCoordinator, client: Client) -> None:
    """Another miner's result is accepted, and /fail on a completed job turns it FAILED."""
    job_id = client.submit_job(PAYLOAD)["job_id"]
    with ScriptedMiner(reference, "rig-01") as holder, ScriptedMiner(reference, "rig-02") as other:
        holder.register()
        other.register()
        holder.claim(0)
        assert other.result(job_id).status_code == 200
        assert client.get_job(job_id)["state"] == "COMPLETED"
        assert holder.fail(job_id, "SHUTDOWN", "late").status_code == 200
    job = client.get_job(job_id)
    assert job["state"] == "FAILED" and job["error"] == "late"


def test_matching_is_unchanged(reference: RunningCoordinator, client: Client) -> None:
    """Constraint matching is the same as in the local mode."""
    client.submit_job(PAYLOAD, constraints={"gpu_type": "h100"})
    with ScriptedMiner(reference) as miner:
        miner.register()
        assert miner.poll(0).status_code == 204
        served = client.submit_job(PAYLOAD, constraints={"gpu": "NVIDIA GeForce RTX 3090"})["job_id"]
        assert miner.claim(0)["job_id"] == served


def test_per_ip_per_endpoint_miner_rate_limits(tmp_path: Path) -> None:
    """Miner calls over the per-endpoint limit get 429 "Rate limit exceeded" with Retry-After: 60."""
    limits = MinerRateLimits(poll=3, heartbeat=2, register=5, result=5, fail=5)
    with run_coordinator(tmp_path / "ref.db", quirks="reference", miner_rate_limits=limits) as coord:
        with ScriptedMiner(coord) as miner, ScriptedMiner(coord, "rig-02") as same_ip:
            miner.register()
            assert [miner.poll(0).status_code for _ in range(3)] == [204, 204, 204]
            refused = same_ip.poll(0)
            assert refused.status_code == 429 and refused.json() == {"detail": "Rate limit exceeded"}
            assert refused.headers["Retry-After"] == "60"
            assert [miner.heartbeat().status_code for _ in range(3)] == [200, 200, 429]
