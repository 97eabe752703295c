"""`aitbc-miner run` serving a local llama2 folder through the transformers runner, end to end."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from coordinator.client import Client
from miner.wire.receipts import verify_receipt
from tests.minerconfig import write_miner_config
from tests.servers import RunningCoordinator
from tests.transformers.helpers import job, running, spec

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "The miner claims a job from the coordinator"


def write_config(path: Path, coordinator: RunningCoordinator, state_dir: Path, model_dir: Path) -> Path:
    return write_miner_config(
        path, coordinator, state_dir, miner_id="rig-llama", concurrency=2,
        models=[{"name": "llama2", "runner": "transformers", "path": model_dir, "max_new_tokens": 16}],
    )


def test_llama2_from_a_local_folder_runs_through_aitbc_miner_run(
    tmp_path: Path, tiny_model: Path, coordinator: RunningCoordinator, coordinator_client: Client
) -> None:
    """A prompt job and a chat job for llama2 complete with signed receipts and the runner's greedy text."""
    prompt_id = coordinator_client.submit_job(
        {"model": "llama2", "prompt": PROMPT, "parameters": {"max_new_tokens": 12, "temperature": 0}}, ttl_seconds=120
    )["job_id"]
    chat_id = coordinator_client.submit_job(
        {"model": "llama2", "messages": [{"role": "user", "content": "hello"}]}, ttl_seconds=120
    )["job_id"]
    config = write_config(tmp_path / "miner.toml", coordinator, tmp_path / "state", tiny_model)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AITBC_MINER_") and k != "NOTIFY_SOCKET"}
    proc = subprocess.run(
        [sys.executable, "-m", "miner", "run", "--config", str(config), "--max-jobs", "2"],
        cwd=ROOT,
        env={**env, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    async def expected() -> str:
        async with running(spec("llama2", tiny_model)) as runner:
            return (await runner.run(job("llama2", PROMPT, max_new_tokens=12))).output

    for job_id in (prompt_id, chat_id):
        assert coordinator_client.get_job(job_id)["state"] == "COMPLETED"
        answer = coordinator_client.get_job_result(job_id)
        verify_receipt(answer["receipt"])
        metadata = answer["result"]["metadata"]
        assert metadata["runner"] == "transformers" and metadata["model_revision"].startswith("local-")
        assert metadata["device"] == "cpu" and metadata["finish_reason"] in ("stop", "length")
        assert metadata["completion_tokens"] <= (12 if job_id == prompt_id else 16)
    assert coordinator_client.get_job_result(prompt_id)["result"]["output"] == asyncio.run(expected())
