"""The daemon on (fake) GPUs: probe through NVML, capabilities, per-GPU slots, VRAM admission, stats."""

from __future__ import annotations

import asyncio
from pathlib import Path

from miner.host.fakenvml import FakeGpu, FakeNvml
from miner.wire.errors import ErrorCode
from tests.daemon.helpers import ScriptedCoordinator, fake_miner, job


def _two_3090s() -> FakeNvml:
    return FakeNvml(
        [FakeGpu(name="NVIDIA GeForce RTX 3090", memory_total_mb=24576, utilization_pct=37) for _ in range(2)]
    )


def test_gpu_miner_registers_its_gpus_and_runs_one_slot_per_gpu(tmp_path: Path) -> None:
    """With two GPUs the miner registers both (name, memory_mb, uuid), CUDA and its key, and takes two jobs at once."""
    nvml = _two_3090s()
    coord = ScriptedCoordinator([job("a"), job("b")])
    agent = fake_miner(
        tmp_path,
        coord,
        nvml=nvml,
        max_jobs=2,
        settings={
            "gpus": {"enabled": True},
            "coordinator": {"heartbeat_interval_s": 0.1},
            "models": [{"name": "llama2", "runner": "fake", "delay_s": 1.0}],
        },
    )
    assert asyncio.run(agent.serve()) == 0
    order = [e for e, _, _ in coord.calls if e in ("poll", "result")]
    assert order[:2] == ["poll", "poll"] and order.index("result") >= 2  # both jobs held at once
    caps = [body for e, _, body in coord.calls if e == "register"][0]
    assert caps["concurrency"] == 2
    gpus = caps["capabilities"]["gpus"]
    assert [g["name"] for g in gpus] == ["NVIDIA GeForce RTX 3090"] * 2
    assert [g["memory_mb"] for g in gpus] == [24576, 24576] and gpus[0]["uuid"] != gpus[1]["uuid"]
    assert caps["capabilities"]["cuda"] == "12.4"
    assert caps["capabilities"]["receipt_key"] == {"alg": "Ed25519", "key_id": agent.key_id}
    assert caps["capabilities"]["software"]["name"] == "aitbc-miner"
    receipt = coord.results["a"][0]["result"]["receipt"]
    assert receipt["gpu_uuid"] in {g["uuid"] for g in gpus}
    beats = [body for e, _, body in coord.calls if e == "heartbeat"]
    assert any(b["inflight"] == 2 for b in beats)  # the true count while both jobs ran
    assert beats[-1]["metadata"]["gpus"][0]["utilization_pct"] == 37


def test_job_needing_more_vram_than_any_gpu_is_failed_insufficient_vram(tmp_path: Path) -> None:
    """A job needing more memory than any GPU has (published spelling) fails INSUFFICIENT_VRAM; a fitting one runs."""
    coord = ScriptedCoordinator(
        [job("big", constraints={"min_gpu_memory": 48}), job("fits", constraints={"min_vram_gb": 16})]
    )
    agent = fake_miner(
        tmp_path, coord, nvml=_two_3090s(), max_jobs=2, settings={"gpus": {"enabled": True}, "concurrency": 1}
    )
    assert asyncio.run(agent.serve()) == 0
    assert coord.fails["big"][0]["error_code"] == ErrorCode.INSUFFICIENT_VRAM
    assert "48" in coord.fails["big"][0]["error_message"]
    assert coord.results["fits"]


def test_no_driver_means_cpu_mode(tmp_path: Path) -> None:
    """Without an NVIDIA driver the miner registers no GPUs and still serves on the CPU."""
    coord = ScriptedCoordinator([job("a")])
    agent = fake_miner(
        tmp_path, coord, nvml=FakeNvml(init_error="library_not_found"), max_jobs=1, settings={"gpus": {"enabled": True}}
    )
    assert asyncio.run(agent.serve()) == 0
    caps = [body for e, _, body in coord.calls if e == "register"][0]["capabilities"]
    assert caps["gpus"] == [] and caps["device"] == "cpu" and "cuda" not in caps
    assert coord.results["a"][0]["result"]["receipt"]["gpu_uuid"] == "cpu"
