"""The miner endpoints over real HTTP: register, heartbeat, poll, result, fail."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from coordinator.client import Client
from tests.coordinator.helpers import RTX_3090, ScriptedMiner, capabilities
from tests.servers import RunningCoordinator

PAYLOAD = {"model": "tiny", "prompt": "hello"}


def test_miner_calls_need_the_miner_key(coordinator: RunningCoordinator) -> None:
    """Miner endpoints answer 401 "Invalid API key" to a wrong key, including a client key."""
    for key in ("nope", coordinator.client_key):
        response = httpx.post(f"{coordinator.url}/v1/miners/register", json={"capabilities": {}},
                              headers={"X-Api-Key": key})
        assert response.status_code == 401 and response.json() == {"detail": "Invalid API key"}


def test_register_requires_capabilities_and_valid_receipt_key(coordinator: RunningCoordinator) -> None:
    """Registration without capabilities, or with a malformed receipt_key, is 422 naming the field."""
    with ScriptedMiner(coordinator) as miner:
        response = miner.http.post("/v1/miners/register", json={"concurrency": 1})
        assert response.status_code == 422 and "capabilities" in response.json()["detail"]
        bad = {"capabilities": {"receipt_key": {"alg": "Ed25519", "key_id": "short"}}}
        response = miner.http.post("/v1/miners/register", json=bad)
        assert response.status_code == 422 and "receipt_key.key_id" in response.json()["detail"]
        response = miner.http.post("/v1/miners/register", json={"capabilities": {}, "concurrency": 0})
        assert response.status_code == 422 and "concurrency" in response.json()["detail"]
        answer = miner.register().json()
        assert answer["status"] == "ok" and len(answer["session_token"]) >= 16


def test_unregistered_miner_heartbeat_is_404(coordinator: RunningCoordinator) -> None:
    """A heartbeat (or poll) from an unknown miner id answers 404 "miner not registered"."""
    with ScriptedMiner(coordinator, "ghost") as miner:
        assert miner.heartbeat().json() == {"detail": "miner not registered"}
        assert miner.heartbeat().status_code == 404
        assert miner.poll().status_code == 404


def test_key_is_miner_id_without_header(coordinator: RunningCoordinator, coordinator_client: Client) -> None:
    """Without X-Miner-ID the miner key itself names the miner, as in the reference service."""
    headers = {"X-Api-Key": coordinator.miner_key}
    with httpx.Client(base_url=coordinator.url, headers=headers) as http:
        assert http.post("/v1/miners/register", json={"capabilities": capabilities(None)}).status_code == 200
        job_id = coordinator_client.submit_job(PAYLOAD)["job_id"]
        assert http.post("/v1/miners/poll", json={}).json()["job_id"] == job_id
    assert coordinator_client.get_job(job_id)["assigned_miner_id"] == coordinator.miner_key


def test_empty_poll_is_204_and_heartbeat_lists_nothing(coordinator: RunningCoordinator) -> None:
    """With no job, a poll answers 204 with an empty body; the heartbeat answers ok and no cancellations."""
    with ScriptedMiner(coordinator) as miner:
        miner.register()
        response = miner.poll(0)
        assert response.status_code == 204 and response.content == b""
        assert miner.heartbeat(inflight=0, status="ONLINE").json() == {"status": "ok", "cancelled_jobs": []}


def test_long_poll_answers_when_a_job_arrives(coordinator: RunningCoordinator, coordinator_client: Client) -> None:
    """A long-poll held on an empty queue returns the job submitted during the wait, well before max_wait."""
    with ScriptedMiner(coordinator) as miner:
        miner.register()
        submitted: list[str] = []
        timer = threading.Timer(0.3, lambda: submitted.append(coordinator_client.submit_job(PAYLOAD)["job_id"]))
        started = time.monotonic()
        timer.start()
        response = miner.poll(20)
        elapsed = time.monotonic() - started
        timer.join()
        assert response.status_code == 200 and response.json()["job_id"] == submitted[0]
        assert elapsed < 10, "the poll was not answered when the job arrived"


def test_long_poll_times_out_empty(coordinator: RunningCoordinator) -> None:
    """An empty long-poll is held about max_wait_seconds, then answers 204."""
    with ScriptedMiner(coordinator) as miner:
        miner.register()
        started = time.monotonic()
        assert miner.poll(0.5).status_code == 204
        assert time.monotonic() - started >= 0.45


def test_poll_answer_carries_all_constraint_fields(coordinator: RunningCoordinator,
                                                   coordinator_client: Client) -> None:
    """The poll answer has the payload as submitted and every constraint field, nulls included."""
    with ScriptedMiner(coordinator) as miner:
        miner.register()
        coordinator_client.submit_job(PAYLOAD, constraints={"gpu": RTX_3090["name"], "models": ["tiny"]})
        job = miner.claim()
        assert job["payload"] == PAYLOAD
        assert job["constraints"]["gpu"] == RTX_3090["name"] and job["constraints"]["models"] == ["tiny"]
        for field in ("gpu_type", "min_vram_gb", "min_gpu_memory", "cuda", "region", "max_price"):
            assert field in job["constraints"] and job["constraints"][field] is None


def test_fifo_order(coordinator: RunningCoordinator, coordinator_client: Client) -> None:
    """Jobs go out first in, first out."""
    ids = [coordinator_client.submit_job({**PAYLOAD, "n": n})["job_id"] for n in range(3)]
    with ScriptedMiner(coordinator) as miner:
        miner.register(concurrency=3)
        assert [miner.claim()["job_id"] for _ in ids] == ids


@pytest.mark.parametrize(
    ("constraints", "served"),
    [
        ({"gpu_type": "nvidia-rtx-3090", "min_gpu_memory": 24}, True),
        ({"gpu": "NVIDIA GeForce RTX 3090", "min_vram_gb": 8}, True),
        ({"gpu_type": "rtx-4090"}, False),
        ({"gpu": "RTX 3090"}, False),
        ({"min_vram_gb": 25}, False),
        ({"min_gpu_memory": 25}, False),
        ({"cuda": "12"}, True),
        ({"cuda": "11.8"}, False),
        ({"models": ["tiny"]}, True),
        ({"models": ["tiny", "llama2"]}, False),
        ({"region": "eu"}, False),
        ({"max_price": 0.01}, True),
        ({"max_price": 0.001}, False),
    ],
)
def test_matching_on_both_spellings(coordinator: RunningCoordinator, coordinator_client: Client,
                                    constraints: dict[str, object], served: bool) -> None:
    """A job goes only to a miner that meets its constraints, in the published or the reference spelling."""
    with ScriptedMiner(coordinator) as miner:
        miner.register()
        job_id = coordinator_client.submit_job(PAYLOAD, constraints=constraints)["job_id"]
        response = miner.poll(0)
        if served:
            assert response.status_code == 200 and response.json()["job_id"] == job_id
        else:
            assert response.status_code == 204
            assert coordinator_client.get_job(job_id)["state"] == "QUEUED"


def test_unmatched_job_does_not_block_the_queue(coordinator: RunningCoordinator, coordinator_client: Client) -> None:
    """A miner skips an older job it cannot serve and takes the next one it can."""
    coordinator_client.submit_job(PAYLOAD, constraints={"gpu_type": "h100"})
    servable = coordinator_client.submit_job(PAYLOAD)["job_id"]
    with ScriptedMiner(coordinator) as miner:
        miner.register()
        assert miner.claim()["job_id"] == servable


def test_concurrency_limit_and_fail_frees_the_slot(coordinator: RunningCoordinator,
                                                  coordinator_client: Client) -> None:
    """A miner with concurrency 1 gets no second job until its first ends; /fail frees the slot like /result."""
    first, second = (coordinator_client.submit_job(PAYLOAD)["job_id"] for _ in range(2))
    with ScriptedMiner(coordinator) as miner:
        miner.register(concurrency=1)
        assert miner.claim()["job_id"] == first
        assert miner.poll(0).status_code == 204
        assert miner.fail(first).json() == {"status": "ok", "state": "FAILED"}
        assert miner.claim()["job_id"] == second


def test_waiting_poll_gets_a_job_when_its_slot_frees(coordinator: RunningCoordinator,
                                                     coordinator_client: Client) -> None:
    """A long-poll held while the miner's slot is busy is answered once the running job's result frees it."""
    first, second = (coordinator_client.submit_job(PAYLOAD)["job_id"] for _ in range(2))
    with ScriptedMiner(coordinator) as miner, ScriptedMiner(coordinator) as same:
        miner.register(concurrency=1)
        assert miner.claim()["job_id"] == first
        timer = threading.Timer(0.3, lambda: miner.result(first))
        timer.start()
        response = same.poll(20)
        timer.join()
        assert response.status_code == 200 and response.json()["job_id"] == second


def test_result_from_a_miner_not_holding_the_job_is_409(coordinator: RunningCoordinator,
                                                        coordinator_client: Client) -> None:
    """Another miner's result or failure for a job it does not hold is refused 409 and changes nothing."""
    job_id = coordinator_client.submit_job(PAYLOAD)["job_id"]
    with ScriptedMiner(coordinator, "rig-01") as holder, ScriptedMiner(coordinator, "rig-02") as other:
        holder.register()
        other.register()
        assert other.result(job_id).status_code == 409  # still QUEUED
        holder.claim()
        response = other.result(job_id)
        assert response.status_code == 409 and "rig-02" in response.json()["detail"]
        assert other.fail(job_id).status_code == 409
        assert coordinator_client.get_job(job_id)["state"] == "RUNNING"


def test_unknown_job_result_is_404(coordinator: RunningCoordinator) -> None:
    """A result or failure for an unknown job answers 404 "job not found"."""
    with ScriptedMiner(coordinator) as miner:
        miner.register()
        assert miner.result("nope").status_code == 404
        assert miner.fail("nope").json()["detail"].startswith("job not found")


def test_duplicate_result_is_idempotent_and_a_different_one_is_409(coordinator: RunningCoordinator,
                                                                   coordinator_client: Client) -> None:
    """The same result sent twice is 200 both times and stored once; a different result afterwards is 409."""
    job_id = coordinator_client.submit_job(PAYLOAD)["job_id"]
    with ScriptedMiner(coordinator) as miner:
        miner.register()
        miner.claim()
        receipt = miner.receipt(job_id, "a")
        first = miner.result(job_id, "a", receipt=receipt)
        again = miner.result(job_id, "a", receipt=receipt)
        assert first.status_code == again.status_code == 200
        assert again.json()["receipt"] == first.json()["receipt"]  # the coordinator signs once
        assert miner.result(job_id, "b").status_code == 409
        assert miner.fail(job_id).status_code == 409
    assert coordinator_client.get_receipts(job_id) == [receipt, first.json()["receipt"]]
    assert coordinator_client.get_job_result(job_id)["result"]["output"] == "a"


def test_duplicate_failure_is_idempotent(coordinator: RunningCoordinator, coordinator_client: Client) -> None:
    """The same failure sent twice is 200 both times; a different failure afterwards is 409."""
    job_id = coordinator_client.submit_job(PAYLOAD)["job_id"]
    with ScriptedMiner(coordinator) as miner:
        miner.register()
        miner.claim()
        assert miner.fail(job_id, "OUT_OF_MEMORY", "oom").status_code == 200
        assert miner.fail(job_id, "OUT_OF_MEMORY", "oom").status_code == 200
        assert miner.fail(job_id, "RUNNER_ERROR", "other").status_code == 409


def test_fail_requires_both_strings(coordinator: RunningCoordinator, coordinator_client: Client) -> None:
    """/fail without error_code or error_message is 422 naming the missing field."""
    job_id = coordinator_client.submit_job(PAYLOAD)["job_id"]
    with ScriptedMiner(coordinator) as miner:
        miner.register()
        miner.claim()
        response = miner.http.post(f"/v1/miners/{job_id}/fail", json={"error_code": "OOM"})
        assert response.status_code == 422 and "error_message" in response.json()["detail"]
        response = miner.http.post(f"/v1/miners/{job_id}/fail", json={"error_message": "x"})
        assert response.status_code == 422 and "error_code" in response.json()["detail"]


def test_poll_abandoned_by_its_miner_gets_no_job(coordinator: RunningCoordinator, coordinator_client: Client) -> None:
    """A long-poll whose miner hung up is dropped, so the next job goes to a miner that is still listening."""
    with ScriptedMiner(coordinator, "quitter", timeout=0.3) as quitter, ScriptedMiner(coordinator, "stayer") as stayer:
        quitter.register()
        stayer.register()
        with pytest.raises(httpx.ReadTimeout):
            quitter.poll(20)
        job_id = coordinator_client.submit_job(PAYLOAD)["job_id"]
        assert stayer.claim(5)["job_id"] == job_id
        assert coordinator_client.get_job(job_id)["assigned_miner_id"] == "stayer"
