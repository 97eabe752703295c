"""The transformers runner: Hugging Face transformers + PyTorch on CUDA GPUs or the CPU.

Importing this module imports neither torch nor transformers; :meth:`start` does.
Options of a ``[[models]]`` entry are documented in :mod:`runners.hf.options`. Serving:

- only configured models, from safetensors, never with ``trust_remote_code``; a model that
  would need either is refused at start with a ConfigError;
- one worker thread per device (:mod:`runners.hf.worker`) keeps the device's models warm
  (least recently used evicted when memory is short), batches jobs for the same model
  dynamically and runs ``generate`` under ``torch.inference_mode()``;
- a job stops within one decoding step of a cancel or its deadline (:mod:`runners.hf.batch`);
- results carry prompt/completion tokens, time to first token (from ``run()`` being called
  to the first decoding step: queueing, batching wait and prefill included), tokens/s,
  finish reason, model revision (the pinned hub commit, or ``local-<hash>`` of a local
  folder), device and GPU UUID, and ``gpu_seconds`` (the job's share of its batch's time).
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import structlog

from miner.wire.errors import ConfigError, DeviceError, ErrorCode, JobError
from runners.base import Job, ModelSpec, RunnerContext, RunResult, parse_options
from runners.hf.options import TransformersOptions

if TYPE_CHECKING:
    from runners.hf.model import LoadedModel, ModelEntry
    from runners.hf.worker import DeviceWorker

log = structlog.get_logger("runners.transformers")

_POLL_S = 0.05  # how often a queued job's cancel flag is looked at
_CLOSE_TIMEOUT_S = 30.0


def available() -> bool:
    """Whether torch and transformers can be imported (without importing them)."""
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers", "safetensors"))


class TransformersRunner:
    """Serves the configured transformers models (see the module docstring)."""

    name: ClassVar[str] = "transformers"

    def __init__(self, specs: Sequence[ModelSpec], context: RunnerContext) -> None:
        self._specs = list(specs)
        self._context = context
        self._entries: dict[str, ModelEntry] = {}
        self._workers: dict[str, DeviceWorker] = {}
        self._route: dict[str, DeviceWorker] = {}
        self._started = False
        self._closed = False

    async def start(self) -> None:
        """Check every model, start a worker per device, preload and warm up; ConfigError if unusable."""
        options = {spec.name: parse_options(TransformersOptions, spec) for spec in self._specs}
        if not available():
            raise ConfigError(
                "runner 'transformers' needs torch, transformers and safetensors; "
                "install them with: pip install 'aitbc-miner[transformers]'"
            )
        from runners.hf.model import resolve_entry

        entries = await asyncio.gather(
            *(asyncio.to_thread(resolve_entry, name, opts) for name, opts in options.items())
        )
        self._entries = {entry.name: entry for entry in entries}
        self._start_workers()
        preloads = [name for name, entry in self._entries.items() if entry.options.preload]
        results = await asyncio.gather(*(self._command(name) for name in preloads), return_exceptions=True)
        for name, result in zip(preloads, results, strict=True):
            if isinstance(result, BaseException):
                await self.aclose()
                detail = result.message if isinstance(result, JobError) else f"{type(result).__name__}: {result}"
                raise ConfigError(f"models[name={name!r}]: cannot load the model: {detail}") from result
        self._started = True
        log.info("runner_started", runner=self.name, models=sorted(self._entries), preloaded=preloads)

    def _start_workers(self) -> None:
        from runners.hf.worker import DeviceWorker, MemoryProbe

        by_device: dict[str, list[ModelEntry]] = {}
        for entry in self._entries.values():
            by_device.setdefault(entry.plan.key, []).append(entry)
        for key, entries in by_device.items():
            plan = entries[0].plan
            budgets = [e.options.memory_budget_mb for e in entries if e.options.memory_budget_mb is not None]
            probe = MemoryProbe(
                plan.cuda_indices, min(budgets) * 2**20 if budgets else None, self._context.free_vram_mb
            )
            uuids = [g.uuid for g in self._context.gpus if g.index in plan.cuda_indices]
            worker = DeviceWorker(key, {e.name: e for e in entries}, probe, ",".join(uuids) or None)
            worker.start()
            self._workers[key] = worker
            for entry in entries:
                self._route[entry.name] = worker

    async def _command(self, name: str) -> Any:
        from runners.hf.worker import Command

        worker = self._route[name]
        loop = asyncio.get_running_loop()
        command = Command(lambda: worker.preload(name), loop, loop.create_future())
        worker.submit(command)
        return await command.future

    def ready_models(self) -> list[str]:
        """Configured models on a working device: loaded, or checked and loadable on demand."""
        if self._closed or not self._started:
            return []
        return [name for name, worker in self._route.items() if worker.broken is None]

    def loaded(self, name: str) -> LoadedModel | None:
        """The resident model called ``name`` (for benchmarks and diagnostics), if loaded."""
        worker = self._route.get(name)
        return worker.loaded(name) if worker else None

    async def run(self, job: Job) -> RunResult:
        """Queue the job on its device's worker and wait for its row of a batch to finish."""
        worker = self._route.get(job.model)
        if worker is None or self._closed:
            raise JobError(ErrorCode.MODEL_NOT_SERVED, f"model {job.model!r} is not served by the transformers runner")
        if worker.broken is not None:
            raise DeviceError(f"device {worker.key} is unusable: {worker.broken}")
        job.raise_if_stopped()
        from runners.hf.batch import Request

        loop = asyncio.get_running_loop()
        request = Request(job, loop, loop.create_future())
        worker.submit(request)
        try:
            # While queued, look at the cancel flag and deadline here; once a batch has taken
            # the job, the worker checks them at every decoding step, so just wait.
            while request.queued:
                timeout = _POLL_S
                if job.deadline is not None:
                    timeout = min(timeout, max(0.0, job.deadline - time.monotonic()) + 0.001)
                done, _ = await asyncio.wait({request.future}, timeout=timeout)
                if done:
                    break
                if job.should_stop() and request.abandon():
                    job.raise_if_stopped()
            return await request.future
        except asyncio.CancelledError:
            job.cancel()  # the worker drops the job at its next step
            request.abandon()
            raise

    async def aclose(self) -> None:
        """Stop the workers (queued jobs fail with SHUTDOWN) and free the models."""
        if self._closed:
            return
        self._closed = True
        workers = list(self._workers.values())
        for worker in workers:
            worker.close()
        for worker in workers:
            if not await asyncio.to_thread(worker.join, _CLOSE_TIMEOUT_S):
                log.warning("runner_worker_still_running", device=worker.key)
        self._workers.clear()
        log.info("runner_closed", runner=self.name)
