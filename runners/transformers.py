"""The transformers runner: Hugging Face transformers + PyTorch on CUDA GPUs or the CPU.

Importing this module imports neither torch nor transformers; :meth:`start` does.
Options of a ``[[models]]`` entry are documented in :mod:`runners.hf.options`. Serving:

- only configured models, from safetensors, never with ``trust_remote_code``; a model that
  would need either is refused at start with a ConfigError;
- each model runs where :mod:`runners.placement` puts it (by default a copy on each of the
  miner's GPUs; ``devices`` picks GPUs or shards one copy over several). A GPU is matched
  to torch's device by UUID or PCI bus id (:mod:`runners.hf.gpumap`), so the GPU whose
  memory is checked, the one that runs the batch and the receipt's ``gpu_uuid`` are the
  same. When NVML sees GPUs but torch cannot use CUDA, start stops with one line naming
  torch's build, the driver's CUDA version and the fix: never a silent CPU fallback;
- each job goes to the copy with the fewest jobs; :meth:`TransformersRunner.capacity`
  tells claiming how many jobs the devices can hold now (batch room and free memory);
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
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import structlog

from miner.wire.errors import ConfigError, DeviceError, ErrorCode, JobError
from runners.base import Job, ModelSpec, RunnerContext, RunResult, parse_options
from runners.hf.options import CPU_PLAN, DevicePlan, TransformersOptions
from runners.placement import Placement, choose_copy, place_model

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
        self._route: dict[str, list[DeviceWorker]] = {}  # model -> its copies' workers
        self._load: dict[str, int] = {}  # worker key -> jobs waiting or running there
        self._started = False
        self._closed = False

    async def start(self) -> None:
        """Check every model, start a worker per device, preload and warm up; ConfigError if unusable."""
        options = {spec.name: parse_options(TransformersOptions, spec) for spec in self._specs}
        placements = {
            name: place_model(f"models[name={name!r}]", self._context.gpus, opts.devices, opts.device)
            for name, opts in options.items()
        }
        if not available():
            raise ConfigError(
                "runner 'transformers' needs torch, transformers and safetensors; "
                "install them with: pip install 'aitbc-miner[transformers]'"
            )
        os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # before torch numbers the GPUs
        plans = await asyncio.to_thread(self._plan, placements)
        from runners.hf.model import resolve_entry

        jobs = [(name, plan) for name, model_plans in plans.items() for plan in model_plans]
        entries = await asyncio.gather(
            *(asyncio.to_thread(resolve_entry, name, options[name], plan) for name, plan in jobs)
        )
        self._entries = {entry.name: entry for entry in entries}
        self._start_workers(entries)
        preloads = [(e.name, w) for e in entries if e.options.preload for w in [self._workers[e.plan.key]]]
        results = await asyncio.gather(*(self._command(w, name) for name, w in preloads), return_exceptions=True)
        for (name, _), result in zip(preloads, results, strict=True):
            if isinstance(result, BaseException):
                await self.aclose()
                detail = result.message if isinstance(result, JobError) else f"{type(result).__name__}: {result}"
                raise ConfigError(f"models[name={name!r}]: cannot load the model: {detail}") from result
        self._started = True
        log.info(
            "runner_started",
            runner=self.name,
            models=sorted(self._entries),
            devices={name: [w.key for w in workers] for name, workers in sorted(self._route.items())},
            preloaded=sorted({name for name, _ in preloads}),
        )

    def _plan(self, placements: dict[str, list[Placement]]) -> dict[str, list[DevicePlan]]:
        """Each copy's torch devices; stops with one line when torch cannot use the GPUs NVML sees."""
        gpus = self._context.gpus
        if all(p.on_cpu for copies in placements.values() for p in copies):
            return {name: [CPU_PLAN] for name in placements}
        from runners.hf.gpumap import torch_indices, visible_torch_gpus

        found = visible_torch_gpus()
        if not found:
            from miner.host.cudacompat import cuda_unusable_error, torch_build

            driver = gpus[0].driver_version if gpus else None
            cuda = gpus[0].cuda_version if gpus else None
            raise ConfigError(cuda_unusable_error(torch_build(), len(gpus), driver, cuda))
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return {
            name: [
                CPU_PLAN
                if p.on_cpu
                else DevicePlan.for_cuda(torch_indices(f"models[name={name!r}]", p.gpus, found, visible), p.gpus)
                for p in copies
            ]
            for name, copies in placements.items()
        }

    def _start_workers(self, entries: Sequence[ModelEntry]) -> None:
        from runners.hf.worker import DeviceWorker, MemoryProbe

        by_device: dict[str, list[ModelEntry]] = {}
        for entry in entries:
            by_device.setdefault(entry.plan.key, []).append(entry)
        for key, group in by_device.items():
            plan = group[0].plan
            budgets = [e.options.memory_budget_mb for e in group if e.options.memory_budget_mb is not None]
            probe = MemoryProbe(
                plan.cuda_indices,
                min(budgets) * 2**20 if budgets else None,
                self._context.free_vram_mb,
                plan.nvml_indices,
            )
            gpu_uuid = plan.gpu_uuids[0] if plan.gpus else None
            worker = DeviceWorker(key, {e.name: e for e in group}, probe, gpu_uuid, self._context.state_dir)
            worker.start()
            self._workers[key] = worker
            for entry in group:
                self._route.setdefault(entry.name, []).append(worker)

    async def _command(self, worker: DeviceWorker, name: str) -> Any:
        from runners.hf.worker import Command

        loop = asyncio.get_running_loop()
        command = Command(lambda: worker.preload(name), loop, loop.create_future())
        worker.submit(command)
        return await command.future

    def ready_models(self) -> list[str]:
        """Configured models on a working device: loaded, or checked and loadable on demand."""
        if self._closed or not self._started:
            return []
        return [name for name, workers in self._route.items() if any(self._usable(w) for w in workers)]

    def _usable(self, worker: DeviceWorker) -> bool:
        """A working device on GPUs that serve now (the daemon drains a GPU in trouble)."""
        return worker.broken is None and self._context.serving(worker.plan.gpu_uuids)

    def loaded(self, name: str) -> LoadedModel | None:
        """A resident copy of the model called ``name`` (for benchmarks and diagnostics), if loaded."""
        for worker in self._route.get(name, ()):
            model = worker.loaded(name)
            if model is not None:
                return model
        return None

    def tokenize(self, model: str, text: str) -> list[str]:
        """``text`` split into the tokens of ``model``'s tokenizer (no special tokens), e.g. for
        ``verify-job`` to name the first differing token; KeyError for a model not configured."""
        loaded = self.loaded(model)
        if loaded is not None:
            tokenizer = loaded.tokenizer
        else:
            from runners.hf.model import load_tokenizer

            tokenizer = load_tokenizer(self._entries[model])
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]

    def capacity(self) -> int:
        """Jobs the runner could hold at once now (see :meth:`DeviceWorker.capacity`), over its devices."""
        if self._closed or not self._started:
            return 0
        return sum(
            w.capacity(self._load.get(key, 0))
            for key, w in self._workers.items()
            if self._context.serving(w.plan.gpu_uuids)
        )

    def max_capacity(self) -> int:
        """The most jobs the runner ever holds at once: each device's largest ``max_batch_size``."""
        return sum(w.max_capacity() for w in self._workers.values())

    def _pick(self, job: Job) -> DeviceWorker | None:
        """The copy of the job's model with the fewest jobs waiting or running (a broken device
        last), on a GPU that serves now (``JobError`` when none does), ``job.pin_gpu``'s if set."""
        workers = self._route.get(job.model)
        if not workers:
            return None
        return choose_copy(
            job.model,
            workers,
            uuids=lambda w: w.plan.gpu_uuids,
            order=lambda w: (w.broken is not None, self._load.get(w.key, 0)),
            context=self._context,
            pin_gpu=job.pin_gpu,
        )

    async def run(self, job: Job) -> RunResult:
        """Queue the job on its device's worker and wait for its row of a batch to finish."""
        worker = self._pick(job)
        if worker is None or self._closed:
            raise JobError(ErrorCode.MODEL_NOT_SERVED, f"model {job.model!r} is not served by the transformers runner")
        if worker.broken is not None:
            raise DeviceError(f"device {worker.key} is unusable: {worker.broken}")
        job.raise_if_stopped()
        from runners.hf.batch import Request

        loop = asyncio.get_running_loop()
        request = Request(job, loop, loop.create_future())
        self._load[worker.key] = self._load.get(worker.key, 0) + 1
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
            result: RunResult = await request.future
        except asyncio.CancelledError:
            job.cancel()  # the worker drops the job at its next step
            request.abandon()
            raise
        finally:
            self._load[worker.key] -= 1
        plan = worker.plan
        result.dtype = worker.entries[job.model].dtype
        result.gpu_uuid = plan.gpu_uuids[0] if plan.gpus else None
        result.gpu_uuids = plan.gpu_uuids if plan.sharded else ()
        return result

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
