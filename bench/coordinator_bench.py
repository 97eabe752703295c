"""Benchmark of the local coordinator: submit latency, submit->claim latency, jobs/s.

Starts ``aitbc-miner coordinator`` as a subprocess on a free loopback port (a fresh
SQLite file, rate limits off), then measures over real HTTP:

* submit latency: sequential ``POST /v1/jobs`` round trips;
* submit->claim latency: one miner holds a long-poll; the time from sending a submit to
  the miner receiving the job;
* jobs/s for 1, 8 and 32 concurrent miners, each looping poll -> result with a real
  Ed25519-signed receipt (verified by the coordinator), over a pre-filled queue.

The load generator runs in this process (asyncio + httpx) and shares the machine's
cores with the coordinator, so read the figures as a floor.

    .venv/bin/python bench/coordinator_bench.py [--submits 300] [--claims 100] [--jobs 400]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from nacl.signing import SigningKey

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from miner.wire.receipts import build_miner_receipt, key_id, sha256_hex, sign_receipt  # noqa: E402

PROMPT = "benchmark prompt"
PAYLOAD: dict[str, Any] = {"model": "tiny", "prompt": PROMPT, "parameters": {"max_new_tokens": 8}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Coordinator:
    """The coordinator subprocess."""

    def __init__(self, db: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_key = secrets.token_hex(8)
        self.miner_key = secrets.token_hex(8)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "miner", "coordinator", "--port", str(self.port), "--db", str(db),
             "--client-key", self.client_key, "--miner-key", self.miner_key, "--no-rate-limits",
             "--log-level", "warning"],
            cwd=REPO, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.url}/openapi.json", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError("the coordinator did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)


class BenchMiner:
    def __init__(self, coord: Coordinator, miner_id: str) -> None:
        self.miner_id = miner_id
        self.key = SigningKey.generate()
        self.http = httpx.AsyncClient(base_url=coord.url, timeout=60,
                                      headers={"X-Api-Key": coord.miner_key, "X-Miner-ID": miner_id})

    async def register(self, concurrency: int = 1) -> None:
        caps = {"gpus": [{"name": "bench", "memory_mb": 1024}], "models": ["tiny"],
                "receipt_key": {"alg": "Ed25519", "key_id": key_id(self.key.verify_key)}}
        response = await self.http.post("/v1/miners/register", json={"capabilities": caps, "concurrency": concurrency})
        response.raise_for_status()

    async def poll(self, wait: float) -> dict[str, Any] | None:
        response = await self.http.post("/v1/miners/poll", json={"max_wait_seconds": wait})
        response.raise_for_status()
        return response.json() if response.status_code == 200 else None

    async def finish(self, job_id: str) -> None:
        now = time.time()
        receipt = sign_receipt(build_miner_receipt(
            job_id=job_id, miner_id=self.miner_id, model="tiny", prompt_digest=sha256_hex(PROMPT),
            output="ok", started_at=now, completed_at=now, gpu_seconds=0.001, gpu_uuid=None, runner="bench"), self.key)
        body = {"result": {"output": "ok", "metadata": {}, "receipt": receipt}, "metrics": {"duration_ms": 1}}
        response = await self.http.post(f"/v1/miners/{job_id}/result", json=body)
        response.raise_for_status()


async def submit_latency(coord: Coordinator, n: int) -> list[float]:
    async with httpx.AsyncClient(base_url=coord.url, headers={"X-Api-Key": coord.client_key}) as http:
        samples, ids = [], []
        for _ in range(n):
            started = time.perf_counter()
            response = await http.post("/v1/jobs", json={"payload": PAYLOAD})
            samples.append(time.perf_counter() - started)
            response.raise_for_status()
            ids.append(response.json()["job_id"])
        for job_id in ids:  # leave the queue empty for the next figures
            (await http.post(f"/v1/jobs/{job_id}/cancel")).raise_for_status()
    return samples


async def claim_latency(coord: Coordinator, n: int) -> list[float]:
    miner = BenchMiner(coord, "latency-miner")
    await miner.register()
    samples = []
    async with httpx.AsyncClient(base_url=coord.url, headers={"X-Api-Key": coord.client_key}) as http:
        for _ in range(n):
            poll = asyncio.create_task(miner.poll(10))
            await asyncio.sleep(0.02)  # let the poll reach the coordinator and wait there
            started = time.perf_counter()
            (await http.post("/v1/jobs", json={"payload": PAYLOAD})).raise_for_status()
            job = await poll
            samples.append(time.perf_counter() - started)
            assert job is not None
            await miner.finish(job["job_id"])
    await miner.http.aclose()
    return samples


async def throughput(coord: Coordinator, miners: int, jobs: int) -> float:
    async with httpx.AsyncClient(base_url=coord.url, headers={"X-Api-Key": coord.client_key}) as http:
        for _ in range(jobs):
            (await http.post("/v1/jobs", json={"payload": PAYLOAD})).raise_for_status()
    crew = [BenchMiner(coord, f"tp-{miners}-{i}") for i in range(miners)]
    for miner in crew:
        await miner.register()
    done = 0

    async def loop(miner: BenchMiner) -> None:
        nonlocal done
        while True:
            job = await miner.poll(0)
            if job is None:
                return
            await miner.finish(job["job_id"])
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop(m) for m in crew))
    elapsed = time.perf_counter() - started
    for miner in crew:
        await miner.http.aclose()
    assert done == jobs, f"{done} of {jobs} jobs completed"
    return jobs / elapsed


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        coord = Coordinator(Path(tmp) / "bench.db")
        try:
            sub = await submit_latency(coord, args.submits)
            claim = await claim_latency(coord, args.claims)
            rates = {m: await throughput(coord, m, args.jobs) for m in args.miners}
        finally:
            coord.stop()
    ms = 1000.0
    print(f"{'figure':<42}{'p50':>10}{'p95':>10}")
    print(f"{'submit latency (ms, n=%d)' % len(sub):<42}"
          f"{statistics.median(sub) * ms:>10.2f}{pct(sub, 0.95) * ms:>10.2f}")
    print(f"{'submit->claim via long-poll (ms, n=%d)' % len(claim):<42}"
          f"{statistics.median(claim) * ms:>10.2f}{pct(claim, 0.95) * ms:>10.2f}")
    print(f"{'submit->claim p50 / submit p50 (ratio)':<42}{statistics.median(claim) / statistics.median(sub):>10.2f}")
    print()
    print(f"{'concurrent miners':<20}{'jobs/s':>10}{'vs 1 miner':>12}   (poll -> signed result, {args.jobs} jobs)")
    base = rates[args.miners[0]]
    for m, rate in rates.items():
        print(f"{m:<20}{rate:>10.1f}{rate / base:>12.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--submits", type=int, default=300)
    parser.add_argument("--claims", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=400, help="jobs per throughput run")
    parser.add_argument("--miners", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
