"""The published client API over real HTTP: jobs, results, cancel, payments, receipts."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from coordinator.client import AuthenticationError, Client, JobConflict, JobNotFound, JobNotReady
from miner.wire.protocol import parse_timestamp
from miner.wire.receipts import verify_receipt
from tests.coordinator.helpers import ScriptedMiner
from tests.servers import RunningCoordinator, run_coordinator

PAYLOAD = {"model": "tiny", "prompt": "hello", "parameters": {"max_new_tokens": 4}}


def test_submit_answers_published_shape(coordinator_client: Client) -> None:
    """POST /v1/jobs answers 201 with the published fields, QUEUED, and expires_at = requested_at + TTL."""
    job = coordinator_client.submit_job(PAYLOAD, ttl_seconds=120)
    for field in ("job_id", "state", "assigned_miner_id", "requested_at", "expires_at", "error", "payment_id",
                  "payment_status"):
        assert field in job
    assert job["state"] == "QUEUED" and job["assigned_miner_id"] is None and job["error"] is None
    assert job["payment_id"] is None and job["payment_status"] is None
    delta = parse_timestamp(job["expires_at"]) - parse_timestamp(job["requested_at"])
    assert delta.total_seconds() == pytest.approx(120, abs=0.01)
    assert coordinator_client.get_job(job["job_id"]) == job


def test_status_code_201(coordinator: RunningCoordinator) -> None:
    """The submit answer's status code is 201 Created."""
    response = httpx.post(f"{coordinator.url}/v1/jobs", json={"payload": PAYLOAD},
                          headers={"X-Api-Key": coordinator.client_key})
    assert response.status_code == 201


def test_wrong_or_missing_key_is_401(coordinator: RunningCoordinator) -> None:
    """Without a known client key every client call is 401 "Invalid API key"; miner keys are not client keys."""
    for headers in ({}, {"X-Api-Key": "nope"}, {"X-Api-Key": coordinator.miner_key}):
        response = httpx.get(f"{coordinator.url}/v1/jobs/anything", headers=headers)
        assert response.status_code == 401
        assert response.json() == {"detail": "Invalid API key"}
    with Client(coordinator.url, "nope") as client, pytest.raises(AuthenticationError):
        client.submit_job(PAYLOAD)


def test_unknown_job_is_404_naming_it(coordinator_client: Client) -> None:
    """Every per-job call on an unknown id answers 404 naming the id."""
    for call in (coordinator_client.get_job, coordinator_client.get_job_result, coordinator_client.cancel_job,
                 coordinator_client.get_payment, coordinator_client.get_receipt, coordinator_client.get_receipts):
        with pytest.raises(JobNotFound) as caught:
            call("no-such-job")
        assert caught.value.status == 404 and "no-such-job" in str(caught.value.detail)


def test_clients_see_only_their_own_jobs(tmp_path: Path) -> None:
    """A job submitted with one client key is invisible (404) to another client key."""
    with run_coordinator(tmp_path / "c.db", rate_limits=None, extra_client_keys=("other-key",)) as coord:
        with Client(coord.url, coord.client_key) as mine, Client(coord.url, "other-key") as theirs:
            job = mine.submit_job(PAYLOAD)
            for call in (theirs.get_job, theirs.cancel_job, theirs.get_job_result, theirs.get_receipts):
                with pytest.raises(JobNotFound):
                    call(job["job_id"])
            assert mine.get_job(job["job_id"])["state"] == "QUEUED"


def test_result_is_425_until_done_then_served_with_receipt(coordinator: RunningCoordinator,
                                                           coordinator_client: Client) -> None:
    """GET result is 425 "job not ready" while queued or running, then output, metadata and the receipt as signed."""
    job_id = coordinator_client.submit_job(PAYLOAD)["job_id"]
    with pytest.raises(JobNotReady) as caught:
        coordinator_client.get_job_result(job_id)
    assert caught.value.detail == "job not ready"
    with ScriptedMiner(coordinator) as miner:
        miner.register()
        miner.claim()
        with pytest.raises(JobNotReady):
            coordinator_client.get_job_result(job_id)
        receipt = miner.receipt(job_id, "world")
        assert miner.result(job_id, "world", receipt=receipt).status_code == 200
    answer = coordinator_client.get_job_result(job_id)
    own = answer.pop("coordinator_receipt")
    assert answer == {"result": {"output": "world", "metadata": {"tokens": 1}}, "receipt": receipt}
    assert coordinator_client.get_receipts(job_id) == [receipt, own]
    assert coordinator_client.get_receipt(job_id) == own
    verify_receipt(receipt, miner.key.verify_key)
    verify_receipt(own, coordinator_client.get_receipt_key()["key_id"])
    job = coordinator_client.get_job(job_id)
    assert job["state"] == "COMPLETED" and job["assigned_miner_id"] == "rig-01"
    assert parse_timestamp(job["completed_at"]) >= parse_timestamp(job["started_at"])


def test_failed_job_result_is_409_with_error(coordinator: RunningCoordinator, coordinator_client: Client) -> None:
    """A FAILED job keeps the miner's error_message as its error and has no result (409)."""
    job_id = coordinator_client.submit_job(PAYLOAD)["job_id"]
    with ScriptedMiner(coordinator) as miner:
        miner.register()
        miner.claim()
        assert miner.fail(job_id, "OUT_OF_MEMORY", "CUDA out of memory").status_code == 200
    job = coordinator_client.get_job(job_id)
    assert job["state"] == "FAILED" and job["error"] == "CUDA out of memory"
    with pytest.raises(JobConflict):
        coordinator_client.get_job_result(job_id)
    assert coordinator_client.get_receipts(job_id) == []


def test_cancel_queued_job(coordinator_client: Client) -> None:
    """Cancelling a queued job answers CANCELLED with "Cancelled by user"; cancelling again is harmless."""
    job_id = coordinator_client.submit_job(PAYLOAD)["job_id"]
    answer = coordinator_client.cancel_job(job_id)
    assert answer["state"] == "CANCELLED" and answer["error"] == "Cancelled by user"
    assert answer["assigned_miner_id"] is None
    assert coordinator_client.cancel_job(job_id)["state"] == "CANCELLED"
    assert coordinator_client.get_job(job_id)["state"] == "CANCELLED"


def test_cancel_finished_job_is_409(coordinator: RunningCoordinator, coordinator_client: Client) -> None:
    """A COMPLETED job cannot be cancelled: 409 naming its state."""
    job_id = coordinator_client.submit_job(PAYLOAD)["job_id"]
    with ScriptedMiner(coordinator) as miner:
        miner.register()
        miner.claim()
        miner.result(job_id)
    with pytest.raises(JobConflict) as caught:
        coordinator_client.cancel_job(job_id)
    assert "COMPLETED" in str(caught.value.detail)


def test_payment_ledger_escrow_release_refund(coordinator: RunningCoordinator, coordinator_client: Client) -> None:
    """A paid job's simulated payment is escrowed at submit, released on completion, refunded on cancel."""
    paid = coordinator_client.submit_job(PAYLOAD, payment_amount=2.5)
    assert paid["payment_status"] == "escrowed" and paid["payment_id"]
    payment = coordinator_client.get_payment(paid["job_id"])
    assert payment["amount"] == 2.5 and payment["currency"] == "AITBC" and payment["status"] == "escrowed"
    assert payment["simulated"] is True and payment["payment_id"] == paid["payment_id"]
    with ScriptedMiner(coordinator) as miner:
        miner.register()
        miner.claim()
        miner.result(paid["job_id"])
    assert coordinator_client.get_payment(paid["job_id"])["status"] == "released"
    assert coordinator_client.get_job(paid["job_id"])["payment_status"] == "released"
    refunded = coordinator_client.submit_job(PAYLOAD, payment_amount=1.0)
    coordinator_client.cancel_job(refunded["job_id"])
    assert coordinator_client.get_payment(refunded["job_id"])["status"] == "refunded"
    unpaid = coordinator_client.submit_job(PAYLOAD)
    with pytest.raises(JobNotFound) as caught:
        coordinator_client.get_payment(unpaid["job_id"])
    assert "payment_amount" in str(caught.value.detail)


def test_failure_refunds_payment(coordinator: RunningCoordinator, coordinator_client: Client) -> None:
    """A failed job's escrowed payment is refunded."""
    job_id = coordinator_client.submit_job(PAYLOAD, payment_amount=1.0)["job_id"]
    with ScriptedMiner(coordinator) as miner:
        miner.register()
        miner.claim()
        miner.fail(job_id)
    assert coordinator_client.get_payment(job_id)["status"] == "refunded"
