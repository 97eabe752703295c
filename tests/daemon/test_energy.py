"""Energy in every receipt: NVML's energy counter (or power readings) per job, split like gpu_seconds.

The simulated host's ``energy_mj`` is the counter; the test advances it while jobs run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from coordinator.client import Client
from miner.daemon.agent import Agent
from miner.host.energy import MAX_PLAUSIBLE_W, EnergyReading, advance_mj, job_energy
from miner.wire.receipts import verify_receipt
from tests.daemon.helpers import miner_settings
from tests.gpuhost import UUIDS, write_host
from tests.servers import RunningCoordinator, free_port

START_MJ = 5_000_000


def _agent(tmp_path: Path, coordinator: RunningCoordinator, host: Path, model: dict[str, Any]) -> Agent:
    settings = miner_settings(
        tmp_path / "state",
        coordinator.url,
        coordinator={"api_key": coordinator.miner_key},
        gpus={"enabled": True},
        fake_nvml=host,
        models=[model],
        metrics={"enabled": True, "listen": f"127.0.0.1:{free_port()}"},
    )
    return Agent(settings, handle_signals=False)


def _submit(client: Client, n: int) -> list[str]:
    payload = {"model": "llama2", "prompt": "energy", "parameters": {"max_tokens": 3}}
    return [client.submit_job(payload, ttl_seconds=120)["job_id"] for _ in range(n)]


async def _until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def test_a_batch_splits_the_counter_advance_and_the_receipt_signs_it(
    tmp_path: Path, coordinator: RunningCoordinator, coordinator_client: Client
) -> None:
    """Two jobs in one batch while the counter advances 40 J: about 20 J each, in the signed receipt."""
    host = write_host(tmp_path / "host.json", count=1, per_gpu={0: {"energy_mj": START_MJ}})
    model = {"name": "llama2", "runner": "fake", "delay_s": 1.5, "max_batch_size": 2}
    ids = _submit(coordinator_client, 2)  # queued before the miner starts: both slots get one at once
    agent = _agent(tmp_path, coordinator, host, model)

    async def scenario() -> str:
        task = asyncio.create_task(agent.serve())
        await _until(lambda: len(agent.inflight) == 2)
        await asyncio.sleep(0.3)  # both jobs have read the counter before it advances
        write_host(host, count=1, per_gpu={0: {"energy_mj": START_MJ + 40_000}})
        await _until(lambda: agent.jobs_ended == 2)
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"http://{agent.settings.metrics.listen}/metrics")).text
        agent.request_exit("test over")
        assert await task == 0
        return metrics

    metrics = asyncio.run(scenario())
    answers = [coordinator_client.get_job_result(j) for j in ids]
    energies = []
    for answer in answers:
        receipt = answer["receipt"]
        verify_receipt(receipt, agent.key_id)  # energy_j is inside the signature
        assert receipt["gpu_uuid"] == UUIDS[0] and receipt["energy_method"] == "counter"
        assert answer["result"]["metadata"]["energy_j"] == receipt["energy_j"]
        energies.append(receipt["energy_j"])
    assert all(abs(e - 20.0) < 20.0 * 0.05 for e in energies), energies
    assert abs(sum(energies) - 40.0) < 40.0 * 0.05, energies
    total = sum(float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith('aitbc_miner_energy_joules_total{model="llama2"}'))
    assert abs(total - sum(energies)) < 1e-6


def test_a_gpu_without_the_counter_integrates_power(
    tmp_path: Path, coordinator: RunningCoordinator, coordinator_client: Client
) -> None:
    """``energy_mj: null`` (no counter): 300 W for the job's time, ``energy_method: power_samples``."""
    host = write_host(tmp_path / "host.json", count=1, per_gpu={0: {"energy_mj": None, "power_w": 300.0}})
    model = {"name": "llama2", "runner": "fake", "delay_s": 0.5}
    (job_id,) = _submit(coordinator_client, 1)
    agent = _agent(tmp_path, coordinator, host, model)

    async def scenario() -> None:
        task = asyncio.create_task(agent.serve())
        await _until(lambda: agent.jobs_ended == 1)
        agent.request_exit("test over")
        assert await task == 0

    asyncio.run(scenario())
    receipt = coordinator_client.get_job_result(job_id)["receipt"]
    verify_receipt(receipt, agent.key_id)
    assert receipt["energy_method"] == "power_samples"
    # The job ran alone: its share is 1, so the energy is 300 W over (at least) its gpu_seconds.
    assert receipt["energy_j"] >= 300.0 * receipt["units"] * 0.99
    assert receipt["energy_j"] <= 300.0 * (receipt["units"] + 0.5)


def test_a_cpu_job_says_none(tmp_path: Path, coordinator: RunningCoordinator, coordinator_client: Client) -> None:
    settings = miner_settings(tmp_path / "state", coordinator.url, coordinator={"api_key": coordinator.miner_key})
    (job_id,) = _submit(coordinator_client, 1)
    agent = Agent(settings, handle_signals=False, max_jobs=1)
    assert asyncio.run(agent.serve()) == 0
    receipt = coordinator_client.get_job_result(job_id)["receipt"]
    assert receipt["energy_method"] == "none" and "energy_j" not in receipt


def _r(mj: float, at: float, method: str = "counter") -> EnergyReading:
    return EnergyReading(mj, method, at)


def test_a_reset_or_a_wild_counter_never_gives_negative_or_huge_figures() -> None:
    assert advance_mj(_r(1000, 0), _r(3000, 1)) == 2000
    assert advance_mj(_r(9_000_000, 0), _r(1500, 1)) == 1500  # GPU reset: counted from zero
    assert advance_mj(_r(0, 0), _r(MAX_PLAUSIBLE_W * 1000 * 10, 1)) is None  # more than any GPU draws
    assert advance_mj(_r(0, 0), _r(10, 1, "power_samples")) is None  # two kinds of counter do not mix
    before, after = {UUIDS[0]: _r(1000, 0)}, {UUIDS[0]: _r(2**64 - 1, 1)}
    assert job_energy(before, after, [UUIDS[0]], 1.0) == (None, "none")


def test_shares_follow_gpu_seconds_and_sharded_jobs_add_their_gpus() -> None:
    before = {UUIDS[0]: _r(0, 10.0), UUIDS[1]: _r(0, 10.0)}
    after = {UUIDS[0]: _r(8000, 12.0), UUIDS[1]: _r(4000, 12.0)}
    assert job_energy(before, after, [UUIDS[0]], 2.0) == (8.0, "counter")  # alone: all of it
    assert job_energy(before, after, [UUIDS[0]], 0.5) == (2.0, "counter")  # a quarter of the time
    assert job_energy(before, after, [UUIDS[0], UUIDS[1]], 1.0) == (6.0, "counter")  # half of each
    assert job_energy(before, after, [], 1.0) == (None, "none")
