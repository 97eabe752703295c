"""The transformers runner on a (simulated) GPU host: no silent CPU, and claiming room from memory."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from miner.host.fakenvml import FileNvml
from miner.host.nvml import probe_gpus
from miner.wire.errors import ConfigError
from runners.base import RunnerContext
from tests.gpuhost import write_host
from tests.minerconfig import write_miner_config
from tests.servers import RunningCoordinator
from tests.transformers.helpers import job, running, spec

ROOT = Path(__file__).resolve().parents[2]
needs_cpu_torch = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine's torch can use CUDA")


@needs_cpu_torch
def test_nvml_gpus_with_a_torch_that_cannot_use_them_stop_start(tiny_model: Path, tmp_path: Path) -> None:
    """NVML sees two GPUs, torch is a CPU build: one line naming torch, the driver's CUDA and the fix."""
    gpus = probe_gpus(FileNvml(write_host(tmp_path / "host.json", count=2)))

    async def start() -> None:
        async with running(spec("m", tiny_model), context=RunnerContext(gpus=gpus)):
            pass

    with pytest.raises(ConfigError) as caught:
        asyncio.run(start())
    line = str(caught.value)
    assert "\n" not in line
    assert torch.__version__ in line and "13.0" in line and "580.65.06" in line
    assert "download.pytorch.org/whl/cu" in line and 'device = "cpu"' in line


@needs_cpu_torch
def test_the_daemon_on_that_host_exits_2_with_the_line_and_no_traceback(
    tiny_model: Path, tmp_path: Path, coordinator: RunningCoordinator
) -> None:
    config = write_miner_config(
        tmp_path / "miner.toml", coordinator, tmp_path / "state",
        models=[{"name": "m", "runner": "transformers", "path": str(tiny_model)}], gpus={"enabled": True},
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AITBC_MINER_") and k != "NOTIFY_SOCKET"}
    env["AITBC_MINER_FAKE_NVML"] = str(write_host(tmp_path / "host.json", count=2))
    proc = subprocess.run(
        [sys.executable, "-m", "miner", "run", "--config", str(config)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-2000:]
    assert "Traceback" not in output
    (line,) = proc.stderr.strip().splitlines()[-1:]
    assert line.startswith("config error: ") and "cannot use" in line and "whl/cu" in line, output[-2000:]


def test_a_cpu_model_on_a_gpu_host_is_what_the_owner_asked_for(tiny_model: Path, tmp_path: Path) -> None:
    """``device = "cpu"`` on a host with GPUs: the CPU, without asking torch about CUDA."""
    gpus = probe_gpus(FileNvml(write_host(tmp_path / "host.json", count=2)))

    async def scenario() -> tuple[str, str | None]:
        async with running(spec("m", tiny_model, device="cpu"), context=RunnerContext(gpus=gpus)) as runner:
            result = await runner.run(job("m", "hello", max_new_tokens=2))
            return result.device, result.gpu_uuid

    assert asyncio.run(scenario()) == ("cpu", None)


def test_claiming_room_follows_the_memory_budget(tiny_model: Path) -> None:
    """More memory, more room: the runner's capacity grows with the budget, up to max_batch_size."""

    async def capacity(budget_mb: int, batch: int = 8) -> tuple[int, int]:
        options = {"device": "cpu", "memory_budget_mb": budget_mb, "max_batch_size": batch, "max_new_tokens": 64}
        async with running(spec("m", tiny_model, **options)) as runner:
            return runner.capacity(), runner.max_capacity()

    none, small, large = asyncio.run(capacity(1)), asyncio.run(capacity(5)), asyncio.run(capacity(10))
    assert none[0] == 0  # not even one job's KV cache fits: nothing is claimed (it would fail INSUFFICIENT_VRAM)
    assert 1 <= small[0] < large[0] < 8 and large[1] == 8
    assert asyncio.run(capacity(4000, 4)) == (4, 4)  # memory to spare: the batch cap
