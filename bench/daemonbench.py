"""The whole daemon path for the benchmarks: a local coordinator and an in-process miner.

The coordinator runs as a subprocess (``python -m miner coordinator``, fresh SQLite file,
rate limits off) so it does not share this process's interpreter; the daemon
(:class:`miner.daemon.agent.Agent`) runs in this process with the transformers runner, exactly as
``aitbc-miner run`` would, with ``concurrency`` and the model's ``max_batch_size`` both set to
``slots`` so that ``slots`` jobs can be in flight in one batch. Times come from the
coordinator's own job timestamps: ``started_at`` (assigned to the miner: the claim) and
``completed_at`` (signed result accepted), so the client's status polling does not count.
A job's first token is placed by the runner's ``ttft_ms`` after the moment the job reached
``run()`` (noted by :class:`TimedRunner`).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from runners.base import Job, RunResult
from runners.transformers import TransformersRunner

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class TimedRunner(TransformersRunner):
    """The transformers runner, noting the wall time at which each job reaches ``run()``."""

    run_called: dict[str, float] = {}

    async def run(self, job: Job) -> RunResult:
        self.run_called[job.job_id] = time.time()
        return await super().run(job)


@dataclass(frozen=True)
class JobTiming:
    """One job of a run, from the coordinator's timestamps and the signed result's metadata."""

    claim_to_result_s: float
    claim_to_first_token_s: float
    completion_tokens: int
    batch_size: int


@dataclass(frozen=True)
class BatchRun:
    """Jobs submitted together: first claim -> last result accepted, and each job's timing."""

    seconds: float
    jobs: list[JobTiming]

    @property
    def tokens(self) -> int:
        return sum(j.completion_tokens for j in self.jobs)


class DaemonBench:
    """A coordinator subprocess plus an in-process daemon serving ``model_folder`` as ``model``.

    ``model_options`` are extra options of the model's ``[[models]]`` entry (``device``,
    ``dtype``, ``decode``...); ``gpus`` is the ``[gpus]`` section (default: disabled, CPU mode).
    """

    def __init__(
        self,
        workdir: Path,
        model_folder: Path,
        *,
        slots: int,
        max_new_tokens: int,
        model: str = "tiny",
        model_options: dict[str, Any] | None = None,
        gpus: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = workdir
        self.model_folder = model_folder
        self.slots = slots
        self.max_new_tokens = max_new_tokens
        self.model = model
        self.model_options = dict(model_options or {})
        self.gpus = dict(gpus) if gpus is not None else {"enabled": False}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_key = secrets.token_hex(12)
        self.miner_key = secrets.token_hex(12)
        self.process: subprocess.Popen[bytes] | None = None
        self.agent: Any = None
        self.task: asyncio.Task[Any] | None = None
        self.http: httpx.AsyncClient | None = None
        self._ended_target = 0  # jobs the daemon will have ended once all submitted ones are done

    async def __aenter__(self) -> DaemonBench:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "miner", "coordinator", "--port", str(self.port), "--db",
             str(self.workdir / "coordinator.db"), "--client-key", self.client_key, "--miner-key",
             self.miner_key, "--no-rate-limits", "--log-level", "warning"],
            cwd=REPO, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        try:
            self.http = httpx.AsyncClient(base_url=self.url, headers={"X-Api-Key": self.client_key}, timeout=30)
            deadline = time.monotonic() + 30
            while True:
                try:
                    await self.http.get("/openapi.json")
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the local coordinator did not start") from None
                    await asyncio.sleep(0.05)
            await self._start_agent()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    def settings(self) -> Any:
        """The daemon's settings: what ``aitbc-miner run`` would read from its miner.toml."""
        from miner.daemon.settings import load_settings

        return load_settings(
            None,
            miner_id="bench-rig",
            state_dir=self.workdir / "state",
            concurrency=self.slots,
            coordinator={
                "url": self.url,
                "api_key": self.miner_key,
                "long_poll_s": 10,
                "poll_interval_s": 0.01,
                "idle_backoff_max_s": 0.05,
                "heartbeat_interval_s": 5,
                "max_polls_per_minute": 10_000,
            },
            gpus=self.gpus,
            metrics={"enabled": False},
            models=[
                {
                    "name": self.model,
                    "runner": "transformers",
                    "path": str(self.model_folder),
                    **self.model_options,
                    "max_batch_size": self.slots,
                    "max_new_tokens": self.max_new_tokens,
                }
            ],
        )

    async def _start_agent(self) -> None:
        from miner.daemon.agent import Agent

        self.agent = Agent(self.settings(), runner_classes={"transformers": TimedRunner}, handle_signals=False)
        self.task = asyncio.create_task(self.agent.serve())
        while not (self.agent.session is not None and self.agent.session.registered):
            if self.task.done():
                self.task.result()
                raise RuntimeError("the daemon stopped during start-up")
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # let every slot park its long-poll

    @property
    def runner(self) -> TimedRunner:
        runner: TimedRunner = self.agent.runtime.runners_by_model[self.model]
        return runner

    def payload(self, prompt: str, new_tokens: int | None = None) -> dict[str, Any]:
        """A greedy job for this bench's model."""
        tokens = new_tokens or self.max_new_tokens
        return {"model": self.model, "prompt": prompt, "parameters": {"max_new_tokens": tokens, "temperature": 0}}

    async def submit(self, payload: dict[str, Any]) -> str:
        assert self.http is not None
        self._ended_target += 1
        response = await self.http.post("/v1/jobs", json={"payload": payload, "ttl_seconds": 600})
        response.raise_for_status()
        return str(response.json()["job_id"])

    async def wait(self, job_ids: list[str], timeout: float = 300) -> list[dict[str, Any]]:
        """Wait until the daemon has ended these jobs, then read them once from the coordinator.

        The waiting watches the in-process daemon's count of ended jobs: polling the
        coordinator's status endpoint would take CPU from the generation being measured.
        """
        assert self.http is not None
        deadline = time.monotonic() + timeout
        while self.agent.jobs_ended < self._ended_target:
            if time.monotonic() > deadline or self.task is None or self.task.done():
                raise RuntimeError(f"the daemon ended {self.agent.jobs_ended} of {self._ended_target} jobs")
            await asyncio.sleep(0.05)  # the times come from the coordinator, not from this loop
        jobs = [(await self.http.get(f"/v1/jobs/{job_id}")).json() for job_id in job_ids]
        for job in jobs:
            if job["state"] != "COMPLETED":
                raise RuntimeError(f"job {job['job_id']} ended {job['state']}: {job.get('error')}")
        return jobs

    async def _timing(self, job: dict[str, Any]) -> JobTiming:
        assert self.http is not None
        result = (await self.http.get(f"/v1/jobs/{job['job_id']}/result")).json()["result"]
        meta = result["metadata"]
        started, completed = _ts(job["started_at"]), _ts(job["completed_at"])
        first_token = TimedRunner.run_called[job["job_id"]] + float(meta.get("ttft_ms") or 0.0) / 1000
        return JobTiming(
            claim_to_result_s=completed - started,
            claim_to_first_token_s=first_token - started,
            completion_tokens=int(meta["completion_tokens"]),
            batch_size=int(meta.get("batch_size", 1)),
        )

    async def run_batch(self, payloads: list[dict[str, Any]], timeout: float = 300) -> BatchRun:
        """Jobs submitted at once; their results are read after the last one is accepted (untimed)."""
        job_ids = await asyncio.gather(*(self.submit(p) for p in payloads))
        jobs = await self.wait(list(job_ids), timeout)
        seconds = max(_ts(j["completed_at"]) for j in jobs) - min(_ts(j["started_at"]) for j in jobs)
        return BatchRun(seconds, [await self._timing(job) for job in jobs])

    async def run_one(self, payload: dict[str, Any]) -> tuple[float, float]:
        """One job alone: (claim -> result accepted, claim -> first token) in seconds."""
        (job,) = (await self.run_batch([payload])).jobs
        return job.claim_to_result_s, job.claim_to_first_token_s

    async def run_together(self, payloads: list[dict[str, Any]]) -> float:
        """Jobs submitted at once: first claim -> last result accepted, in seconds."""
        return (await self.run_batch(payloads)).seconds

    async def __aexit__(self, *exc_info: object) -> None:
        if self.agent is not None and self.task is not None:
            self.agent.request_exit("benchmark done")
            try:
                await asyncio.wait_for(self.task, 60)
            except Exception as exc:  # report, but still stop the coordinator
                print(f"daemon exit: {type(exc).__name__}: {exc}", file=sys.stderr)
            self.task = None
        if self.http is not None:
            await self.http.aclose()
            self.http = None
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=20)
            self.process = None
