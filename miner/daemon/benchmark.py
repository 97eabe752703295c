"""The signed capability benchmark: how fast each served model runs on each of the miner's GPUs.

:func:`run_benchmarks` measures every ready model on every GPU it has a copy on (a CPU model
once, as ``gpu_uuid = "cpu"``), through the runner itself, with jobs pinned to that GPU
(:attr:`runners.base.Job.pin_gpu`):

1. a one-token *probe* job: it warms the copy up and tells the model revision the runner
   reports, which the cache key needs;
2. ``tokens_per_s_b1``: one job of ``benchmark.max_new_tokens`` new tokens, alone;
3. ``tokens_per_s_batch``: ``batch`` such jobs at once, all pinned to that GPU (``batch`` is
   the model's ``max_batch_size`` option, else :data:`DEFAULT_BATCH`): their completion
   tokens over the time from the first start to the last end;
4. ``ttft_ms``: the runner's ``ttft_ms`` of the batch-1 job when it reports a positive one,
   else the wall time of the one-token probe.

Prompts are fixed and synthetic (:data:`PROMPTS`, never a buyer's), decoding greedy. Each
step (a job, or the batch) gets ``benchmark.timeout_s``.

A record (:func:`build_record`) is signed with the miner's receipt key in the envelope and
canonical form of receipts (:func:`miner.wire.receipts.sign_receipt`), so ``aitbc-miner
verify-receipt`` checks it with the key the miner registers::

    {"kind": "capability_benchmark", "miner_id", "model", "gpu_uuid", "tokens_per_s_b1",
     "tokens_per_s_batch", "batch", "max_new_tokens", "ttft_ms", "measured_at",
     "software": {"miner", "runner", "runner_version", "model_revision", "driver", "cuda",
                  "torch", "transformers"}, "signature"}

(``software`` keys that are unknown are left out.) The records are cached in
``state_dir/benchmarks.json`` (:data:`CACHE_FILE_NAME`, mode 0600, rewritten atomically).
At start, a cached record whose dependencies (:func:`dependencies`: model, GPU, software,
batch and max_new_tokens) equal the probe's, that names this miner and verifies with its
key, is reused without measuring; otherwise the pair is measured and the cache rewritten.

A model whose benchmark fails (a job error, a timeout, an answer without a token count) is
logged as ``benchmark_failed`` with its error code, never the prompt, and published
without a record: the benchmark never stops the miner. Importing torch is not needed here:
its version comes from the installed package's metadata.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import structlog
from nacl.signing import SigningKey

from miner import __version__
from miner.daemon.runtime import Runtime
from miner.daemon.settings import MinerSettings
from miner.outbox.writer import atomic_write
from miner.wire.errors import DeviceError, ErrorCode, JobError, MinerError, ReceiptVerificationError
from miner.wire.protocol import utc_iso
from miner.wire.receipts import canonical_json, key_id, sign_receipt, verify_receipt
from runners import runner_version
from runners.base import GpuInfo, Job, ModelSpec, Runner, RunResult
from runners.params import GenerationParams, TextRequest
from runners.placement import place_model

log = structlog.get_logger("miner.daemon.benchmark")

RECORD_KIND = "capability_benchmark"
CACHE_FILE_NAME = "benchmarks.json"
CACHE_FORMAT = 1
DEFAULT_BATCH = 8
CPU = "cpu"  # the gpu_uuid of a record measured on the CPU, as in receipts
STEP_SLACK_S = 5.0  # past a step's deadline, the runner gets this long to notice before it is abandoned
DEPENDENCY_KEYS = ("model", "gpu_uuid", "software", "batch", "max_new_tokens")

# Fixed, synthetic, never a buyer's. A batch cycles through them.
PROMPTS = (
    "Benchmark prompt one: explain in plain words how a graphics processor runs many small tasks at once.",
    "Benchmark prompt two: write a short story about a lighthouse keeper who counts ships.",
    "Benchmark prompt three: list the steps of making bread, from flour to the first slice.",
    "Benchmark prompt four: describe a quiet mountain village in winter, street by street.",
    "Benchmark prompt five: summarise why bridges are built with arches and what the arch carries.",
    "Benchmark prompt six: give advice to someone planting a vegetable garden for the first time.",
    "Benchmark prompt seven: compare a river and a railway as ways to move goods across a country.",
    "Benchmark prompt eight: tell how a clock with gears keeps time, one part after another.",
)


@dataclass(frozen=True)
class Target:
    """One model on one GPU to measure: ``pin_gpu`` is the first GPU of its copy (``None``: the CPU)."""

    model: str
    runner_name: str
    runner: Runner
    pin_gpu: str | None
    batch: int


@dataclass(frozen=True)
class Failure:
    """A model/GPU pair without a record: ``code`` is an :class:`~miner.wire.errors.ErrorCode`."""

    model: str
    gpu_uuid: str
    code: str


@dataclass
class BenchmarkReport:
    """What :func:`run_benchmarks` found: the signed records (measured or cached) and the failures."""

    records: list[dict[str, Any]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    measured: int = 0  # records measured now (the rest came from the cache)


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name`` (never imports it); ``None`` when absent."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def batch_size(spec: ModelSpec) -> int:
    """The model's ``max_batch_size`` option when it is a positive integer, else :data:`DEFAULT_BATCH`."""
    value = spec.options().get("max_batch_size")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else DEFAULT_BATCH


def copy_gpus(spec: ModelSpec, gpus: Sequence[GpuInfo]) -> list[str | None]:
    """The first GPU's UUID of each copy of the model (``None`` for a copy on the CPU), placed as
    :mod:`runners.placement` places it from its ``devices`` / ``device`` options."""
    options = spec.options()
    devices = options.get("devices")
    device = options.get("device")
    try:
        copies = place_model(
            f"models[name={spec.name!r}]",
            gpus,
            devices if isinstance(devices, list) else None,
            device if isinstance(device, str) else None,
        )
    except MinerError:  # the runner started with these options, so its own placement differs: ask it unpinned
        return [None]
    return list(dict.fromkeys(c.gpu_uuid for c in copies))


def targets(runtime: Runtime, specs: Sequence[ModelSpec]) -> list[Target]:
    """Every ready model on every GPU it has a copy on, in configuration order."""
    ready = set(runtime.ready_models())
    found: list[Target] = []
    for spec in specs:
        runner = runtime.runners_by_model.get(spec.name)
        if runner is None or spec.name not in ready:
            continue
        for pin in copy_gpus(spec, runtime.gpus):
            found.append(Target(spec.name, spec.runner, runner, pin, batch_size(spec)))
    return found


def software_of(runner_name: str, runner: Runner, model_revision: str | None, gpu: GpuInfo | None) -> dict[str, Any]:
    """What a record's figures depend on besides the model and the GPU (``None`` values are dropped)."""
    software = {
        "miner": __version__,
        "runner": runner_name,
        "runner_version": runner_version(runner),
        "model_revision": model_revision,
        "driver": gpu.driver_version if gpu is not None else None,
        "cuda": gpu.cuda_version if gpu is not None else None,
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
    }
    return {k: v for k, v in software.items() if v is not None}


def dependencies(record: Mapping[str, Any]) -> bytes:
    """The cache key of a record: the canonical JSON of :data:`DEPENDENCY_KEYS`."""
    return canonical_json({k: record.get(k) for k in DEPENDENCY_KEYS})


def build_record(
    *,
    miner_id: str,
    model: str,
    gpu_uuid: str,
    tokens_per_s_b1: float,
    tokens_per_s_batch: float,
    batch: int,
    max_new_tokens: int,
    ttft_ms: float,
    measured_at: float,
    software: Mapping[str, Any],
) -> dict[str, Any]:
    """A benchmark record before signing (see the module docstring for its fields)."""
    return {
        "kind": RECORD_KIND,
        "miner_id": miner_id,
        "model": model,
        "gpu_uuid": gpu_uuid,
        "tokens_per_s_b1": round(tokens_per_s_b1, 3),
        "tokens_per_s_batch": round(tokens_per_s_batch, 3),
        "batch": batch,
        "max_new_tokens": max_new_tokens,
        "ttft_ms": round(ttft_ms, 3),
        "measured_at": utc_iso(measured_at),
        "software": dict(software),
    }


def is_benchmark_record(obj: Any) -> bool:
    """True for a dict that says it is a capability benchmark record."""
    return isinstance(obj, dict) and obj.get("kind") == RECORD_KIND


# -- the cache -----------------------------------------------------------------------------


def cache_path(state_dir: Path) -> Path:
    return Path(state_dir) / CACHE_FILE_NAME


def load_cache(path: Path, signing_key: SigningKey, miner_id: str) -> dict[bytes, dict[str, Any]]:
    """The cached records by :func:`dependencies`: only those of this miner that verify with its key.

    A missing file is an empty cache; an unreadable or malformed one is logged
    (``benchmark_cache_unreadable``) and ignored: everything is measured again.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("benchmark_cache_unreadable", file=path.name, error=type(exc).__name__)
        return {}
    records = data.get("records") if isinstance(data, dict) and data.get("format") == CACHE_FORMAT else None
    if not isinstance(records, list):
        log.warning("benchmark_cache_unreadable", file=path.name, error="unknown format")
        return {}
    mine = key_id(signing_key.verify_key)
    cached: dict[bytes, dict[str, Any]] = {}
    for record in records:
        if not is_benchmark_record(record) or record.get("miner_id") != miner_id:
            continue
        try:
            verify_receipt(record, mine)
        except ReceiptVerificationError:
            continue  # another key (the key file was replaced) or edited: measured again
        cached[dependencies(record)] = record
    return cached


def write_cache(path: Path, records: Sequence[Mapping[str, Any]], fsync: Callable[[int], None] = os.fsync) -> None:
    """Replace the cache with ``records``: a temporary file, fsynced, renamed into place (mode 0600)."""
    body = json.dumps({"format": CACHE_FORMAT, "records": list(records)}, indent=1, sort_keys=True) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, body.encode("utf-8"), fsync=fsync)
    os.chmod(path, 0o600)


# -- measuring -----------------------------------------------------------------------------


def _request(model: str, prompt: str, max_new_tokens: int) -> TextRequest:
    return TextRequest(
        model=model, prompt=prompt, messages=None, params=GenerationParams(max_new_tokens=max_new_tokens, temperature=0)
    )


def _tokens(result: RunResult) -> int:
    tokens = result.completion_tokens
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        raise JobError(ErrorCode.RESULT_INVALID, "the runner reported no completion_tokens for a benchmark job")
    return tokens


async def _gather(jobs: Sequence[Job], runner: Runner, stop: asyncio.Event | None) -> list[Any]:
    """Every job's answer (a RunResult or the exception it raised); ``SHUTDOWN`` once ``stop`` is set."""
    work = asyncio.gather(*(runner.run(job) for job in jobs), return_exceptions=True)
    if stop is None:
        return list(await work)
    waiter: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    pending: list[asyncio.Future[Any]] = [work, waiter]
    try:
        done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the step's timeout, or a forced exit: the jobs go with it
        work.cancel()
        raise
    finally:
        waiter.cancel()
    if work not in done:
        for job in jobs:
            job.cancel()
        await work  # the runner ends cancelled jobs at its next step
        raise JobError(ErrorCode.SHUTDOWN, "the miner is shutting down")
    return list(work.result())


async def _run_jobs(
    target: Target, prompts: Sequence[str], max_new_tokens: int, timeout_s: float, stop: asyncio.Event | None = None
) -> list[RunResult]:
    """Run one job per prompt at once, pinned to the target's GPU; the first failure is raised as a JobError."""
    deadline = time.monotonic() + timeout_s
    jobs = [
        Job(
            job_id=f"benchmark-{secrets.token_hex(6)}",
            request=_request(target.model, prompt, max_new_tokens),
            deadline=deadline,
            pin_gpu=target.pin_gpu,
        )
        for prompt in prompts
    ]
    try:
        async with asyncio.timeout(timeout_s + STEP_SLACK_S):
            answers = await _gather(jobs, target.runner, stop)
    except TimeoutError:
        raise JobError(ErrorCode.DEADLINE_EXCEEDED, f"a benchmark step took longer than {timeout_s:g}s") from None
    finally:
        for job in jobs:
            job.cancel()  # stops whatever is left of them (nothing, after a clean run)
    results: list[RunResult] = []
    for answer in answers:
        if isinstance(answer, JobError):
            raise answer
        if isinstance(answer, DeviceError):
            raise JobError(ErrorCode.DEVICE_ERROR, "the device failed during the benchmark") from answer
        if isinstance(answer, BaseException):
            if not isinstance(answer, Exception):
                raise answer  # a cancellation: not the runner's failure
            raise JobError(ErrorCode.RUNNER_ERROR, f"the runner raised {type(answer).__name__}") from answer
        if not isinstance(answer, RunResult):
            raise JobError(ErrorCode.RESULT_INVALID, "the runner returned something that is not a RunResult")
        results.append(answer)
    return results


class Benchmarker:
    """Measures :class:`Target` s and signs their records (see the module docstring)."""

    def __init__(
        self,
        runtime: Runtime,
        settings: MinerSettings,
        signing_key: SigningKey,
        clock: Callable[[], float] = time.time,
        stop: asyncio.Event | None = None,
    ) -> None:
        self.runtime = runtime
        self.settings = settings
        self.signing_key = signing_key
        self.clock = clock
        self.stop = stop
        self._gpus = {g.uuid: g for g in runtime.gpus}

    async def measure(self, target: Target, cached: Mapping[bytes, dict[str, Any]]) -> tuple[dict[str, Any], bool]:
        """The signed record of ``target`` and whether it came from ``cached``; raises :class:`JobError`."""
        b = self.settings.benchmark
        started = time.perf_counter()
        (probe,) = await _run_jobs(target, PROMPTS[:1], 1, b.timeout_s, self.stop)
        probe_ms = (time.perf_counter() - started) * 1000.0
        gpu_uuid = probe.gpu_uuid or CPU
        software = software_of(target.runner_name, target.runner, probe.model_revision, self._gpus.get(gpu_uuid))
        wanted = {
            "model": target.model,
            "gpu_uuid": gpu_uuid,
            "software": software,
            "batch": target.batch,
            "max_new_tokens": b.max_new_tokens,
        }
        hit = cached.get(dependencies(wanted))
        if hit is not None:
            return hit, True

        started = time.perf_counter()
        (single,) = await _run_jobs(target, PROMPTS[:1], b.max_new_tokens, b.timeout_s, self.stop)
        b1_s = time.perf_counter() - started
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(target.batch)]
        started = time.perf_counter()
        batch = await _run_jobs(target, prompts, b.max_new_tokens, b.timeout_s, self.stop)
        batch_s = time.perf_counter() - started
        ttft = single.ttft_ms if isinstance(single.ttft_ms, (int, float)) and single.ttft_ms > 0 else probe_ms
        record = build_record(
            miner_id=self.settings.miner_id,
            model=target.model,
            gpu_uuid=gpu_uuid,
            tokens_per_s_b1=_tokens(single) / max(b1_s, 1e-9),
            tokens_per_s_batch=sum(_tokens(r) for r in batch) / max(batch_s, 1e-9),
            batch=target.batch,
            max_new_tokens=b.max_new_tokens,
            ttft_ms=float(ttft),
            measured_at=self.clock(),
            software=software,
        )
        return sign_receipt(record, self.signing_key), False


async def run_benchmarks(
    runtime: Runtime,
    settings: MinerSettings,
    signing_key: SigningKey,
    *,
    fresh: bool = False,
    clock: Callable[[], float] = time.time,
    stop: asyncio.Event | None = None,
) -> BenchmarkReport:
    """Measure (or reuse from the cache) every ready model on every GPU it has a copy on.

    ``fresh`` ignores the cache (``aitbc-miner bench``). One line per record
    (``benchmark_measured`` / ``benchmark_cached``) or failure (``benchmark_failed``);
    the cache is rewritten when anything was measured (or ``fresh``). Once ``stop`` is set
    (the miner is shutting down) the running jobs are cancelled and what was measured so
    far is returned. Only a cancellation propagates: an unexpected error of one model is
    its ``benchmark_failed`` (``INTERNAL_ERROR``), a failure of the cache file is logged
    (``benchmark_cache_write_failed``).
    """
    path = cache_path(settings.state_dir)
    cached: dict[bytes, dict[str, Any]] = (
        {} if fresh else await asyncio.to_thread(load_cache, path, signing_key, settings.miner_id)
    )
    benchmarker = Benchmarker(runtime, settings, signing_key, clock, stop)
    report = BenchmarkReport()
    seen: set[tuple[str, str]] = set()
    for target in targets(runtime, settings.models):
        if stop is not None and stop.is_set():
            break
        gpu = target.pin_gpu or CPU
        try:
            record, from_cache = await benchmarker.measure(target, cached)
        except Exception as exc:  # a benchmark never stops the miner
            code = str(exc.code) if isinstance(exc, JobError) else ErrorCode.INTERNAL_ERROR.value
            if code == ErrorCode.SHUTDOWN:
                break
            log.warning("benchmark_failed", model=target.model, gpu=gpu, error_code=code)
            report.failures.append(Failure(target.model, gpu, code))
            continue
        pair = (record["model"], record["gpu_uuid"])
        if pair in seen:  # a runner that does not pin (a remote engine): one record is enough
            continue
        seen.add(pair)
        report.records.append(record)
        figures = {k: record[k] for k in ("tokens_per_s_b1", "tokens_per_s_batch", "batch", "ttft_ms", "measured_at")}
        if from_cache:
            log.info("benchmark_cached", model=record["model"], gpu=record["gpu_uuid"], **figures)
        else:
            report.measured += 1
            cached[dependencies(record)] = record  # a runner that does not pin gives the same pair again
            log.info("benchmark_measured", model=record["model"], gpu=record["gpu_uuid"], **figures)
    if report.measured or fresh:
        try:
            await asyncio.to_thread(write_cache, path, report.records)
        except OSError as exc:
            log.warning("benchmark_cache_write_failed", file=path.name, error=exc.strerror or type(exc).__name__)
    return report


def published(records: Sequence[Mapping[str, Any]], ready: Sequence[str]) -> list[dict[str, Any]]:
    """The records to put in the capabilities: those of the models ready now."""
    wanted = set(ready)
    return [dict(r) for r in records if r.get("model") in wanted]
