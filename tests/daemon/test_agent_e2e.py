"""The real daemon, in-process, against the real local coordinator on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from coordinator.client import Client
from coordinator.quirks import MinerRateLimits
from miner.daemon.agent import Agent
from miner.wire.errors import ErrorCode
from miner.wire.receipts import verify_receipt
from tests.daemon.helpers import miner_settings
from tests.servers import RunningCoordinator, run_coordinator

FAST = {"name": "llama2", "runner": "fake", "delay_s": 0.05}
HANGING = {"name": "llama2", "runner": "fake", "delay_s": 0.05, "fail_mode": "hang", "fail_marker": "HANG"}


def _agent(tmp_path: Path, coordinator: RunningCoordinator, **kwargs: Any) -> Agent:
    overrides = kwargs.pop("settings", {})
    overrides.setdefault("coordinator", {})["api_key"] = coordinator.miner_key
    settings = miner_settings(tmp_path / "state", coordinator.url, **overrides)
    return Agent(settings, handle_signals=False, **kwargs)


async def _until(predicate: Callable[[], bool], timeout: float = 30.0, step: float = 0.02) -> None:
    async with asyncio.timeout(timeout):
        while not await asyncio.to_thread(predicate):
            await asyncio.sleep(step)


def _state(client: Client, job_id: str) -> str:
    return str(client.get_job(job_id)["state"])


def test_many_jobs_over_several_slots_complete_with_verifying_receipts(
    tmp_path: Path, coordinator: RunningCoordinator, coordinator_client: Client
) -> None:
    """Twelve jobs on a three-slot miner all complete, each with a receipt signed by the miner's key."""
    ids = [
        coordinator_client.submit_job(
            {"model": "llama2", "prompt": f"prompt {i}", "parameters": {"max_tokens": 8}}, ttl_seconds=120
        )["job_id"]
        for i in range(12)
    ]
    agent = _agent(tmp_path, coordinator, max_jobs=12, settings={"concurrency": 3, "models": [FAST]})
    assert asyncio.run(agent.serve()) == 0
    assert agent.key_id is not None
    for job_id in ids:
        assert _state(coordinator_client, job_id) == "COMPLETED"
        answer = coordinator_client.get_job_result(job_id)
        receipt = answer["receipt"]
        verify_receipt(receipt, agent.key_id)
        assert receipt["job_id"] == job_id and receipt["miner_id"] == receipt["provider"] == "rig-test"
        assert len(answer["result"]["output"].split()) == 8
        assert len(coordinator_client.get_receipts(job_id, signer="miner")) == 1
    assert agent.outcomes == {"completed": 12} and len(agent.outbox) == 0


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ({"model": "llama2"}, ErrorCode.INVALID_PAYLOAD),
        ({"model": "llama2", "messages": "not a list"}, ErrorCode.INVALID_PAYLOAD),
        ({"model": "llama2", "prompt": "x", "parameters": {"temperature": 9}}, ErrorCode.INVALID_PARAMETERS),
    ],
)
def test_unservable_jobs_fail_with_their_code(
    tmp_path: Path, coordinator: RunningCoordinator, coordinator_client: Client, payload: dict[str, Any], code: str
) -> None:
    """A job the miner cannot serve ends FAILED with a message naming the problem, never substituted."""
    job_id = coordinator_client.submit_job(payload, ttl_seconds=60)["job_id"]
    agent = _agent(tmp_path, coordinator, max_jobs=1)
    assert asyncio.run(agent.serve()) == 0
    job = coordinator_client.get_job(job_id)
    assert job["state"] == "FAILED"
    assert job.get("error_code", code) == code and job["error"]
    assert agent.outcomes == {"failed": 1}


def test_a_job_for_a_model_not_served_fails_model_not_served(tmp_path: Path) -> None:
    """A coordinator that dispatches without looking at the model (the reference service) hands
    this miner a job for another model: the miner fails it MODEL_NOT_SERVED, never substitutes."""
    with (
        run_coordinator(tmp_path / "reference.db", rate_limits=None, quirks="reference") as coordinator,
        Client(coordinator.url, coordinator.client_key) as client,
    ):
        job_id = client.submit_job({"model": "mistral-7b", "prompt": "x"}, ttl_seconds=60)["job_id"]
        agent = _agent(tmp_path, coordinator, max_jobs=1)
        assert asyncio.run(agent.serve()) == 0
        job = client.get_job(job_id)
    assert job["state"] == "FAILED" and job.get("error_code", ErrorCode.MODEL_NOT_SERVED) == ErrorCode.MODEL_NOT_SERVED
    assert "mistral-7b" in job["error"]
    assert agent.outcomes == {"failed": 1}


def test_cancelled_running_job_stops_and_is_not_submitted(
    tmp_path: Path, coordinator: RunningCoordinator, coordinator_client: Client
) -> None:
    """Cancelling a RUNNING job reaches the miner by heartbeat; the job stops and stays CANCELLED."""
    job_id = coordinator_client.submit_job({"model": "llama2", "prompt": "HANG please"}, ttl_seconds=120)["job_id"]
    agent = _agent(tmp_path, coordinator, settings={"models": [HANGING], "coordinator": {"heartbeat_interval_s": 0.3}})

    async def scenario() -> None:
        task = asyncio.create_task(agent.serve())
        await _until(lambda: job_id in agent.inflight)
        await asyncio.to_thread(coordinator_client.cancel_job, job_id)
        await _until(lambda: agent.outcomes["cancelled"] == 1)
        agent.request_exit("test over")
        await task

    asyncio.run(scenario())
    assert _state(coordinator_client, job_id) == "CANCELLED"
    assert coordinator_client.get_receipts(job_id) == []
    assert len(agent.outbox) == 0 and agent.outbox.state(job_id) is None


def _downtime_run(tmp_path: Path, downtime_s: float) -> None:
    with run_coordinator(tmp_path / "coordinator.db", rate_limits=None) as coordinator:
        with Client(coordinator.url, coordinator.client_key) as client:
            ids = [
                client.submit_job({"model": "llama2", "prompt": f"p{i}"}, ttl_seconds=600)["job_id"] for i in range(6)
            ]
        agent = _agent(
            tmp_path,
            coordinator,
            max_jobs=6,
            settings={"concurrency": 2, "models": [{"name": "llama2", "runner": "fake", "delay_s": 0.4}]},
        )

        async def scenario() -> int:
            task = asyncio.create_task(agent.serve())
            await _until(lambda: len(agent.inflight) == 2 and agent.outcomes["completed"] >= 1)
            await asyncio.to_thread(coordinator.stop)
            await _until(lambda: len(agent.outbox) >= 1)  # a result finished while the coordinator is away
            await asyncio.sleep(downtime_s)
            await asyncio.to_thread(coordinator.start)
            return await asyncio.wait_for(task, 60 + downtime_s)

        assert asyncio.run(scenario()) == 0
        with Client(coordinator.url, coordinator.client_key) as client:
            for job_id in ids:
                assert _state(client, job_id) == "COMPLETED"
                assert len(client.get_receipts(job_id, signer="miner")) == 1
    assert agent.outcomes == {"completed": 6} and len(agent.outbox) == 0


def test_coordinator_down_mid_run_loses_no_result(tmp_path: Path) -> None:
    """With the coordinator stopped for a few seconds mid-run and restarted, every result arrives once."""
    _downtime_run(tmp_path, downtime_s=3.0)


@pytest.mark.slow
def test_coordinator_down_for_30_seconds_loses_no_result(tmp_path: Path) -> None:
    """The 30-second version of the downtime test from the issue."""
    _downtime_run(tmp_path, downtime_s=30.0)


def test_reference_quirks_mode_with_rate_limits(tmp_path: Path) -> None:
    """Against the reference quirks (no long-poll, /fail keeps the slot, tight 429 limits) every job ends right."""
    limits = MinerRateLimits(poll=6, heartbeat=6, register=5, result=3, fail=3, window_s=1.0)
    with run_coordinator(
        tmp_path / "coordinator.db", rate_limits=None, quirks="reference", miner_rate_limits=limits
    ) as coordinator:
        with Client(coordinator.url, coordinator.client_key) as client:
            ids = [
                client.submit_job({"model": "llama2", "prompt": f"p{i}"}, ttl_seconds=600)["job_id"] for i in range(6)
            ]
            bad = [client.submit_job({"model": "absent", "prompt": "x"}, ttl_seconds=600)["job_id"] for _ in range(2)]
        agent = _agent(tmp_path, coordinator, max_jobs=8, settings={"concurrency": 1, "models": [FAST]})
        started = time.monotonic()
        assert asyncio.run(asyncio.wait_for(agent.serve(), 90)) == 0
        with Client(coordinator.url, coordinator.client_key) as client:
            assert [_state(client, j) for j in ids] == ["COMPLETED"] * 6
            assert [_state(client, j) for j in bad] == ["FAILED"] * 2
    assert time.monotonic() - started < 90
    rendered = agent.metrics.render().decode()
    throttled = [
        line
        for line in rendered.splitlines()
        if line.startswith("aitbc_miner_coordinator_request_errors_total") and 'kind="429"' in line
    ]
    assert throttled, "the tight limits should have produced 429 answers the miner had to honour"
