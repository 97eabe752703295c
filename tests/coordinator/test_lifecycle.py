"""Job lifecycle rules: cancellation seen by the miner, requeues, leases, TTL expiry, receipts, restarts."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from coordinator.client import Client
from miner.wire.receipts import verify_receipt
from tests.coordinator.helpers import ScriptedMiner
from tests.servers import RunningCoordinator, run_coordinator

PAYLOAD = {"model": "tiny", "prompt": "hello"}


def wait_for_state(client: Client, job_id: str, state: str, timeout: float = 10.0) -> dict[str, object]:
    """Poll until the job has ``state`` (tests must not sleep a fixed time)."""
    pause = threading.Event()
    waited = 0.0
    while waited < timeout:
        job = client.get_job(job_id)
        if job["state"] == state:
            return job
        pause.wait(0.05)
        waited += 0.05
    raise AssertionError(f"job {job_id} is {client.get_job(job_id)['state']}, not {state}, after {timeout} s")


def test_cancel_running_job_is_seen_by_the_miner(coordinator: RunningCoordinator, coordinator_client: Client) -> None:
    """A running job cancelled by its client is listed in the miner's heartbeat; a late result is 409, not stored."""
    job_id = coordinator_client.submit_job(PAYLOAD, payment_amount=1.0)["job_id"]
    with ScriptedMiner(coordinator) as miner:
        miner.register()
        miner.claim()
        answer = coordinator_client.cancel_job(job_id)
        assert answer["state"] == "CANCELLED" and answer["assigned_miner_id"] == "rig-01"
        assert miner.heartbeat().json()["cancelled_jobs"] == [job_id]
        assert miner.heartbeat().json()["cancelled_jobs"] == [job_id]  # until the miner answers for it
        response = miner.result(job_id)
        assert response.status_code == 409 and "cancelled" in response.json()["detail"]
        assert miner.heartbeat().json()["cancelled_jobs"] == []
    assert coordinator_client.get_job(job_id)["state"] == "CANCELLED"
    assert coordinator_client.get_receipts(job_id) == []
    assert coordinator_client.get_payment(job_id)["status"] == "refunded"


def test_cancelled_job_fail_is_409_and_frees_the_slot(coordinator: RunningCoordinator,
                                                      coordinator_client: Client) -> None:
    """After a cancel the miner's /fail is 409, and the slot is free for the next job at once."""
    job_id = coordinator_client.submit_job(PAYLOAD)["job_id"]
    with ScriptedMiner(coordinator) as miner:
        miner.register(concurrency=1)
        miner.claim()
        coordinator_client.cancel_job(job_id)
        assert miner.fail(job_id, "CANCELLED", "stopped").status_code == 409
        next_id = coordinator_client.submit_job(PAYLOAD)["job_id"]
        assert miner.claim()["job_id"] == next_id


def test_shutdown_failure_requeues(coordinator: RunningCoordinator, coordinator_client: Client) -> None:
    """A SHUTDOWN failure puts the job back in the queue, where another miner can take it."""
    job_id = coordinator_client.submit_job(PAYLOAD)["job_id"]
    with ScriptedMiner(coordinator, "rig-01") as first, ScriptedMiner(coordinator, "rig-02") as second:
        first.register()
        second.register()
        first.claim()
        assert first.fail(job_id, "SHUTDOWN", "miner stopping").json() == {"status": "ok", "state": "QUEUED"}
        job = coordinator_client.get_job(job_id)
        assert job["state"] == "QUEUED" and job["assigned_miner_id"] is None
        assert second.claim()["job_id"] == job_id
        assert second.result(job_id).status_code == 200
    assert coordinator_client.get_job(job_id)["state"] == "COMPLETED"


def test_reregistering_miner_loses_its_running_jobs_to_the_queue(coordinator: RunningCoordinator,
                                                                 coordinator_client: Client) -> None:
    """A miner id that registers again (a restarted miner) gets its RUNNING jobs requeued at once."""
    job_id = coordinator_client.submit_job(PAYLOAD)["job_id"]
    with ScriptedMiner(coordinator) as miner:
        miner.register()
        miner.claim()
        miner.register()
        assert coordinator_client.get_job(job_id)["state"] == "QUEUED"
        assert miner.claim()["job_id"] == job_id


def test_reregistering_with_held_jobs_keeps_them_and_requeues_the_rest(coordinator: RunningCoordinator,
                                                                       coordinator_client: Client) -> None:
    """A miner that re-registers to update its capabilities keeps the jobs it lists in held_jobs."""
    kept = coordinator_client.submit_job(PAYLOAD)["job_id"]
    lost = coordinator_client.submit_job(PAYLOAD)["job_id"]
    with ScriptedMiner(coordinator) as miner:
        miner.register(concurrency=2)
        assert {miner.claim()["job_id"], miner.claim()["job_id"]} == {kept, lost}
        miner.register(concurrency=2, held_jobs=[kept])
        assert coordinator_client.get_job(kept)["state"] == "RUNNING"
        assert coordinator_client.get_job(lost)["state"] == "QUEUED"
        assert miner.result(kept).status_code == 200
    assert coordinator_client.get_job(kept)["state"] == "COMPLETED"


def test_job_missing_from_heartbeat_after_the_grace_is_requeued(tmp_path: Path) -> None:
    """A RUNNING job the miner's heartbeat does not list (its poll answer was lost) is requeued; a listed one stays."""
    with run_coordinator(tmp_path / "c.db", rate_limits=None, unheld_grace_s=0.3) as coord:
        with Client(coord.url, coord.client_key) as client, ScriptedMiner(coord) as miner:
            miner.register(concurrency=2)
            held = client.submit_job(PAYLOAD)["job_id"]
            lost = client.submit_job(PAYLOAD)["job_id"]
            assert {miner.claim()["job_id"], miner.claim()["job_id"]} == {held, lost}
            miner.heartbeat(metadata={"jobs": [held]})  # within the grace: nothing moves yet
            assert client.get_job(lost)["state"] == "RUNNING"
            threading.Event().wait(0.4)
            miner.heartbeat(metadata={"jobs": [held]})
            assert client.get_job(lost)["state"] == "QUEUED"
            assert client.get_job(held)["state"] == "RUNNING"


def test_missed_heartbeats_requeue_running_jobs(tmp_path: Path) -> None:
    """A miner silent for longer than the lease loses its RUNNING jobs back to the queue; a live miner keeps its own."""
    with run_coordinator(tmp_path / "c.db", rate_limits=None, lease_seconds=0.6) as coord:
        with Client(coord.url, coord.client_key) as client, \
                ScriptedMiner(coord, "silent") as silent, ScriptedMiner(coord, "alive") as alive:
            silent.register()
            alive.register()
            lost = client.submit_job(PAYLOAD)["job_id"]
            silent.claim()
            kept = client.submit_job(PAYLOAD)["job_id"]
            alive.claim()
            pause = threading.Event()
            for _ in range(12):  # heartbeats every 0.1 s keep "alive" within its lease
                alive.heartbeat()
                pause.wait(0.1)
            wait_for_state(client, lost, "QUEUED", timeout=5)
            assert client.get_job(kept)["state"] == "RUNNING"
            assert alive.result(kept).status_code == 200
            assert alive.claim()["job_id"] == lost


def test_ttl_expiry(coordinator: RunningCoordinator, coordinator_client: Client) -> None:
    """A job whose TTL passes before completion becomes EXPIRED, its payment refunded and no miner gets it."""
    queued = coordinator_client.submit_job(PAYLOAD, ttl_seconds=1, payment_amount=1.0)["job_id"]
    with ScriptedMiner(coordinator) as miner:
        miner.register(concurrency=2)
        running = coordinator_client.submit_job({**PAYLOAD, "n": 2}, ttl_seconds=1)["job_id"]
        miner.claim()  # the first job is taken
        job = wait_for_state(coordinator_client, running, "EXPIRED")
        assert "TTL" in str(job["error"])
        wait_for_state(coordinator_client, queued, "EXPIRED")
        assert coordinator_client.get_payment(queued)["status"] == "refunded"
        response = miner.result(queued)
        assert response.status_code == 409 and "expired" in response.json()["detail"]
        assert miner.poll(0).status_code == 204


def test_expired_running_job_is_listed_to_its_miner(coordinator: RunningCoordinator,
                                                    coordinator_client: Client) -> None:
    """A RUNNING job that expires shows up in its miner's cancelled_jobs, so the miner stops work on it."""
    job_id = coordinator_client.submit_job(PAYLOAD, ttl_seconds=1)["job_id"]
    with ScriptedMiner(coordinator) as miner:
        miner.register()
        miner.claim()
        wait_for_state(coordinator_client, job_id, "EXPIRED")
        assert miner.heartbeat().json()["cancelled_jobs"] == [job_id]


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        ("signature", "does not verify"),
        ("other_key", "does not verify"),
        ("job_id", "result.receipt.job_id"),
        ("miner_id", "result.receipt.miner_id"),
    ],
)
def test_bad_receipts_are_422(coordinator: RunningCoordinator, coordinator_client: Client, tamper: str,
                              message: str) -> None:
    """A receipt that does not verify against the registered key, or names another job or miner, is 422."""
    job_id = coordinator_client.submit_job(PAYLOAD)["job_id"]
    with ScriptedMiner(coordinator) as miner:
        miner.register()
        miner.claim()
        if tamper == "signature":
            receipt = {**miner.receipt(job_id), "output_sha256": "0" * 64}
        elif tamper == "other_key":
            impostor = ScriptedMiner(coordinator, key=SigningKey.generate())
            impostor.close()
            receipt = impostor.receipt(job_id)
        elif tamper == "job_id":
            receipt = miner.receipt(job_id, job_id="another-job")
        else:
            receipt = miner.receipt(job_id, miner_id="rig-99", provider="rig-99")
        response = miner.result(job_id, receipt=receipt)
        assert response.status_code == 422 and message in response.json()["detail"]
        assert coordinator_client.get_job(job_id)["state"] == "RUNNING"
        assert miner.result(job_id).status_code == 200


def test_receipt_from_a_miner_without_registered_key_is_422(coordinator: RunningCoordinator,
                                                            coordinator_client: Client) -> None:
    """A signed receipt cannot be checked when the miner registered no receipt_key: 422 saying so."""
    job_id = coordinator_client.submit_job(PAYLOAD)["job_id"]
    with ScriptedMiner(coordinator) as miner:
        response = miner.http.post("/v1/miners/register", json={"capabilities": {"models": ["tiny"]}})
        assert response.status_code == 200
        miner.claim()
        response = miner.result(job_id)
        assert response.status_code == 422 and "receipt_key" in response.json()["detail"]


def test_restart_keeps_jobs_results_and_registrations(tmp_path: Path) -> None:
    """After a restart on the same file, jobs and receipts are still there and a result sent afterwards verifies."""
    with run_coordinator(tmp_path / "c.db", rate_limits=None) as coord:
        with Client(coord.url, coord.client_key) as client, ScriptedMiner(coord) as miner:
            miner.register(concurrency=2)
            done = client.submit_job(PAYLOAD, payment_amount=1.0)["job_id"]
            pending = client.submit_job({**PAYLOAD, "n": 2})["job_id"]
            miner.claim()
            miner.claim()
            receipt = miner.receipt(done, "first")
            assert miner.result(done, "first", receipt=receipt).status_code == 200
            queued = client.submit_job({**PAYLOAD, "n": 3})["job_id"]
            coord.stop()
            coord.start()
            answer = client.get_job_result(done)
            assert answer["result"] == {"output": "first", "metadata": {"tokens": 1}} and answer["receipt"] == receipt
            verify_receipt(answer["coordinator_receipt"], client.get_receipt_key()["key_id"])  # the same key again
            assert client.get_payment(done)["status"] == "released"
            assert client.get_job(pending)["state"] == "RUNNING"
            assert client.get_job(queued)["state"] == "QUEUED"
            assert miner.result(pending, "second").status_code == 200  # verified against the persisted key
            verify_receipt(client.get_job_result(pending)["receipt"], miner.key.verify_key)
            assert miner.claim()["job_id"] == queued
