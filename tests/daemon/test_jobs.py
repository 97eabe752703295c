"""One job to its outcome: deadlines from the TTL, the result body, and the signed receipt."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from nacl.signing import SigningKey

from miner.daemon.capabilities import build_capabilities
from miner.daemon.client import AssignedJob
from miner.daemon.jobs import DEFAULT_JOB_CAP_S, JobExecutor, JobRun
from miner.wire.receipts import canonical_json, key_id, sha256_hex, verify_receipt
from runners.base import ModelSpec, RunnerContext
from runners.fake import FakeRunner

KEY = SigningKey(b"\x22" * 32)
NOW = datetime(2026, 11, 28, 17, 0, 0, tzinfo=UTC).timestamp()


def _executor() -> JobExecutor:
    runner = FakeRunner([ModelSpec(name="llama2", runner="fake", delay_s=0.0)], RunnerContext())
    asyncio.run(runner.start())
    caps = build_capabilities(gpus=[], models=["llama2"], price=0.01)
    return JobExecutor(
        miner_id="rig-7",
        signing_key=KEY,
        runners_by_model={"llama2": runner},
        capabilities=lambda: caps,
        clock=lambda: NOW,
    )


def test_time_allowed_comes_from_expires_at_then_ttl_then_the_cap() -> None:
    """expires_at (naive is UTC) wins, then ttl_seconds, then the default cap."""
    executor = _executor()
    expiry = datetime(2026, 11, 28, 17, 2, 0, tzinfo=UTC)
    assert executor.seconds_left(AssignedJob("a", {}, expires_at=expiry, ttl_seconds=5)) == 120
    assert executor.seconds_left(AssignedJob("b", {}, ttl_seconds=5)) == 5
    assert executor.seconds_left(AssignedJob("c", {})) == DEFAULT_JOB_CAP_S


def test_result_body_carries_output_metadata_metrics_and_a_verifying_receipt() -> None:
    """A completed job's body has output, metadata, metrics and a receipt signed by the miner's key."""
    payload = {"model": "llama2", "prompt": "hello there", "parameters": {"max_tokens": 5}}
    outcome = asyncio.run(_executor().execute(JobRun(AssignedJob("job-1", payload))))
    assert outcome.kind == "result" and outcome.body is not None
    result, metrics = outcome.body["result"], outcome.body["metrics"]
    assert len(result["output"].split()) == 5
    meta = result["metadata"]
    assert meta["model"] == "llama2" and meta["runner"] == "fake" and meta["completion_tokens"] == 5
    assert meta["finish_reason"] == "length" and meta["device"] == "cpu" and "duration_ms" in meta
    assert metrics["duration_ms"] >= 0 and metrics["units"] == result["receipt"]["units"]
    receipt = result["receipt"]
    verify_receipt(receipt, key_id(KEY.verify_key))
    assert receipt["job_id"] == "job-1" and receipt["miner_id"] == receipt["provider"] == "rig-7"
    assert receipt["prompt_sha256"] == sha256_hex("hello there")
    assert receipt["output_sha256"] == sha256_hex(result["output"])
    assert receipt["unit_type"] == "gpu_seconds" and receipt["gpu_uuid"] == "cpu"
    assert receipt["timestamp"].endswith("Z") and receipt["tokens"] == {"prompt": 2, "completion": 5}
    assert None not in receipt.values()


def test_chat_receipt_hashes_the_canonical_messages() -> None:
    """For chat input the receipt's prompt_sha256 is the SHA-256 of the canonical JSON of the messages."""
    messages = [{"role": "user", "content": "hé"}]
    outcome = asyncio.run(_executor().execute(JobRun(AssignedJob("job-2", {"model": "llama2", "messages": messages}))))
    assert outcome.body is not None
    assert outcome.body["result"]["receipt"]["prompt_sha256"] == sha256_hex(canonical_json(messages))


def test_cancelled_before_start_is_dropped_and_shutdown_becomes_shutdown() -> None:
    """A job cancelled by the coordinator is dropped; one stopped by shutdown fails SHUTDOWN."""
    executor = _executor()
    payload = {"model": "llama2", "prompt": "x"}
    dropped = JobRun(AssignedJob("d", payload))
    dropped.cancel()
    assert asyncio.run(executor.execute(dropped)).kind == "dropped"
    stopping = JobRun(AssignedJob("s", payload))
    stopping.cancel(shutdown=True)
    outcome = asyncio.run(executor.execute(stopping))
    assert outcome.kind == "fail" and outcome.code == "SHUTDOWN"
