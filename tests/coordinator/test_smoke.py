"""The happy path: submit, claim, result, read back."""

from __future__ import annotations

from coordinator.client import Client
from miner.wire.receipts import verify_receipt
from tests.coordinator.helpers import ScriptedMiner
from tests.servers import RunningCoordinator


def test_job_round_trip(coordinator: RunningCoordinator, coordinator_client: Client) -> None:
    """A submitted job is claimed by a matching miner, completed, and served with its verifying receipt."""
    with ScriptedMiner(coordinator) as miner:
        miner.register()
        job = coordinator_client.submit_job({"model": "tiny", "prompt": "hi"}, constraints={"gpu_type": "rtx-3090"})
        assert job["state"] == "QUEUED"
        claimed = miner.claim()
        assert claimed["job_id"] == job["job_id"]
        assert claimed["payload"] == {"model": "tiny", "prompt": "hi"}
        assert coordinator_client.get_job(job["job_id"])["state"] == "RUNNING"
        assert miner.result(job["job_id"], output="hello").status_code == 200
        done = coordinator_client.wait(job["job_id"], timeout=10)
        assert done["state"] == "COMPLETED"
        answer = coordinator_client.get_job_result(job["job_id"])
        assert answer["result"]["output"] == "hello"
        verify_receipt(answer["receipt"], miner.key.verify_key)
