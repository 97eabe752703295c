"""The fake runner: deterministic text on the CPU, with a configurable delay and failures.

It is the test runner and the demo's fallback, and never imports torch. Output depends
only on the model name, the prompt (or messages), ``seed`` and ``max_new_tokens``, so a
job re-run anywhere gives the same text. Options in the ``[[models]]`` table:

``delay_s``        seconds each job takes (default 0.05)
``load_delay_s``   seconds ``start()`` takes (to exercise warm-up paths)
``fail_mode``      ``none`` | ``error`` | ``oom`` | ``exception`` | ``hang``
``fail_marker``    when set, ``fail_mode`` applies only to prompts containing it
``max_new_tokens`` the default and the cap for a job's ``max_new_tokens``
``devices``        the GPUs it pretends to run on (as :mod:`runners.placement` reads them);
                   by default a copy per GPU of the miner, each job on the least busy copy
``device``         ``cpu`` to ignore the miner's GPUs
``max_batch_size`` jobs one copy holds at once (default: no limit of its own; the miner's
                   ``concurrency`` then decides)
``vram_per_job_mb`` with ``max_batch_size``: each job needs this much free GPU memory
                   (as NVML reports it now), so claiming follows the simulated GPU's memory

The jobs running on one copy count as one batch: a job's ``gpu_seconds`` is its share of
the copy's time (each second split over the jobs running then), as with the transformers
runner. A copy on a GPU the daemon drains takes no new job.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from miner.wire.errors import ErrorCode, JobError
from miner.wire.receipts import canonical_json
from runners.base import Job, ModelSpec, RunnerContext, RunResult, parse_options
from runners.params import apply_stop
from runners.placement import Placement, choose_copy, place_model

_WORDS = (
    "gpu", "tensor", "block", "token", "lattice", "kernel", "ledger", "miner", "proof",
    "epoch", "shard", "cache", "warp", "stream", "vector", "matrix", "signal", "relay",
    "beacon", "quorum", "nonce",
)


class FakeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    delay_s: float = Field(0.05, ge=0, le=3600)
    load_delay_s: float = Field(0.0, ge=0, le=3600)
    fail_mode: Literal["none", "error", "oom", "exception", "hang"] = "none"
    fail_marker: str | None = None
    max_new_tokens: int = Field(32, ge=1, le=100_000)
    devices: list[int | str] | None = Field(None, min_length=1)
    device: Literal["cpu"] | None = None
    max_batch_size: int | None = Field(None, ge=1, le=1024)
    vram_per_job_mb: int | None = Field(None, ge=1)


def fake_text(model: str, prompt_key: str, seed: int | None, n_words: int) -> str:
    """The deterministic output for these inputs (exported so tests can predict it)."""
    words: list[str] = []
    counter = 0
    while len(words) < n_words:
        digest = hashlib.sha256(f"{model}|{seed}|{prompt_key}|{counter}".encode()).digest()
        words.extend(_WORDS[b % len(_WORDS)] for b in digest)
        counter += 1
    return " ".join(words[:n_words])


class _Share:
    """The jobs running on one copy, accounted as one batch: each second of it is split evenly
    over the jobs in it, so a job's ``gpu_seconds`` is its share (as the transformers runner
    splits a batch's time)."""

    def __init__(self) -> None:
        self.running = 0
        self._per_job = 0.0  # seconds per job accumulated so far (a job's share = difference)
        self._at = time.monotonic()

    def _advance(self) -> None:
        now = time.monotonic()
        if self.running:
            self._per_job += (now - self._at) / self.running
        self._at = now

    def enter(self) -> float:
        self._advance()
        self.running += 1
        return self._per_job

    def leave(self, mark: float) -> float:
        self._advance()
        self.running -= 1
        return self._per_job - mark


class FakeRunner:
    """Deterministic CPU runner; see the module docstring for its options."""

    name: ClassVar[str] = "fake"

    def __init__(self, specs: Sequence[ModelSpec], context: RunnerContext) -> None:
        self._specs = {spec.name: spec for spec in specs}
        self._options: dict[str, FakeOptions] = {}
        self._copies: dict[str, list[Placement]] = {}
        self._shares: dict[str, _Share] = {}  # placement key -> the jobs running there, as one batch
        self._context = context
        self._closed = False

    async def start(self) -> None:
        self._options = {name: parse_options(FakeOptions, spec) for name, spec in self._specs.items()}
        self._copies = {
            name: place_model(f"models[name={name!r}]", self._context.gpus, o.devices, o.device)
            for name, o in self._options.items()
        }
        delay = max((o.load_delay_s for o in self._options.values()), default=0.0)
        if delay:
            await asyncio.sleep(delay)

    def ready_models(self) -> list[str]:
        """The models with a copy on a GPU that serves now (all of them without health trouble)."""
        if self._closed:
            return []
        return [n for n in self._options if any(self._context.serving(c.uuids) for c in self._copies[n])]

    async def run(self, job: Job) -> RunResult:
        options = self._options.get(job.model)
        if options is None:
            raise JobError(ErrorCode.MODEL_NOT_SERVED, f"model {job.model!r} is not served by the fake runner")
        request = job.request
        if request.prompt is not None:
            prompt_key = request.prompt
        else:
            prompt_key = canonical_json(list(request.messages or ())).decode()
        failing = options.fail_mode != "none" and (options.fail_marker is None or options.fail_marker in prompt_key)
        copy = choose_copy(
            job.model,
            self._copies[job.model],
            uuids=lambda p: p.uuids,
            order=lambda p: self._load(p.key),
            context=self._context,
            pin_gpu=job.pin_gpu,
        )
        share = self._shares.setdefault(copy.key, _Share())
        mark = share.enter()
        try:
            await self._wait(job, None if failing and options.fail_mode == "hang" else options.delay_s)
        finally:
            gpu_seconds = share.leave(mark)
        if failing:
            if options.fail_mode == "error":
                raise JobError(ErrorCode.RUNNER_ERROR, "the fake runner was configured to fail this job")
            if options.fail_mode == "oom":
                raise JobError(ErrorCode.OUT_OF_MEMORY, "the fake runner simulated running out of GPU memory")
            if options.fail_mode == "exception":
                raise RuntimeError("the fake runner raised an unexpected exception")
        n_words = min(request.params.max_new_tokens or options.max_new_tokens, options.max_new_tokens)
        text, stopped = apply_stop(fake_text(job.model, prompt_key, request.params.seed, n_words), request.params.stop)
        return RunResult(
            output=text,
            finish_reason="stop" if stopped else "length",
            prompt_tokens=len(prompt_key.split()),
            completion_tokens=len(text.split()),
            ttft_ms=0.0,
            model_revision="fake-1",
            device="cpu",
            gpu_uuid=copy.gpu_uuid,
            gpu_uuids=copy.uuids if len(copy.gpus) > 1 else (),
            gpu_seconds=gpu_seconds,
        )

    def _load(self, key: str) -> int:
        share = self._shares.get(key)
        return share.running if share is not None else 0

    def capacity(self) -> int | None:
        """Jobs the copies could hold now; ``None`` when no model sets ``max_batch_size``."""
        if self._closed:
            return 0
        total, limited = 0, False
        for name, options in self._options.items():
            if options.max_batch_size is None:
                continue
            limited = True
            for copy in self._copies[name]:
                if not self._context.serving(copy.uuids):
                    continue  # a drained GPU takes no new job
                room = options.max_batch_size
                probe = self._context.free_vram_mb
                if options.vram_per_job_mb and copy.gpus and probe is not None:
                    free = min((probe(g.index) or 0) for g in copy.gpus)
                    room = min(room, free // options.vram_per_job_mb)  # simulated jobs take no real memory
                total += room
        return total if limited else None

    def max_capacity(self) -> int | None:
        sizes = [(o.max_batch_size, len(self._copies[n])) for n, o in self._options.items() if o.max_batch_size]
        return sum(size * copies for size, copies in sizes) if sizes else None

    async def _wait(self, job: Job, seconds: float | None) -> None:
        """Sleep ``seconds`` (forever when ``None``), stopping early on cancel or deadline."""
        end = None if seconds is None else time.monotonic() + seconds
        while True:
            job.raise_if_stopped()
            left = 0.05 if end is None else end - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 0.05))

    async def aclose(self) -> None:
        self._closed = True
