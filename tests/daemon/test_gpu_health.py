"""Sick GPUs drained: health read through NVML on a simulated host, changed while the miner runs.

The host file is re-read at every NVML poll, so writing ``ecc_uncorrected``, ``throttle``,
``xid`` or ``pcie_width`` into it is what a failing GPU looks like to the daemon.
"""

from __future__ import annotations

import asyncio
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from structlog.testing import capture_logs

from coordinator.client import Client
from miner.cli.status import summarise
from miner.daemon.agent import Agent
from miner.daemon.settings import HealthCheck
from miner.host.fakenvml import FakeGpu, FakeNvml
from miner.host.gpuhealth import CHECKS, GpuHealthMonitor, HealthReading, XidWatcher, read_health
from miner.host.nvml import probe_gpus
from runners.base import GpuInfo
from tests.daemon.helpers import miner_settings
from tests.gpuhost import UUIDS, write_host
from tests.servers import RunningCoordinator, free_port

POLL_S = 0.1
MODEL = {"name": "llama2", "runner": "fake", "delay_s": 0.15, "max_batch_size": 2}


def _agent(tmp_path: Path, coordinator: RunningCoordinator, host: Path, **gpus: Any) -> Agent:
    settings = miner_settings(
        tmp_path / "state",
        coordinator.url,
        coordinator={"api_key": coordinator.miner_key},
        gpus={"enabled": True, "health_poll_s": POLL_S, **gpus},
        fake_nvml=host,
        models=[MODEL],
        metrics={"enabled": True, "listen": f"127.0.0.1:{free_port()}"},
    )
    return Agent(settings, handle_signals=False)


def _submit(client: Client, n: int) -> list[str]:
    return [
        client.submit_job({"model": "llama2", "prompt": f"p{i}", "parameters": {"max_tokens": 3}}, ttl_seconds=120)[
            "job_id"
        ]
        for i in range(n)
    ]


async def _until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def _done(client: Client, ids: list[str]) -> list[dict[str, Any]]:
    answers = []
    for job_id in ids:
        job = await asyncio.to_thread(client.wait, job_id, 60)
        assert job["state"] == "COMPLETED", job
        answers.append(await asyncio.to_thread(client.get_job_result, job_id))
    return answers


async def _scrape(agent: Agent) -> tuple[str, int, str]:
    base = f"http://{agent.settings.metrics.listen}"
    async with httpx.AsyncClient() as http:
        metrics, health = await http.get(base + "/metrics"), await http.get(base + "/healthz")
    return metrics.text, health.status_code, health.text


def _drained(agent: Agent) -> dict[int, str]:
    assert agent.runtime is not None and agent.runtime.health is not None
    return agent.runtime.health.drained()


def test_ecc_error_on_gpu1_stops_its_new_jobs_while_gpu0_goes_on(
    tmp_path: Path, coordinator: RunningCoordinator, coordinator_client: Client
) -> None:
    host = write_host(tmp_path / "host.json", count=2)
    agent = _agent(tmp_path, coordinator, host)

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]], tuple[str, int, str], dict[str, Any]]:
        task = asyncio.create_task(agent.serve())
        before = await _done(coordinator_client, _submit(coordinator_client, 8))
        write_host(host, count=2, per_gpu={1: {"ecc_uncorrected": 2}})
        await _until(lambda: 1 in _drained(agent))
        after = await _done(coordinator_client, _submit(coordinator_client, 8))
        write_host(host, count=2)  # the volatile count reads 0 again: ECC still needs a restart
        await asyncio.sleep(POLL_S * 5)
        scrape = await _scrape(agent)
        metadata = await agent._heartbeat_metadata()
        assert _drained(agent).keys() == {1}
        agent.request_exit("test over")
        assert await task == 0
        return before, after, scrape, metadata

    with capture_logs() as logs:
        before, after, (metrics, status, body), metadata = asyncio.run(scenario())
    assert {a["receipt"]["gpu_uuid"] for a in before} == {UUIDS[0], UUIDS[1]}
    assert {a["receipt"]["gpu_uuid"] for a in after} == {UUIDS[0]}  # GPU 1 took no new job
    drained = [e for e in logs if e["event"] == "gpu_drained"]
    assert [(e["gpu"], e["uuid"]) for e in drained] == [(1, UUIDS[1])]
    assert "2 uncorrected ECC error(s)" in drained[0]["reason"] and "restart" in drained[0]["reason"]
    assert not [e for e in logs if e["event"] == "gpu_serving_again"]
    assert status == 200, body  # GPU 0 still serves
    gpu1 = next(g for g in metadata["gpu_health"] if g["index"] == 1)
    assert gpu1["state"] == "drained" and gpu1["checks"] == ["ecc"]
    assert next(g for g in metadata["gpu_health"] if g["index"] == 0)["state"] == "ok"
    lines = "\n".join(summarise(metrics, status, body))
    assert "GPU 1 NVIDIA H200" in lines and "DRAINED: ecc" in lines
    assert 'aitbc_miner_gpu_serving{gpu="1"' in metrics and 'check="ecc"' in metrics


def test_a_throttle_that_clears_serves_again_after_recover_after_s(
    tmp_path: Path, coordinator: RunningCoordinator, coordinator_client: Client
) -> None:
    host = write_host(tmp_path / "host.json", count=2, per_gpu={1: {"throttle": ["hw_thermal"]}})
    agent = _agent(tmp_path, coordinator, host, recover_after_s=1.5)

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool]:
        task = asyncio.create_task(agent.serve())
        await _until(lambda: agent.session is not None and agent.session.registered)
        assert _drained(agent).keys() == {1}  # in trouble from the start
        hot = await _done(coordinator_client, _submit(coordinator_client, 6))
        write_host(host, count=2)
        assert agent.runtime is not None and agent.runtime.health is not None
        state = agent.runtime.health.gpus[1]
        await _until(lambda: state.clear_since is not None)
        still_drained_when_clear_seen = state.drained  # clear, but not for recover_after_s yet
        await _until(lambda: not state.drained)
        cool = await _done(coordinator_client, _submit(coordinator_client, 8))
        agent.request_exit("test over")
        assert await task == 0
        return hot, cool, still_drained_when_clear_seen

    with capture_logs() as logs:
        hot, cool, waited = asyncio.run(scenario())
    assert {a["receipt"]["gpu_uuid"] for a in hot} == {UUIDS[0]}
    assert waited
    assert {a["receipt"]["gpu_uuid"] for a in cool} == {UUIDS[0], UUIDS[1]}
    events = [(e["event"], e.get("gpu")) for e in logs if e["event"] in ("gpu_drained", "gpu_serving_again")]
    assert events == [("gpu_drained", 1), ("gpu_serving_again", 1)]
    drained = next(e for e in logs if e["event"] == "gpu_drained")
    assert "thermal slowdown (hw_thermal)" in drained["reason"]


def test_healthz_is_503_only_when_no_gpu_can_serve(
    tmp_path: Path, coordinator: RunningCoordinator, coordinator_client: Client
) -> None:
    host = write_host(tmp_path / "host.json", count=1, per_gpu={0: {"pcie_width": 4}})
    agent = _agent(tmp_path, coordinator, host)

    async def scenario() -> tuple[tuple[str, int, str], list[str]]:
        task = asyncio.create_task(agent.serve())
        await _until(lambda: agent.session is not None and agent.session.registered)
        scrape = await _scrape(agent)
        models = list(agent.capabilities["models"])
        agent.request_exit("test over")
        assert await task == 0
        return scrape, models

    (_, status, body), models = asyncio.run(scenario())
    assert status == 503
    assert "no GPU can serve: GPU 0: PCIe link x4 of x16" in body
    assert models == []  # nothing is advertised while no GPU serves


def test_drain_on_chooses_the_checks_that_drain(
    tmp_path: Path, coordinator: RunningCoordinator, coordinator_client: Client
) -> None:
    """A check left out of ``gpus.drain_on`` is not trouble: the narrow link keeps serving."""
    host = write_host(tmp_path / "host.json", count=1, per_gpu={0: {"pcie_width": 8}})
    agent = _agent(tmp_path, coordinator, host, drain_on=["ecc", "xid"])

    async def scenario() -> list[dict[str, Any]]:
        task = asyncio.create_task(agent.serve())
        answers = await _done(coordinator_client, _submit(coordinator_client, 2))
        agent.request_exit("test over")
        assert await task == 0
        return answers

    answers = asyncio.run(scenario())
    assert {a["receipt"]["gpu_uuid"] for a in answers} == {UUIDS[0]}


# -- the readings and the rules, through the fake NVML -----------------------------------------


def _gpus(nvml: FakeNvml) -> list[GpuInfo]:
    return probe_gpus(nvml)


def test_readings_cover_every_check_and_xids_arrive_once() -> None:
    nvml = FakeNvml([FakeGpu(uuid=UUIDS[0]), FakeGpu(uuid=UUIDS[1])])
    nvml.nvmlInit()
    gpus = _gpus(nvml)
    watcher = XidWatcher(nvml, gpus)
    nvml.gpus[1].xid = [31, 79]  # 31: a job's own page fault, not hardware; 79: fallen off the bus
    nvml.gpus[1].retired_pending = True
    nvml.gpus[1].throttle = ["power_brake", "sw_thermal"]
    first = read_health(nvml, gpus, watcher)
    second = read_health(nvml, gpus, watcher)
    assert first[1].xids == (31, 79) and second[1].xids == ()  # each event is delivered once
    assert first[1].retired_pending is True and set(first[1].throttle) == {"power_brake", "sw_thermal"}
    assert first[0] == HealthReading(0, UUIDS[0], 0, False, (), (), 16, 16)
    monitor = GpuHealthMonitor(gpus, recover_after_s=10)
    changes = monitor.observe(first, now=0.0)
    assert [(c.index, c.drained) for c in changes] == [(1, True)]
    report = next(r for r in monitor.report() if r["index"] == 1)
    assert report["checks"] == ["power_brake", "retired_pages", "thermal", "xid"]
    assert "critical Xid 79" in report["reason"] and "31" not in report["reason"]
    monitor.observe(second, now=1.0)  # retired pages still pending, Xid sticky
    assert not monitor.serving(UUIDS[1]) and monitor.serving(UUIDS[0])
    watcher.close()


def test_unsupported_readings_are_no_trouble() -> None:
    nvml = FakeNvml([FakeGpu(uuid=UUIDS[0])], unsupported={"ecc", "retired_pages", "throttle", "pcie"})
    nvml.nvmlInit()
    gpus = _gpus(nvml)
    (reading,) = read_health(nvml, gpus)
    assert reading == HealthReading(0, UUIDS[0])
    monitor = GpuHealthMonitor(gpus)
    assert monitor.observe([reading], now=0.0) == [] and monitor.any_serving()


def test_the_setting_names_every_check() -> None:
    assert typing.get_args(HealthCheck) == CHECKS
