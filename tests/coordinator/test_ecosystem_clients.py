"""The AITBC ecosystem's own clients against the local coordinator, their requests replayed byte for byte.

The reference GPU miner: waits for ``/health``, registers with its own capabilities shape
and no ``X-Miner-ID`` (its key is its id), heartbeats with unknown fields and
``network_latency_ms: -1.0``, polls, posts a ``/result`` whose result has ``status``,
``output``, ``execution_time`` and ``model`` and signs nothing. The AITBC command-line
client: only ``Authorization: Bearer``, submit, status, result, cancel and ``jobs``.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from coordinator.client import Client
from miner.wire.receipts import ReceiptVerificationError, verify_receipt
from tests.coordinator.helpers import ScriptedMiner
from tests.servers import RunningCoordinator, run_coordinator

JSON = {"Content-Type": "application/json"}
REFERENCE_REGISTER = (
    b'{"capabilities":{"gpu":{"model":"NVIDIA GeForce RTX 4060 Ti","memory_gb":16,"cuda_version":"12.4",'
    b'"platform":"CUDA","supported_tasks":["inference","training","stable-diffusion","llama"],'
    b'"max_concurrent_jobs":1}},"concurrency":1,"region":"localhost"}'
)
REFERENCE_HEARTBEAT = (
    b'{"inflight":0,"status":"ONLINE","metadata":{},"architecture":null,"edge_optimized":null,'
    b'"network_latency_ms":-1.0,"current_jobs":0,"last_seen":"2026-11-28T17:08:59.765980",'
    b'"gpu_utilization":7,"memory_used":2682,"memory_total":16380}'
)
REFERENCE_POLL = b'{"max_wait_seconds":5}'
REFERENCE_RESULT = (
    b'{"result":{"status":"completed","output":"AI is the study of machines that learn.",'
    b'"model":"llama3.2:latest","tokens_processed":212,"execution_time":11.846,"gpu_used":true},'
    b'"metrics":{"gpu_utilization":20,"memory_used":4096,"memory_peak":4096}}'
)


def reference_miner(coord: RunningCoordinator) -> httpx.Client:
    """The reference miner's HTTP identity: X-Api-Key only (no X-Miner-ID), JSON bodies."""
    return httpx.Client(base_url=coord.url, timeout=10, headers={"X-Api-Key": coord.miner_key, **JSON})


def test_reference_miner_session(coordinator: RunningCoordinator, coordinator_client: Client) -> None:
    """/health, register, heartbeat -1.0, poll, result: all accepted, and the job gets a verifiable coordinator receipt."""
    job_id = coordinator_client.submit_job({"type": "inference", "prompt": "What is AI?"})["job_id"]
    with reference_miner(coordinator) as http:
        health = httpx.get(f"{coordinator.url}/v1/health", timeout=5)
        assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["db"] == "ok"
        register = http.post("/v1/miners/register", content=REFERENCE_REGISTER)
        assert register.status_code == 200 and register.json()["status"] == "ok"
        beat = http.post("/v1/miners/heartbeat", content=REFERENCE_HEARTBEAT)
        assert beat.status_code == 200, beat.text
        poll = http.post("/v1/miners/poll", content=REFERENCE_POLL)
        assert poll.status_code == 200 and poll.json()["job_id"] == job_id
        assert poll.json()["payload"] == {"type": "inference", "prompt": "What is AI?"}
        result = http.post(f"/v1/miners/{job_id}/result", content=REFERENCE_RESULT)
        assert result.status_code == 200, result.text
        signed = result.json()["receipt"]
        assert http.post("/v1/miners/poll", content=REFERENCE_POLL).status_code == 204
    key = coordinator_client.get_receipt_key()
    assert key["signer"] == "coordinator" and signed["signature"]["key_id"] == key["key_id"]
    verify_receipt(signed, key["key_id"])
    assert signed["job_id"] == job_id and signed["provider"] == coordinator.miner_key and "miner_id" not in signed
    assert signed["metadata"]["result"]["execution_time"] == 11.846
    answer = coordinator_client.get_job_result(job_id)
    assert answer["result"]["output"] == "AI is the study of machines that learn."
    assert answer["receipt"] == answer["coordinator_receipt"] == signed  # the miner signed nothing
    assert coordinator_client.get_receipts(job_id) == [signed] and coordinator_client.get_receipt(job_id) == signed


def test_health_without_authentication(coordinator: RunningCoordinator) -> None:
    """GET /health and /v1/health answer {"status": "ok", "version", "db": "ok"} with no key at all."""
    for path in ("/health", "/v1/health"):
        response = httpx.get(f"{coordinator.url}{path}", timeout=5)
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "ok" and body["db"] == "ok" and isinstance(body["version"], str)


def test_heartbeat_fields_the_coordinator_uses_keep_their_types(coordinator: RunningCoordinator) -> None:
    """Informational fields are unbounded, but inflight and metadata must still have their types."""
    with reference_miner(coordinator) as http:
        assert http.post("/v1/miners/register", content=REFERENCE_REGISTER).status_code == 200
        assert http.post("/v1/miners/heartbeat", content=b'{"network_latency_ms": -12345.5}').status_code == 200
        assert http.post("/v1/miners/heartbeat", content=b"{}").status_code == 200
        bad = http.post("/v1/miners/heartbeat", content=b'{"inflight": "zero"}')
        assert bad.status_code == 422 and "inflight" in bad.json()["detail"]
        bad = http.post("/v1/miners/heartbeat", content=b'{"metadata": []}')
        assert bad.status_code == 422 and "metadata" in bad.json()["detail"]


def test_cli_client_session_with_bearer_only(coordinator: RunningCoordinator) -> None:
    """Submit, status, jobs?limit=10, cancel and result with only Authorization: Bearer <client key>."""
    bearer = {"Authorization": f"Bearer {coordinator.client_key}"}
    with httpx.Client(base_url=coordinator.url, timeout=10) as http:
        submit = b'{"payload":{"type":"inference","prompt":"What is AI?","model":"tiny"},"ttl_seconds":900}'
        created = http.post("/v1/jobs", content=submit, headers={**JSON, **bearer})
        assert created.status_code == 201, created.text
        done = created.json()["job_id"]
        second = http.post("/v1/jobs", content=submit, headers={**JSON, **bearer}).json()["job_id"]
        status = http.get(f"/v1/jobs/{done}", headers=bearer)
        assert status.status_code == 200 and status.json()["state"] == "QUEUED"
        with ScriptedMiner(coordinator) as miner:
            miner.register()
            assert miner.claim()["job_id"] == done
            assert miner.result(done, "answer").status_code == 200
        cancelled = http.post(f"/v1/jobs/{second}/cancel", headers=bearer)
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "CANCELLED"
        result = http.get(f"/v1/jobs/{done}/result", headers=bearer)
        assert result.status_code == 200 and result.json()["result"]["output"] == "answer"
        listing = http.get("/v1/jobs?limit=10", headers=bearer)
        assert listing.status_code == 200
        body = listing.json()
        assert [job["job_id"] for job in body["items"]] == [second, done]  # newest first
        assert (body["total"], body["limit"], body["offset"]) == (2, 10, 0)
        for query in ("state=CANCELED", "status=cancelled", "state=CANCELLED"):
            only = http.get(f"/v1/jobs?{query}", headers=bearer).json()
            assert [job["job_id"] for job in only["items"]] == [second] and only["limit"] == 20, query
        page = http.get("/v1/jobs?limit=1&offset=1", headers=bearer).json()
        assert [job["job_id"] for job in page["items"]] == [done] and page["total"] == 2
        assert http.get("/v1/jobs?limit=101", headers=bearer).status_code == 422
        assert http.get("/v1/jobs?state=sleeping", headers=bearer).status_code == 422
        assert http.get("/v1/jobs", headers={"Authorization": "Bearer not-a-key"}).status_code == 401
        assert http.get("/v1/jobs", headers={"Authorization": f"Basic {coordinator.client_key}"}).status_code == 401
        assert http.get("/v1/jobs", headers={"X-Api-Key": coordinator.client_key}).status_code == 200


def test_job_list_shows_only_the_callers_jobs(tmp_path: Path) -> None:
    """GET /v1/jobs lists the jobs of the calling key only."""
    with run_coordinator(tmp_path / "c.db", rate_limits=None, extra_client_keys=("other-key",)) as coord:
        with Client(coord.url, coord.client_key, bearer=True) as mine, Client(coord.url, "other-key") as theirs:
            own = mine.submit_job({"prompt": "a"})["job_id"]
            theirs.submit_job({"prompt": "b"})
            listed = mine.list_jobs()
            assert [job["job_id"] for job in listed["items"]] == [own] and listed["total"] == 1


def test_payment_amount_zero_is_no_payment_and_any_currency_is_echoed(coordinator_client: Client) -> None:
    """payment_amount 0 escrows nothing; a currency other than AITBC is accepted and echoed by the ledger."""
    free = coordinator_client.submit_job({"prompt": "x"}, payment_amount=0)
    assert free["payment_id"] is None and free["payment_status"] is None
    paid = coordinator_client.submit_job({"prompt": "x"}, payment_amount=0.5, payment_currency="USDC")
    payment = coordinator_client.get_payment(paid["job_id"])
    assert (payment["amount"], payment["currency"], payment["status"]) == (0.5, "USDC", "escrowed")


def test_job_for_an_unserved_model_waits_for_the_first_miner_that_registers_it(
        coordinator: RunningCoordinator, coordinator_client: Client) -> None:
    """No miner serving llama2: the job stays QUEUED; the first miner to register llama2 gets it."""
    job_id = coordinator_client.submit_job({"model": "llama2", "prompt": "hi"})["job_id"]
    with ScriptedMiner(coordinator, "rig-tiny") as tiny, ScriptedMiner(coordinator, "rig-llama") as llama:
        tiny.register(models=["tiny"])
        assert tiny.poll(0.2).status_code == 204
        assert coordinator_client.get_job(job_id)["state"] == "QUEUED"
        llama.register(models=["tiny", "llama2"])
        claimed = llama.claim()
        assert claimed["job_id"] == job_id
        job = coordinator_client.get_job(job_id)
        assert job["state"] == "RUNNING" and job["assigned_miner_id"] == "rig-llama"


def test_a_miner_that_adds_the_model_by_registering_again_gets_the_job(coordinator: RunningCoordinator,
                                                                   coordinator_client: Client) -> None:
    """A miner registering again with the job's model is handed the job that waited for it."""
    job_id = coordinator_client.submit_job({"model": "llama2", "prompt": "hi"})["job_id"]
    with ScriptedMiner(coordinator) as miner:
        miner.register(models=["tiny"])
        assert miner.poll(0).status_code == 204
        miner.register(models=["llama2"], held_jobs=[])
        assert miner.claim()["job_id"] == job_id


def test_job_for_an_unserved_model_expires_queued(coordinator: RunningCoordinator, coordinator_client: Client) -> None:
    """A job no miner can serve is never handed out; its TTL ends it EXPIRED."""
    job_id = coordinator_client.submit_job({"model": "llama2", "prompt": "hi"}, ttl_seconds=1)["job_id"]
    with ScriptedMiner(coordinator) as miner:
        miner.register(models=["tiny"])
        assert miner.poll(0).status_code == 204
        assert coordinator_client.wait(job_id, timeout=30)["state"] == "EXPIRED"
        assert coordinator_client.get_job(job_id)["assigned_miner_id"] is None


def test_reference_quirks_hand_out_jobs_whatever_the_model(tmp_path: Path) -> None:
    """With --quirks reference the job goes to a miner that does not list its model (as the reference does)."""
    with run_coordinator(tmp_path / "ref.db", rate_limits=None, quirks="reference") as coord:
        with Client(coord.url, coord.client_key) as client, ScriptedMiner(coord) as miner:
            job_id = client.submit_job({"model": "llama2", "prompt": "hi"})["job_id"]
            miner.register(models=["tiny"])
            assert miner.claim(0)["job_id"] == job_id
            signed = miner.result(job_id).json()["receipt"]
            verify_receipt(signed, client.get_receipt_key()["key_id"])


def test_reference_miner_without_models_gets_jobs_without_a_model(coordinator: RunningCoordinator,
                                                                  coordinator_client: Client) -> None:
    """The reference miner lists no models: a model job waits for another miner, a model-less one goes to it."""
    model_job = coordinator_client.submit_job({"type": "inference", "prompt": "a", "model": "llama2"})["job_id"]
    plain_job = coordinator_client.submit_job({"type": "inference", "prompt": "b"})["job_id"]
    with reference_miner(coordinator) as http:
        assert http.post("/v1/miners/register", content=REFERENCE_REGISTER).status_code == 200
        assert http.post("/v1/miners/poll", content=REFERENCE_POLL).json()["job_id"] == plain_job
    assert coordinator_client.get_job(model_job)["state"] == "QUEUED"


def test_coordinator_receipt_carries_the_reference_fields(coordinator: RunningCoordinator,
                                                          coordinator_client: Client) -> None:
    """The coordinator's receipt names job, provider, client, units from duration_ms, prices and the miner's receipt."""
    job = coordinator_client.submit_job({"model": "tiny", "prompt": "p"}, payment_amount=1.5, payment_currency="AITBC")
    with ScriptedMiner(coordinator) as miner:
        miner.register()
        miner.claim()
        miner_receipt = miner.receipt(job["job_id"], "out")
        own = miner.result(job["job_id"], "out", receipt=miner_receipt).json()["receipt"]
    for field in ("version", "receipt_id", "job_id", "provider", "client", "status", "units", "unit_type",
                  "unit_price", "price", "started_at", "completed_at", "metadata", "signature"):
        assert field in own, field
    assert own["signer"] == "coordinator" and own["provider"] == "rig-01" and own["units"] == 0.1
    assert own["unit_type"] == "gpu_seconds" and own["unit_price"] == 0.01 and own["price"] == 0.001
    assert own["miner_receipt_id"] == miner_receipt["receipt_id"]
    assert own["miner_key_id"] == miner_receipt["signature"]["key_id"]
    assert own["payment"] == {"payment_id": job["payment_id"], "amount": 1.5, "currency": "AITBC"}
    assert own["metadata"]["job_payload"] == {"model": "tiny", "prompt": "p"}
    assert own["metadata"]["metrics"] == {"duration_ms": 100} and "receipt" not in own["metadata"]["result"]
    receipts = coordinator_client.get_receipts(job["job_id"])
    assert receipts == [miner_receipt, own]
    verify_receipt(receipts[0], miner.key.verify_key)
    verify_receipt(receipts[1], coordinator_client.get_receipt_key()["key_id"])
    tampered = json.loads(json.dumps(own))
    tampered["price"] = 0
    with pytest.raises(ReceiptVerificationError):
        verify_receipt(tampered, coordinator_client.get_receipt_key()["key_id"])
