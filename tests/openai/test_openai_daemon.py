"""Jobs end to end: coordinator -> `aitbc-miner run` -> openai runner -> the engine, and back."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from coordinator.client import Client
from coordinator.store import Store
from miner.daemon.keyfile import KEY_FILE_NAME, load_key
from miner.wire.receipts import verify_receipt
from tests.minerconfig import write_miner_config
from tests.openai.conftest import Engine
from tests.openai.helpers import make_job, make_runner, wait_until
from tests.servers import RunningCoordinator

PROMPT = "The miner claims a job"


def _write_config(tmp_path: Path, coordinator: RunningCoordinator, engine: Engine) -> Path:
    key_file = tmp_path / "miner-key"
    key_file.write_text(coordinator.miner_key + "\n")
    key_file.chmod(0o600)
    return write_miner_config(
        tmp_path / "miner.toml", coordinator, tmp_path / "state", miner_id="openai-e2e", concurrency=2,
        drain_grace_s=5, coordinator_options={"api_key_file": key_file, "heartbeat_interval_s": 0.2},
        models=[{
            "name": "llama2", "runner": "openai", "base_url": engine.base_url, "served_model": "tiny-llama",
            "max_new_tokens": 256, "recheck_interval_s": 0.2, "extra_body": {"ignore_eos": True},
        }],
    )


def _direct_output(engine: Engine, max_new_tokens: int) -> str:
    """What the runner alone produces for PROMPT (greedy decoding is deterministic)."""

    async def scenario() -> str:
        runner = make_runner(engine.base_url, extra_body={"ignore_eos": True})
        await runner.start()
        try:
            return (await runner.run(make_job(PROMPT, max_new_tokens=max_new_tokens))).output
        finally:
            await runner.aclose()

    return asyncio.run(scenario())


def test_aitbc_miner_run_serves_and_cancels_jobs_through_the_engine(
    tmp_path: Path, coordinator: RunningCoordinator, coordinator_client: Client, engine: Engine
) -> None:
    """`aitbc-miner run` completes an engine job with a signed receipt; cancelling one mid-stream closes the stream."""
    expected = _direct_output(engine, 8)
    config = _write_config(tmp_path, coordinator, engine)
    log_path = tmp_path / "miner.log"
    with log_path.open("wb") as log_file:
        miner = subprocess.Popen(
            [sys.executable, "-m", "miner", "run", "--config", str(config), "--max-jobs", "2"],
            stdout=log_file, stderr=subprocess.STDOUT, env=dict(os.environ),
        )  # fmt: skip
        try:
            done = coordinator_client.submit_job({"model": "llama2", "prompt": PROMPT, "parameters": {"max_new_tokens": 8}})
            final = coordinator_client.wait(done["job_id"], timeout=120)
            answer = coordinator_client.get_job_result(done["job_id"])

            engine.knobs.token_delay_s = 0.1
            engine.log.first_token_sent.clear()
            engine.log.generation_ended.clear()
            long_job = coordinator_client.submit_job(
                {"model": "llama2", "prompt": PROMPT, "parameters": {"max_new_tokens": 200}}
            )
            assert engine.log.first_token_sent.wait(60), "the engine never started the second job"
            coordinator_client.cancel_job(long_job["job_id"])
            closed = engine.log.disconnected.wait(60)
            cancelled = coordinator_client.get_job(long_job["job_id"])
            exit_code = miner.wait(timeout=120)
        finally:
            if miner.poll() is None:
                miner.kill()
                miner.wait()
    log_text = log_path.read_text(errors="replace")
    assert final["state"] == "COMPLETED", log_text[-3000:]
    result: dict[str, Any] = answer["result"]
    assert result["output"] == expected
    receipt = answer["receipt"]
    miner_key = load_key(tmp_path / "state" / KEY_FILE_NAME)
    verify_receipt(receipt, miner_key.verify_key)  # signed by this miner's own key
    assert receipt["runner"] == "openai" and receipt["model_revision"] == "tiny-llama@tiny-engine"
    assert receipt["tokens"]["completion"] == 8
    assert result["metadata"]["device"] == "remote"
    assert closed, "the engine never saw the cancelled job's stream close"
    assert cancelled["state"] == "CANCELLED"
    assert engine.log.generation_ended.wait(30)
    reason, generated = engine.log.finished[-1]
    assert reason == "abort" and generated < 200
    assert exit_code == 0, log_text[-3000:]
    assert PROMPT not in log_text  # the miner never logs a prompt


def _registered_models(coordinator: RunningCoordinator, miner_id: str) -> list[str] | None:
    """The models the coordinator holds for ``miner_id`` now (its file), ``None`` before it registers."""
    store = Store(coordinator.db_path)
    try:
        miner = store.get_miner(miner_id)
    finally:
        store.close()
    return None if miner is None else list(miner.capabilities.get("models", []))


def test_daemon_follows_the_engine_going_away_and_coming_back(
    tmp_path: Path, coordinator: RunningCoordinator, coordinator_client: Client, engine: Engine
) -> None:
    """The daemon starts with the engine down, serves once it is up, withdraws the model when it goes, serves again."""
    from miner.daemon.agent import Agent
    from miner.daemon.settings import load_settings

    engine.stop()
    settings = load_settings(_write_config(tmp_path, coordinator, engine))
    job = {"model": "llama2", "prompt": PROMPT, "parameters": {"max_new_tokens": 4}}
    models = {"models": ["llama2"]}

    async def scenario() -> tuple[list[str], dict, list[str], dict]:
        agent = Agent(settings, gpus=[], handle_signals=False)
        serving = asyncio.create_task(agent.serve())
        try:
            assert await wait_until(lambda: agent.capabilities.get("models") == [], timeout=30), "not registered"
            at_start = list(agent.capabilities["models"])
            first = await asyncio.to_thread(coordinator_client.submit_job, job, models)
            engine.restart()
            first_done = await asyncio.to_thread(coordinator_client.wait, first["job_id"], 60)
            engine.stop()
            # Withdrawn at the coordinator too: a job submitted before the re-registration lands could
            # still be handed to a parked poll on the strength of the old one.
            assert await wait_until(
                lambda: agent.capabilities.get("models") == [] and _registered_models(coordinator, "openai-e2e") == [],
                timeout=30,
            ), "model not withdrawn"
            while_down = list(agent.capabilities["models"])
            second = await asyncio.to_thread(coordinator_client.submit_job, job, models)
            engine.restart()
            second_done = await asyncio.to_thread(coordinator_client.wait, second["job_id"], 60)
            return at_start, first_done, while_down, second_done
        finally:
            agent.request_exit("test over")
            await asyncio.wait_for(serving, 30)

    at_start, first_done, while_down, second_done = asyncio.run(scenario())
    assert at_start == [] and while_down == []
    assert first_done["state"] == "COMPLETED" and second_done["state"] == "COMPLETED"
