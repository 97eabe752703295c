"""/metrics and /healthz scraped over HTTP while the real daemon serves the real local coordinator."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from coordinator.client import Client
from miner.daemon.agent import Agent
from miner.daemon.settings import load_settings
from miner.host.fakenvml import FakeGpu, FakeNvml
from tests.servers import RunningCoordinator

GIB = 1024**3


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(scrape: dict, metric: str, /, **labels: str) -> float:
    return scrape.get((metric, frozenset(labels.items())), 0.0)


async def until(predicate: Callable[[], object], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.05)


def test_metrics_and_health_move_as_jobs_complete(
    tmp_path: Path, coordinator: RunningCoordinator, coordinator_client: Client
) -> None:
    """Scrapes show health going ok, job counters, tokens, units and GPU memory moving, and draining turning /healthz to 503."""
    settings = load_settings(
        None,
        miner_id="rig-metrics",
        state_dir=tmp_path / "state",
        drain_grace_s=20,
        coordinator={
            "url": coordinator.url, "api_key": coordinator.miner_key, "heartbeat_interval_s": 0.3,
            "poll_interval_s": 0.05, "idle_backoff_max_s": 0.2, "long_poll_s": 1,
        },
        metrics={"enabled": True, "listen": "127.0.0.1:0"},
        models=[
            {"name": "llama2", "runner": "fake", "delay_s": 0.02},
            {"name": "slow", "runner": "fake", "delay_s": 1.0},
        ],
    )
    nvml = FakeNvml([FakeGpu("NVIDIA H200", memory_total_mb=143771, memory_used_mb=1024)])
    agent = Agent(settings, nvml=nvml, handle_signals=False)
    submit = lambda model, prompt: coordinator_client.submit_job({"model": model, "prompt": prompt}, ttl_seconds=60)["job_id"]  # noqa: E731

    async def scenario() -> dict[str, object]:
        seen: dict[str, object] = {}
        task = asyncio.create_task(agent.serve())

        async def listening() -> bool:
            return agent.metrics_server is not None and agent.metrics_server.port > 0

        await until(listening)
        async with httpx.AsyncClient(base_url=agent.metrics_server.url) as http:

            async def healthy() -> bool:
                return (await http.get("/healthz")).status_code == 200

            async def scrape() -> dict:
                return parse((await http.get("/metrics")).text)

            await until(healthy)
            seen["before"] = await scrape()
            ids = [await asyncio.to_thread(submit, "llama2", f"prompt {i}") for i in range(3)]
            for job_id in ids:
                assert (await asyncio.to_thread(coordinator_client.wait, job_id, 60))["state"] == "COMPLETED"
            nvml.gpus[0].memory_used_mb = 100_000  # the next heartbeat's NVML reading must show it

            async def settled() -> bool:
                s = await scrape()
                return sample(s, "aitbc_miner_outbox_depth") == 0 and sample(
                    s, "aitbc_miner_gpu_memory_used_bytes", gpu="0", uuid=nvml.gpus[0].uuid, name="NVIDIA H200"
                ) == 100_000 * 1024 * 1024

            await until(settled)
            seen["after"] = await scrape()
            slow = await asyncio.to_thread(submit, "slow", "take your time")

            async def running() -> bool:
                return sample(await scrape(), "aitbc_miner_inflight_jobs") == 1

            await until(running)
            agent.request_exit("test over")
            draining = await http.get("/healthz")
            seen["draining"] = (draining.status_code, draining.text)
            seen["during_drain"] = await scrape()
        seen["rc"] = await task
        seen["slow_state"] = (await asyncio.to_thread(coordinator_client.get_job, slow))["state"]
        return seen

    seen = asyncio.run(scenario())
    before, after, during = seen["before"], seen["after"], seen["during_drain"]
    done = {"model": "llama2", "outcome": "completed", "error_code": "none"}
    assert sample(before, "aitbc_miner_jobs_total", **done) == 0
    assert sample(after, "aitbc_miner_jobs_total", **done) == 3
    assert sample(after, "aitbc_miner_job_duration_seconds_count", model="llama2", outcome="completed") == 3
    assert sample(after, "aitbc_miner_job_tokens_per_second_count", model="llama2") == 3
    assert sample(after, "aitbc_miner_completion_tokens_total", model="llama2") > 0
    assert sample(after, "aitbc_miner_units_total", model="llama2") > 0
    assert sample(after, "aitbc_miner_coordinator_request_duration_seconds_count", endpoint="result") >= 3
    assert sample(after, "aitbc_miner_last_heartbeat_timestamp_seconds") > sample(before, "aitbc_miner_last_heartbeat_timestamp_seconds") > 0
    assert sample(before, "aitbc_miner_model_loaded", model="llama2") == 1 == sample(before, "aitbc_miner_model_loaded", model="slow")
    assert sample(before, "aitbc_miner_gpu_memory_total_bytes", gpu="0", uuid=nvml.gpus[0].uuid, name="NVIDIA H200") == 143771 * 1024 * 1024
    assert sample(during, "aitbc_miner_inflight_jobs") == 1
    assert seen["draining"][0] == 503 and seen["draining"][1].startswith("draining")
    assert seen["rc"] == 0 and seen["slow_state"] == "COMPLETED"
