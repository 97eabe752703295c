"""The signed capability benchmark on a simulated two-GPU host, against the real local coordinator.

The miner measures each served model on each GPU at start (fake runner, jobs pinned to each
GPU), signs a record per model and GPU with its receipt key, caches them in
``state_dir/benchmarks.json`` and registers them as ``capabilities.benchmarks``; what the
coordinator stored is read back from its SQLite file.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from coordinator.client import Client
from coordinator.store import Store
from miner.daemon.agent import Agent
from miner.daemon.benchmark import CACHE_FILE_NAME, DEFAULT_BATCH, RECORD_KIND
from miner.daemon.keyfile import KEY_FILE_NAME, load_key
from miner.daemon.statelock import StateLock
from miner.wire.receipts import key_id, verify_receipt
from tests.daemon.helpers import miner_settings
from tests.gpuhost import UUIDS, write_host
from tests.minerconfig import write_miner_config
from tests.servers import RunningCoordinator

ROOT = Path(__file__).resolve().parents[2]
DRIVER = "580.65.06"
NEW_DRIVER = "590.12.04"
FIGURES = ("tokens_per_s_b1", "tokens_per_s_batch", "ttft_ms")
MODELS = [
    {"name": "llama2", "runner": "fake", "delay_s": 0.02},
    {"name": "mistral", "runner": "fake", "delay_s": 0.02, "max_batch_size": 3},
    {"name": "tiny-cpu", "runner": "fake", "delay_s": 0.02, "device": "cpu"},
]
SECRET_PROMPT_WORD = "Benchmark prompt"  # the synthetic prompts start so; a log line must never carry one


def _agent(tmp_path: Path, coordinator: RunningCoordinator, host: Path, models: list[dict[str, Any]],
           **benchmark: Any) -> Agent:
    settings = miner_settings(
        tmp_path / "state",
        coordinator.url,
        fake_nvml=host,
        coordinator={"api_key": coordinator.miner_key},
        gpus={"enabled": True},
        models=models,
        benchmark={"enabled": True, "max_new_tokens": 6, **benchmark},
    )
    return Agent(settings, handle_signals=False, max_jobs=1)


def _serve_one_job(agent: Agent, client: Client, model: str = "llama2") -> str:
    """Run the miner until it has served one job of ``model`` (so it registered first); the job's id."""
    job_id = str(client.submit_job({"model": model, "prompt": "one job", "parameters": {"max_tokens": 4}},
                                   ttl_seconds=120)["job_id"])
    assert asyncio.run(agent.serve()) == 0
    assert client.get_job(job_id)["state"] == "COMPLETED"
    return job_id


def _registered(coordinator: RunningCoordinator) -> dict[str, Any]:
    store = Store(coordinator.db_path)
    try:
        miner = store.get_miner("rig-test")
    finally:
        store.close()
    assert miner is not None
    return miner.capabilities


def _by_pair(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    pairs = {(r["model"], r["gpu_uuid"]): r for r in records}
    assert len(pairs) == len(records), "one record per model and GPU"
    return pairs


def _events(stream: io.StringIO, name: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("event") == name]


def test_registered_capabilities_carry_a_signed_record_per_model_per_gpu(
    tmp_path: Path, coordinator: RunningCoordinator, coordinator_client: Client, log_stream: io.StringIO
) -> None:
    """Two GPUs, two GPU models and a CPU model: five records, each verifying with the miner's key."""
    host = write_host(tmp_path / "host.json", count=2, driver=DRIVER)
    agent = _agent(tmp_path, coordinator, host, MODELS)
    _serve_one_job(agent, coordinator_client)
    caps = _registered(coordinator)
    records = _by_pair(caps["benchmarks"])
    assert set(records) == {
        ("llama2", UUIDS[0]), ("llama2", UUIDS[1]), ("mistral", UUIDS[0]), ("mistral", UUIDS[1]), ("tiny-cpu", "cpu")
    }
    assert agent.key_id is not None and caps["receipt_key"]["key_id"] == agent.key_id
    for (model, gpu), record in records.items():
        verify_receipt(record, agent.key_id)
        assert record["kind"] == RECORD_KIND and record["miner_id"] == "rig-test"
        assert all(record[f] > 0 for f in FIGURES), record
        assert record["batch"] == (3 if model == "mistral" else DEFAULT_BATCH)
        assert record["max_new_tokens"] == 6
        software = record["software"]
        assert software["runner"] == "fake" and software["model_revision"] == "fake-1"
        if gpu == "cpu":
            assert "driver" not in software and "cuda" not in software
        else:
            assert software["driver"] == DRIVER and software["cuda"] == "13.0"
    measured = _events(log_stream, "benchmark_measured")
    assert sorted((e["model"], e["gpu"]) for e in measured) == sorted(records)
    assert SECRET_PROMPT_WORD not in log_stream.getvalue()
    cache = tmp_path / "state" / CACHE_FILE_NAME
    assert cache.stat().st_mode & 0o777 == 0o600
    assert _by_pair(json.loads(cache.read_text(encoding="utf-8"))["records"]) == records


def test_a_restart_reuses_the_cache_and_a_new_driver_measures_again(
    tmp_path: Path, coordinator: RunningCoordinator, coordinator_client: Client, log_stream: io.StringIO
) -> None:
    """Same host: the same signed records (cached); the host file's driver changes: new records with it."""
    host = write_host(tmp_path / "host.json", count=2, driver=DRIVER)
    models = MODELS[:1]
    _serve_one_job(_agent(tmp_path, coordinator, host, models), coordinator_client)
    first = _by_pair(_registered(coordinator)["benchmarks"])

    log_stream.truncate(0)
    log_stream.seek(0)
    again = _agent(tmp_path, coordinator, host, models)
    _serve_one_job(again, coordinator_client)
    second = _by_pair(_registered(coordinator)["benchmarks"])
    assert second == first  # the very same records, signatures included
    assert sorted(e["gpu"] for e in _events(log_stream, "benchmark_cached")) == sorted(UUIDS[:2])
    assert _events(log_stream, "benchmark_measured") == []

    write_host(host, count=2, driver=NEW_DRIVER)
    log_stream.truncate(0)
    log_stream.seek(0)
    upgraded = _agent(tmp_path, coordinator, host, models)
    _serve_one_job(upgraded, coordinator_client)
    third = _by_pair(_registered(coordinator)["benchmarks"])
    assert set(third) == set(first)
    for pair, record in third.items():
        verify_receipt(record, upgraded.key_id)
        assert record["software"]["driver"] == NEW_DRIVER
        assert record["signature"]["sig"] != first[pair]["signature"]["sig"]
    assert len(_events(log_stream, "benchmark_measured")) == 2
    cached = json.loads((tmp_path / "state" / CACHE_FILE_NAME).read_text(encoding="utf-8"))["records"]
    assert {r["software"]["driver"] for r in cached} == {NEW_DRIVER}


def test_a_failing_model_is_published_without_a_record_and_the_miner_serves(
    tmp_path: Path, coordinator: RunningCoordinator, coordinator_client: Client, log_stream: io.StringIO
) -> None:
    """A model whose jobs fail and one that hangs past benchmark.timeout_s get no record; the others do."""
    host = write_host(tmp_path / "host.json", count=2)
    models = [
        MODELS[0],
        {"name": "broken", "runner": "fake", "delay_s": 0.01, "fail_mode": "error"},
        {"name": "stuck", "runner": "fake", "delay_s": 0.01, "fail_mode": "hang", "devices": [1]},
    ]
    agent = _agent(tmp_path, coordinator, host, models, timeout_s=0.5)
    _serve_one_job(agent, coordinator_client, model="llama2")
    caps = _registered(coordinator)
    assert caps["models"] == ["broken", "llama2", "stuck"]  # still served: a benchmark never stops the miner
    assert set(_by_pair(caps["benchmarks"])) == {("llama2", UUIDS[0]), ("llama2", UUIDS[1])}
    failed = sorted((e["model"], e["gpu"], e["error_code"]) for e in _events(log_stream, "benchmark_failed"))
    assert failed == [
        ("broken", UUIDS[0], "RUNNER_ERROR"), ("broken", UUIDS[1], "RUNNER_ERROR"), ("stuck", UUIDS[1], "DEADLINE_EXCEEDED")
    ]
    assert SECRET_PROMPT_WORD not in log_stream.getvalue()


def test_a_shutdown_during_the_benchmark_stops_it_without_a_failure(
    tmp_path: Path, coordinator: RunningCoordinator, log_stream: io.StringIO
) -> None:
    """A stop asked while a model's benchmark job hangs cancels it: the miner exits 0 without waiting
    for benchmark.timeout_s, and the model is neither failed nor given a record."""
    host = write_host(tmp_path / "host.json", count=2)
    models = [{"name": "stuck", "runner": "fake", "delay_s": 0.01, "fail_mode": "hang", "devices": [0]}]
    agent = _agent(tmp_path, coordinator, host, models, timeout_s=20)

    async def scenario() -> int:
        task = asyncio.create_task(agent.serve())
        while agent.runtime is None:  # start-up reached the benchmark
            await asyncio.sleep(0.01)
        agent.request_exit("test")
        return await task

    assert asyncio.run(scenario()) == 0
    assert agent.benchmarks == []
    assert _events(log_stream, "benchmark_failed") == [] and _events(log_stream, "benchmark_measured") == []


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AITBC_MINER_") and k != "NOTIFY_SOCKET"}
    return subprocess.run(
        [sys.executable, "-m", "miner", *args], cwd=ROOT, env={**clean, **(env or {})},
        capture_output=True, text=True, timeout=120,
    )


def test_bench_json_prints_records_that_verify_and_a_tampered_one_does_not(
    tmp_path: Path, coordinator: RunningCoordinator
) -> None:
    """``bench --json``: a verifiable record per model and GPU, the cache rewritten; verify-receipt says
    "benchmark record" for one and rejects it once a figure is changed (exit 1)."""
    host = write_host(tmp_path / "host.json", count=2)
    state = tmp_path / "state"
    config = write_miner_config(
        tmp_path / "miner.toml", coordinator, state, models=MODELS[:2], gpus={"enabled": True}, fake_nvml=str(host)
    )
    proc = _cli("bench", "--config", str(config), "--json", env={"AITBC_MINER_BENCHMARK__MAX_NEW_TOKENS": "5"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = _by_pair(json.loads(proc.stdout))
    assert set(records) == {(m, g) for m in ("llama2", "mistral") for g in UUIDS[:2]}
    signer = key_id(load_key(state / KEY_FILE_NAME).verify_key)
    for record in records.values():
        verify_receipt(record, signer)
        assert record["max_new_tokens"] == 5 and all(record[f] > 0 for f in FIGURES)
    cached = json.loads((state / CACHE_FILE_NAME).read_text(encoding="utf-8"))["records"]
    assert _by_pair(cached) == records

    one = records[("mistral", UUIDS[1])]
    good = tmp_path / "record.json"
    good.write_text(json.dumps(one), encoding="utf-8")
    ok = _cli("verify-receipt", str(good), "--public-key", signer)
    assert ok.returncode == 0, ok.stderr
    assert f"OK: benchmark record for model mistral on GPU {UUIDS[1]} from the miner, signed by {signer}" in ok.stdout
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps({**one, "tokens_per_s_b1": one["tokens_per_s_b1"] * 10}), encoding="utf-8")
    bad = _cli("verify-receipt", str(tampered), "--public-key", signer)
    assert bad.returncode == 1 and "INVALID" in bad.stderr and "OK" not in bad.stdout


def test_bench_refuses_a_state_folder_a_miner_holds_and_prints_text_lines(
    tmp_path: Path, coordinator: RunningCoordinator
) -> None:
    """While a miner holds the state folder: one line, exit 1; once free: one text line per model and GPU."""
    host = write_host(tmp_path / "host.json", count=2)
    state = tmp_path / "state"
    config = write_miner_config(
        tmp_path / "miner.toml", coordinator, state, models=MODELS[:1], gpus={"enabled": True}, fake_nvml=str(host)
    )
    lock = StateLock(state)
    lock.acquire()
    try:
        held = _cli("bench", "--config", str(config))
    finally:
        lock.release()
    assert held.returncode == 1 and held.stdout == ""
    message = [line for line in held.stderr.splitlines() if not line.startswith("{")]
    assert len(message) == 1 and "is in use by a running miner" in message[0] and "stop it first" in message[0]
    assert not (state / CACHE_FILE_NAME).exists()

    free = _cli("bench", "--config", str(config))
    assert free.returncode == 0, free.stderr[-2000:]
    lines = free.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == [f"llama2 on {UUIDS[0]}", f"llama2 on {UUIDS[1]}"]
    assert all("tokens/s at batch 1" in line and f"at batch {DEFAULT_BATCH}" in line for line in lines[:2])
