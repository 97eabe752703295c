"""A multi-GPU host, simulated (``AITBC_MINER_FAKE_NVML``): every GPU runs its own jobs.

The daemon reads its GPUs from a JSON file instead of the driver; the fake runner places
its models on them exactly as the transformers runner does (runners.placement), so these
tests prove the binding from the configured GPU to the receipt's ``gpu_uuid``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from coordinator.client import Client
from miner.daemon.agent import Agent
from miner.host.fakenvml import FakeNvml, FileNvml
from miner.host.nvml import probe_gpus
from miner.wire.errors import ConfigError
from miner.wire.receipts import verify_receipt
from tests.daemon.helpers import miner_settings
from tests.gpuhost import UUIDS, write_host
from tests.minerconfig import write_miner_config
from tests.servers import RunningCoordinator

ROOT = Path(__file__).resolve().parents[2]


def _submit(client: Client, n: int, model: str = "llama2") -> list[str]:
    return [
        client.submit_job({"model": model, "prompt": f"job {i}", "parameters": {"max_tokens": 4}}, ttl_seconds=120)[
            "job_id"
        ]
        for i in range(n)
    ]


def _agent(
    tmp_path: Path, coordinator: RunningCoordinator, host: Path, max_jobs: int | None = None, **overrides: Any
) -> Agent:
    overrides.setdefault("coordinator", {})["api_key"] = coordinator.miner_key
    overrides.setdefault("gpus", {})["enabled"] = True
    settings = miner_settings(tmp_path / "state", coordinator.url, fake_nvml=host, **overrides)
    return Agent(settings, handle_signals=False, max_jobs=max_jobs)


def test_instance_environment_binds_every_job_to_its_gpu(
    tmp_path: Path, coordinator: RunningCoordinator, coordinator_client: Client
) -> None:
    """``aitbc-miner@1``'s environment on a two-GPU host: GPU 1 is registered and in every receipt."""
    host = write_host(tmp_path / "host.json", count=2)
    config = write_miner_config(
        tmp_path / "miner.toml",
        coordinator,
        tmp_path / "state",
        models=[{"name": "llama2", "runner": "fake", "delay_s": 0.02}],
        gpus={"enabled": True},
    )
    ids = _submit(coordinator_client, 4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AITBC_MINER_") and k != "NOTIFY_SOCKET"}
    env.update({"AITBC_MINER_FAKE_NVML": str(host), "AITBC_MINER_GPUS__DEVICES": '["1"]'})  # as the @ unit sets it
    proc = subprocess.run(
        [sys.executable, "-m", "miner", "run", "--config", str(config), "--max-jobs", "4"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    events = [json.loads(line) for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("{")]
    warnings = [e for e in events if e["event"] == "simulated_gpu_host"]
    assert warnings and "SIMULATED GPU HOST" in warnings[0]["detail"]
    for job_id in ids:
        answer = coordinator_client.get_job_result(job_id)
        assert answer["receipt"]["gpu_uuid"] == UUIDS[1]
        assert answer["result"]["metadata"]["gpu_uuid"] == UUIDS[1]


def test_a_copy_per_gpu_and_jobs_on_both(
    tmp_path: Path, coordinator: RunningCoordinator, coordinator_client: Client
) -> None:
    """Without ``devices`` a model has a copy on each GPU; claiming fills both, receipts name each GPU."""
    host = write_host(tmp_path / "host.json", count=2)
    model = {"name": "llama2", "runner": "fake", "delay_s": 0.3, "max_batch_size": 2}
    ids = _submit(coordinator_client, 8)
    agent = _agent(tmp_path, coordinator, host, models=[model], max_jobs=8)
    assert asyncio.run(agent.serve()) == 0
    assert agent.slots == 4  # two GPUs x max_batch_size 2, no concurrency setting
    uuids = [coordinator_client.get_job_result(j)["receipt"]["gpu_uuid"] for j in ids]
    assert set(uuids) == {UUIDS[0], UUIDS[1]}
    assert [g["uuid"] for g in agent.capabilities["gpus"]] == [UUIDS[0], UUIDS[1]]


def test_a_sharded_model_lists_every_gpu_in_its_receipt(
    tmp_path: Path, coordinator: RunningCoordinator, coordinator_client: Client
) -> None:
    """``devices = [1, 0]``: one copy over both GPUs; the signed receipt lists both, in that order."""
    host = write_host(tmp_path / "host.json", count=2)
    model = {"name": "llama2", "runner": "fake", "delay_s": 0.02, "devices": [1, UUIDS[0]]}
    (job_id,) = _submit(coordinator_client, 1)
    agent = _agent(tmp_path, coordinator, host, models=[model], max_jobs=1)
    assert asyncio.run(agent.serve()) == 0
    receipt = coordinator_client.get_job_result(job_id)["receipt"]
    verify_receipt(receipt, agent.key_id)
    assert receipt["gpu_uuid"] == UUIDS[1] and receipt["gpu_uuids"] == [UUIDS[1], UUIDS[0]]


def test_claiming_follows_free_gpu_memory(
    tmp_path: Path, coordinator: RunningCoordinator, coordinator_client: Client
) -> None:
    """Room for one job's memory: one in flight; the GPU frees memory: four in flight (the batch cap)."""
    host = write_host(tmp_path / "host.json", count=1, per_gpu={0: {"free_mb": 1500}})
    model = {"name": "llama2", "runner": "fake", "delay_s": 0.4, "max_batch_size": 4, "vram_per_job_mb": 1000}
    _submit(coordinator_client, 12)
    agent = _agent(tmp_path, coordinator, host, models=[model], max_jobs=12)

    async def scenario() -> tuple[int, int]:
        task = asyncio.create_task(agent.serve())
        seen_low = 0
        async with asyncio.timeout(30):
            while agent.jobs_ended < 3:
                seen_low = max(seen_low, len(agent.inflight))
                await asyncio.sleep(0.01)
        write_host(host, count=1, per_gpu={0: {"free_mb": 9000}})
        seen_high = 0
        async with asyncio.timeout(30):
            while seen_high < 4:
                seen_high = max(seen_high, len(agent.inflight))
                await asyncio.sleep(0.01)
        assert await task == 0
        return seen_low, seen_high

    low, high = asyncio.run(scenario())
    assert low == 1 and high == 4
    assert agent.slots == 4


def test_a_configured_gpu_that_does_not_exist_is_an_error_with_or_without_a_driver(tmp_path: Path) -> None:
    """``gpus.devices = [3]``: one line naming the setting, on a two-GPU host and on a host without a driver."""
    host = write_host(tmp_path / "host.json", count=2)
    with pytest.raises(ConfigError, match=r"gpus.devices: no GPU 3 on this host \(found: 0 \(GPU-0a1b"):
        probe_gpus(FileNvml(host), [3])
    with pytest.raises(ConfigError, match=r"gpus.devices: GPU 3 configured, but NVML cannot see any GPU"):
        probe_gpus(FakeNvml(init_error="library_not_found"), [3])
    assert probe_gpus(FakeNvml(init_error="library_not_found"), []) == []  # no GPU asked for: CPU mode


def test_a_model_on_a_gpu_the_miner_does_not_have_stops_start(
    tmp_path: Path, coordinator: RunningCoordinator
) -> None:
    """A model's ``devices`` outside ``gpus.devices`` is refused at start, naming the model."""
    host = write_host(tmp_path / "host.json", count=2)
    model = {"name": "llama2", "runner": "fake", "devices": [0]}
    agent = _agent(tmp_path, coordinator, host, models=[model], gpus={"devices": [1]})
    with pytest.raises(ConfigError, match=r"models\[name='llama2'\].devices: GPU 0 is not one of this miner's GPUs"):
        asyncio.run(agent.serve())


def test_the_simulated_host_is_reread_and_survives_a_half_written_file(tmp_path: Path) -> None:
    """Every poll re-reads the file; a file caught mid-rewrite keeps the last good reading."""
    host = write_host(tmp_path / "host.json", count=1, per_gpu={0: {"free_mb": 1000}})
    nvml = FileNvml(host)
    nvml.nvmlInit()
    assert nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(0)).free == 1000 * 2**20
    write_host(host, count=1, per_gpu={0: {"free_mb": 5000, "energy_mj": 7000}})
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    assert nvml.nvmlDeviceGetMemoryInfo(handle).free == 5000 * 2**20
    assert nvml.nvmlDeviceGetTotalEnergyConsumption(handle) == 7000
    host.write_text('{"gpus": [', encoding="utf-8")
    assert nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(0)).free == 5000 * 2**20


def test_a_bad_simulated_host_file_is_one_line_naming_the_variable(tmp_path: Path) -> None:
    bad = tmp_path / "host.json"
    bad.write_text('{"gpus": [{"index": 0, "memory_mb": "lots"}]}', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"AITBC_MINER_FAKE_NVML: .*gpus\[0\] has a value of the wrong type"):
        FileNvml(bad)
    with pytest.raises(ConfigError, match=r"AITBC_MINER_FAKE_NVML: cannot read .*nowhere.json"):
        FileNvml(tmp_path / "nowhere.json")
