"""One worker thread per device: the device's warm model cache and its batching loop.

The thread takes requests from a queue and groups those for the same model with the
same sampling settings (seeds may differ: each row samples with its own generator) into
one batch of at most ``max_batch_size``. It waits ``batch_wait_ms`` for each further
companion and never longer than ``batch_window_ms`` in all, so a lone job starts within a
few milliseconds. Jobs that arrive while a batch is in its first eighth still join it: the
batch stops and restarts with them (at most three times), which costs a few decoding steps and
saves the newcomers a whole batch of waiting. Models live in a :class:`ModelCache` (warm,
least recently used evicted); memory is checked against the estimate of
:mod:`runners.hf.memory` before anything is allocated.

Out of memory during a batch: the cache is emptied and the unfinished rows are retried in
halves; a job that runs out of memory alone fails with ``OUT_OF_MEMORY``, and the model's
batch cap drops to the size that failed (it grows back by one after each full batch).
A CUDA error that leaves the device unusable marks the worker broken: every in-flight and
later job on it gets :class:`~miner.wire.errors.DeviceError`, which stops the daemon.

An unexpected exception's message may quote the prompt (a tokenizer or a model that
echoes its input), so none reaches the coordinator or the log: the job fails with a fixed
message naming the exception type, and the log line carries the type and the traceback
frames (file, line, function) only. A fatal CUDA error is described by the marker that
identified it, never by its text.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from miner.wire.errors import DeviceError, ErrorCode, JobError
from runners.hf import model as hf_model
from runners.hf.batch import Request, Row, run_batch, settle_threadsafe, stop_error
from runners.hf.cache import ModelCache
from runners.hf.decode import check_option, resolve_decode_mode
from runners.hf.device import FATAL_MARKERS, MemoryProbe, is_device_fatal, is_out_of_memory
from runners.hf.memory import MemoryEstimate, estimate_bytes, mib
from runners.hf.model import LoadedModel, ModelEntry
from runners.params import GenerationParams

log = structlog.get_logger("runners.transformers")

_STOP = object()
CAPACITY_PROMPT_TOKENS = 512  # the prompt length claiming plans memory for (longer prompts are checked per job)
MAX_RESTARTS = 3  # times one batch may restart to take in late joiners


def batch_key(params: GenerationParams) -> tuple[Any, ...]:
    """Jobs with equal keys share a batch: ``sampling_key()`` without the seed."""
    if params.greedy:
        return ("greedy", params.repetition_penalty)
    return ("sample", params.temperature, params.top_p, params.top_k, params.repetition_penalty)


@dataclass
class Command:
    """A function to run in the worker thread (preloading), answered through ``future``."""

    fn: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future

    def resolve(self, value: Any) -> None:
        settle_threadsafe(self.loop, self.future, value)


class DeviceWorker:
    """Owns one device (``cpu``, ``cuda:N`` or ``auto``): its models, queue and thread."""

    def __init__(
        self,
        key: str,
        entries: dict[str, ModelEntry],
        probe: MemoryProbe,
        gpu_uuid: str | None,
        state_dir: Path | None = None,
    ) -> None:
        """``state_dir`` keeps the measured ``decode = "auto"`` choices; ConfigError for a decode mode this
        transformers lacks."""
        for name, entry in entries.items():
            check_option(name, entry.options.decode)
        self.key = key
        self.state_dir = state_dir
        self.entries = entries
        self.plan = next(iter(entries.values())).plan  # every model of a worker shares its device
        self.probe = probe
        self.gpu_uuid = gpu_uuid
        self.closing = threading.Event()
        self.broken: str | None = None
        self.cache = ModelCache(key, probe)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._backlog: deque[Any] = deque()
        self._thread = threading.Thread(target=self._main, name=f"aitbc-runner-{key}", daemon=True)

    # --- called from the event loop -------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, item: Request | Command) -> None:
        self._queue.put(item)

    def close(self) -> None:
        self.closing.set()
        self._queue.put(_STOP)

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def loaded(self, name: str) -> LoadedModel | None:
        return self.cache.get(name)

    @property
    def loading(self) -> str | None:
        return self.cache.loading

    def capacity(self, load: int) -> int:
        """Jobs this device could hold at once now, ``load`` (waiting or running here) included.

        The largest batch any of its models can run: the model's batch cap, lowered to what
        the free memory holds at :data:`CAPACITY_PROMPT_TOKENS` prompt tokens plus the
        model's ``max_new_tokens`` per job (weights counted for a model not resident yet).
        On CUDA the free memory already excludes running batches, so those jobs are added;
        a memory budget is counted whole. 0 once the device is broken or closing.
        """
        if self.broken is not None or self.closing.is_set():
            return 0
        best = 0
        for name, entry in self.entries.items():
            loaded = self.cache.get(name)
            cap = loaded.batch_cap if loaded else entry.options.max_batch_size
            per_job = estimate_bytes(
                entry.shape,
                prompt_tokens=min(entry.max_prompt_tokens, CAPACITY_PROMPT_TOKENS),
                max_new_tokens=entry.max_new_tokens,
                batch=1,
                dtype=entry.dtype,
                include_weights=False,
            ).total
            free = self.cache.free_bytes()
            if free is None:
                best = max(best, cap)
                continue
            if loaded is None:
                free -= entry.weight_bytes
            fits = max(free, 0) // max(per_job, 1)
            if self.probe.cuda_indices and self.probe.budget_bytes is None:
                fits += load
            best = max(best, min(cap, fits))
        return best

    def max_capacity(self) -> int:
        """The most jobs this device ever holds at once: its models' largest ``max_batch_size``."""
        return max(e.options.max_batch_size for e in self.entries.values())

    # --- the worker thread ----------------------------------------------------------

    def _next(self, timeout: float | None) -> Any:
        if self._backlog:
            return self._backlog.popleft()
        return self._queue.get(timeout=timeout) if timeout is not None else self._queue.get()

    def _main(self) -> None:
        if self.plan.is_cuda:
            torch.cuda.set_device(self.plan.cuda_indices[0])  # kernels and empty_cache act on this GPU
        try:
            while True:
                item = self._next(None)
                if item is _STOP:
                    break
                if isinstance(item, Command):
                    self._run_command(item)
                elif isinstance(item, Request):
                    batch = self._collect(item)
                    try:
                        self._serve(batch)
                    except Exception as exc:  # a bug must not kill the thread and strand the jobs
                        self._fail_unexpected(batch, exc)
        finally:
            self._drain()
            self.cache.clear(device_ok=self.broken is None)

    def _run_command(self, command: Command) -> None:
        try:
            command.resolve(command.fn())
        except BaseException as exc:  # handed to the awaiting coroutine
            command.resolve(exc)

    def _collect(self, first: Request) -> list[Request]:
        """``first`` plus compatible requests already waiting or arriving within the window."""
        entry = self.entries.get(first.job.model)
        if entry is None:
            return [first]
        key = (first.job.model, batch_key(first.job.request.params))
        loaded = self.cache.get(first.job.model)
        cap = loaded.batch_cap if loaded else entry.options.max_batch_size
        batch = [first]
        for item in list(self._backlog):
            if len(batch) >= cap:
                return batch
            if self._joins(item, key):
                self._backlog.remove(item)
                batch.append(item)
        gap = entry.options.batch_wait_ms / 1000
        window_end = time.monotonic() + entry.options.batch_window_ms / 1000
        while len(batch) < cap:
            timeout = min(gap, window_end - time.monotonic())
            if timeout <= 0:
                break
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                break
            if self._joins(item, key):
                batch.append(item)
            else:
                self._backlog.append(item)
                if item is _STOP:
                    break
        return batch

    def _serve(self, requests: list[Request]) -> None:
        requests = [r for r in requests if r.take()]
        live = []
        for request in requests:
            error = self._refusal(request)
            if error is not None:
                request.resolve(error)
            else:
                live.append(request)
        if not live:
            return
        entry = self.entries[live[0].job.model]
        try:
            rows = self._rows(entry, live)
            if not rows:
                return
            loaded = self._ensure_loaded(entry, min(self._estimate(entry, [r], True).total for r in rows))
        except JobError as exc:
            for request in live:
                request.resolve(exc)
            return
        except Exception as exc:
            self._fail_unexpected(live, exc)
            return
        self.cache.touch(entry.name)
        for chunk in self._chunks(loaded, rows):
            if not self._run_chunk(loaded, chunk):
                return

    def _refusal(self, request: Request) -> BaseException | None:
        if self.broken is not None:
            return DeviceError(f"device {self.key} is unusable: {self.broken}")
        if request.job.model not in self.entries:
            return JobError(ErrorCode.MODEL_NOT_SERVED, f"model {request.job.model!r} is not served on {self.key}")
        return stop_error(request.job, self.closing.is_set())

    def _rows(self, entry: ModelEntry, requests: list[Request]) -> list[Row]:
        tokenizer = self.cache.tokenizer(entry)
        rows = []
        for request in requests:
            try:
                ids = hf_model.encode(entry, tokenizer, request.job.request)
            except JobError as exc:
                request.resolve(exc)
                continue
            rows.append(Row(request, ids, hf_model.max_new_for(entry, request.job.request, len(ids))))
        return rows

    # --- memory ---------------------------------------------------------------------

    def _estimate(self, entry: ModelEntry, rows: list[Row], resident: bool) -> MemoryEstimate:
        return estimate_bytes(
            entry.shape,
            prompt_tokens=max(len(r.ids) for r in rows),
            max_new_tokens=max(r.max_new for r in rows),
            batch=len(rows),
            dtype=entry.dtype,
            weight_bytes=entry.weight_bytes,
            include_weights=not resident,
        )

    def preload(self, name: str) -> str:
        """Load (and warm up) ``name`` now; runs in the worker thread as a command."""
        self._ensure_loaded(self.entries[name], 0)
        self.cache.touch(name)
        return name

    def _ensure_loaded(self, entry: ModelEntry, job_bytes: int) -> LoadedModel:
        """The resident model (loaded and warmed up if needed) with its decode mode chosen once per load."""
        loaded = self.cache.ensure_loaded(entry, job_bytes)
        if not loaded.decode_chosen:
            loaded.decode_mode = resolve_decode_mode(entry.options.decode, loaded, self.state_dir)
            loaded.decode_chosen = True
        return loaded

    # --- running batches ------------------------------------------------------------

    def _chunks(self, loaded: LoadedModel, rows: list[Row]) -> Iterator[list[Row]]:
        """Consecutive batches that fit the batch cap and the free memory (checked lazily)."""
        rest = list(rows)
        while rest:
            chunk: list[Row] = []
            free = self.cache.free_bytes()
            for row in rest[: loaded.batch_cap]:
                trial = chunk + [row]
                if free is not None and self._estimate(loaded.entry, trial, True).total > free:
                    break
                chunk = trial
            if not chunk:
                need = self._estimate(loaded.entry, rest[:1], True)
                free = self.cache.make_room(need.total, keep=loaded.name)
                if free is None or need.total <= free:
                    continue
                rest.pop(0).request.resolve(
                    JobError(
                        ErrorCode.INSUFFICIENT_VRAM,
                        f"this job needs {need.describe()} on {self.key} with {loaded.name!r} loaded; "
                        f"only {mib(free)} are free: lower max_new_tokens or the prompt length",
                    )
                )
                continue
            rest = rest[len(chunk) :]
            yield chunk

    def _run_chunk(self, loaded: LoadedModel, chunk: list[Row]) -> bool:
        """Run one batch with late joiners and out-of-memory retries; False once the device is unusable."""
        pending = deque([chunk])
        restarts = 0
        while pending:
            rows = [row for row in pending.popleft() if not row.done]
            if not rows:
                continue
            key = (loaded.name, batch_key(rows[0].params))
            late = None
            if restarts < MAX_RESTARTS and len(rows) < loaded.batch_cap:
                late = lambda key=key: self._companions_waiting(key)  # noqa: E731
            started = time.monotonic()
            try:
                restarted = run_batch(loaded, rows, self.closing, self.gpu_uuid, late)
            except Exception as exc:
                if is_out_of_memory(exc):
                    self._after_out_of_memory(loaded, rows, pending)
                elif is_device_fatal(exc):
                    self._break(exc, rows)
                    return False
                else:
                    self._fail_unexpected([row.request for row in rows if not row.done], exc)
                continue
            if restarted:
                restarts += 1
                newcomers = self._take_companions(key, loaded.batch_cap - len(rows))
                combined = [row for row in rows if not row.done] + self._rows(loaded.entry, newcomers)
                pending.extendleft(reversed(list(self._chunks(loaded, combined))))
                log.debug("batch_restarted", model=loaded.name, device=self.key, batch=len(combined))
                continue
            if len(rows) >= loaded.batch_cap:
                loaded.batch_cap = min(loaded.entry.options.max_batch_size, loaded.batch_cap + 1)
            log.debug(
                "batch_done",
                model=loaded.name,
                device=self.key,
                batch=len(rows),
                seconds=round(time.monotonic() - started, 4),
            )
        return True

    def _companions_waiting(self, key: tuple[Any, ...]) -> bool:
        """Whether a job that could join a batch of ``key`` has arrived (asked between steps)."""
        while True:
            try:
                self._backlog.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return any(self._joins(item, key) for item in self._backlog)

    def _take_companions(self, key: tuple[Any, ...], room: int) -> list[Request]:
        taken: list[Request] = []
        for item in list(self._backlog):
            if len(taken) >= room:
                break
            if self._joins(item, key):
                self._backlog.remove(item)
                if item.take():
                    error = self._refusal(item)
                    if error is None:
                        taken.append(item)
                    else:
                        item.resolve(error)
        return taken

    @staticmethod
    def _joins(item: Any, key: tuple[Any, ...]) -> bool:
        return isinstance(item, Request) and item.queued and (item.job.model, batch_key(item.job.request.params)) == key

    def _after_out_of_memory(self, loaded: LoadedModel, rows: list[Row], pending: deque[list[Row]]) -> None:
        """Free the cache; retry the unfinished rows in halves, or fail a lone one OUT_OF_MEMORY."""
        self.cache.empty_cache()
        left = [row for row in rows if not row.done]
        log.warning("batch_out_of_memory", model=loaded.name, device=self.key, batch=len(rows), retrying=len(left) > 1)
        loaded.batch_cap = max(1, len(rows) // 2)
        if len(left) == 1:
            left[0].done = True
            message = f"ran out of GPU memory on {self.key}; lower max_new_tokens or the prompt length"
            left[0].request.resolve(JobError(ErrorCode.OUT_OF_MEMORY, message))
        elif left:
            half = (len(left) + 1) // 2
            pending.extendleft([left[half:], left[:half]])

    def _fail_unexpected(self, requests: list[Request], exc: Exception) -> None:
        log.error("generation_failed", device=self.key, error_type=type(exc).__name__, frames=traceback_frames(exc))
        message = f"generation failed on {self.key} with {type(exc).__name__}; see generation_failed in the miner log"
        for request in requests:
            request.resolve(JobError(ErrorCode.RUNNER_ERROR, message))

    def _break(self, exc: Exception, rows: list[Row]) -> None:
        self.broken = describe_fatal(exc)
        log.critical("device_unusable", device=self.key, error=self.broken, frames=traceback_frames(exc))
        error = DeviceError(f"device {self.key} is unusable: {self.broken}")
        for row in rows:
            if not row.done:
                row.done = True
                row.request.resolve(error)
        self._drain(error)

    def _drain(self, error: BaseException | None = None) -> None:
        """Answer every queued request (shutdown or a broken device)."""
        error = error or JobError(ErrorCode.SHUTDOWN, "the miner is shutting down")
        while True:
            try:
                item = self._backlog.popleft() if self._backlog else self._queue.get_nowait()
            except queue.Empty:
                return
            if item is _STOP:
                self._backlog.appendleft(item)  # the main loop still has to see it
                return
            if (isinstance(item, Request) and item.take()) or isinstance(item, Command):
                item.resolve(error)


def traceback_frames(exc: BaseException, limit: int = 30) -> list[str]:
    """``file:line:function`` of each frame of ``exc``'s traceback (innermost last), without any message."""
    frames = traceback.extract_tb(exc.__traceback__)
    return [f"{frame.filename}:{frame.lineno}:{frame.name}" for frame in frames][-limit:]


# Most specific first, so "cuda error: an illegal memory access" reads "illegal memory access".
_FATAL_DESCRIPTIONS = tuple(sorted(FATAL_MARKERS, key=len, reverse=True))


def describe_fatal(exc: BaseException) -> str:
    """A fatal CUDA error as its type and the known marker found in it (never the message itself)."""
    text = str(exc).lower()
    marker = next((m for m in _FATAL_DESCRIPTIONS if m in text), "unrecognised CUDA failure")
    return f"{type(exc).__name__} ({marker})"
