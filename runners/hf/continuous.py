"""``decode = "continuous"``: a batch through transformers' continuous batching (paged attention).

:func:`run_continuous` has the contract of :func:`runners.hf.batch.run_batch`: every row's
future is resolved with the :class:`~runners.base.RunResult` of
:func:`runners.hf.batch.finish_row` or with a JobError (cancel, deadline, shutdown), and
what the library raised for out-of-memory or a device error is raised again.

The model's :class:`ContinuousBatchingManager` (``init_continuous_batching``) is made at
the first continuous batch, sized by the model's options (:func:`manager_config`), and
kept on the model between batches (``stop(keep_for_next_session=True)``, transformers' own
way to reuse one): its paged KV cache stays allocated while the model is loaded. For each
batch its generation thread is started, every row is added as a streaming request with its
own ``max_new_tokens`` and the model's EOS ids, and this thread reads each new token as it
comes and passes it to :func:`runners.hf.batch.advance_row`, the same per-token stopping as
eager decoding (EOS, stop strings, ``max_new_tokens``, cancel, deadline, shutdown). A row
stopped here is cancelled in the manager (``cancel_request``), which drops it before its
next step; tokens it produced after the stop are never used, so the output is eager's.
``gpu_seconds``: the wall time between two readings is split equally over the rows still
running (the shares sum to the batch's time). A row's time to first token is when its first
token was read. Late joiners restart the batch exactly as in eager mode.

Continuous batching samples with one generator shared by all requests, so a seeded job would
not draw the same numbers alone and in a batch: :func:`refusal` turns away sampled jobs (and
repetition penalty, which it does not apply per request), and such batches decode eager.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog
import torch

from miner.wire.errors import JobError
from runners.base import stop_error
from runners.hf.batch import RESTART_FRACTION, Row, advance_row, finish_row, stop_window
from runners.hf.model import LoadedModel
from runners.params import GenerationParams

log = structlog.get_logger("runners.transformers")

POLL_S = 0.02  # how often cancels and deadlines are looked at while no token arrives
FAILURE_WAIT_S = 2.0  # how long to wait for the generation thread to record the error that failed a request
CPU_MAX_BATCH_TOKENS = 512  # tokens per forward on the CPU (the library's default of 8192 is for GPUs)
PAGE_TOKENS = 256  # tokens per page of the paged KV cache (transformers' default)
CAPACITY_PROMPT_TOKENS = 512  # prompt length per job the paged cache is sized for (with max_new_tokens)
_ids = itertools.count()


def available() -> bool:
    """Whether this transformers version has the continuous-batching API this module uses."""
    try:
        from transformers import ContinuousBatchingConfig  # noqa: F401
        from transformers.generation.continuous_batching import ContinuousBatchingManager
    except ImportError:
        return False
    return hasattr(ContinuousBatchingManager, "cancel_request")


def refusal(params: GenerationParams) -> str | None:
    """Why a job with ``params`` cannot decode continuously (it then runs eager), or None when it can."""
    if not params.greedy:
        return "sampling: continuous batching shares one generator, so seeded jobs would not reproduce"
    if params.repetition_penalty not in (None, 1.0):
        return "repetition_penalty: continuous batching does not apply it per request"
    return None


def manager_config(loaded: LoadedModel) -> Any:
    """The ContinuousBatchingConfig of the model's manager: a paged cache for ``max_batch_size`` jobs.

    Room for ``max_batch_size`` jobs of :data:`CAPACITY_PROMPT_TOKENS` prompt tokens plus the
    model's ``max_new_tokens``, and never less than one longest job; longer jobs wait in the
    manager's queue until pages are free. On the CPU a forward holds at most
    :data:`CPU_MAX_BATCH_TOKENS` tokens and nothing is compiled.
    """
    from transformers import ContinuousBatchingConfig

    entry = loaded.entry
    per_job = min(entry.max_prompt_tokens, CAPACITY_PROMPT_TOKENS) + entry.max_new_tokens
    tokens = max(entry.options.max_batch_size * per_job, entry.max_prompt_tokens + entry.max_new_tokens)
    cuda = loaded.device.type == "cuda"
    return ContinuousBatchingConfig(
        page_size=PAGE_TOKENS,
        num_blocks=-(-tokens // PAGE_TOKENS) + 1,
        max_batch_tokens=None if cuda else CPU_MAX_BATCH_TOKENS,
        max_requests_per_batch=entry.options.max_batch_size,
        allow_block_sharing=False,
        use_cuda_graph=None if cuda else False,
        auto_switch_to_flash=entry.options.attn_implementation is None,  # a configured attention is kept
    )


def _manager(loaded: LoadedModel) -> Any:
    """The model's manager: the one kept on the model by the previous batch, else a new one (warmed up on CUDA)."""
    from transformers import GenerationConfig

    model = loaded.model
    fresh = getattr(model, "_cached_continuous_batching_manager", None) is None
    config = GenerationConfig(
        max_new_tokens=loaded.entry.max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=loaded.pad_id,
        eos_token_id=sorted(loaded.eos_ids) or -1,
    )
    cb_config = manager_config(loaded)
    manager = model.init_continuous_batching(generation_config=config, continuous_batching_config=cb_config)
    if fresh and loaded.device.type == "cuda":
        with torch.inference_mode():
            manager.warmup()
    return manager


def drop_manager(loaded: LoadedModel) -> None:
    """Discard the model's kept manager and its paged cache (after a failed batch)."""
    destroy = getattr(loaded.model, "destroy_cached_continuous_batching_manager", None)
    if destroy is not None:
        destroy()


class _Batch:
    """The rows of one continuous batch and their bookkeeping (see the module docstring)."""

    def __init__(
        self,
        loaded: LoadedModel,
        rows: Sequence[Row],
        closing: threading.Event,
        gpu_uuid: str | None,
        late_joiners: Callable[[], bool] | None,
    ) -> None:
        self.loaded = loaded
        self.rows = rows
        self.closing = closing
        self.gpu_uuid = gpu_uuid
        self.late_joiners = late_joiners
        self.started = time.monotonic()
        self.last = self.started
        self.restart_steps = max(row.max_new for row in rows) // RESTART_FRACTION
        self.by_id: dict[str, Row] = {}
        self.first: dict[str, float] = {}
        self.windows: dict[str, int] = {}

    def active(self) -> list[tuple[str, Row]]:
        return [(rid, row) for rid, row in self.by_id.items() if not row.done]

    def charge(self) -> None:
        """Split the time since the last reading over the rows still running."""
        now = time.monotonic()
        active = self.active()
        for _, row in active:
            row.device_seconds += (now - self.last) / len(active)
        self.last = now

    def take(self, manager: Any, rid: str, tokens: list[int]) -> None:
        """Feed the tokens of request ``rid`` not seen yet through the shared per-token stopping."""
        row = self.by_id.get(rid)
        if row is None or row.done:
            return  # an earlier batch's request, or output produced after this row stopped
        self.first.setdefault(rid, time.monotonic())
        closing = self.closing.is_set()
        for token in tokens[len(row.tokens) :]:
            outcome = advance_row(self.loaded, row, token, closing, self.windows[rid])
            if outcome is None:
                continue
            if isinstance(outcome, JobError):
                row.done = True
                row.request.resolve(outcome)
            else:
                finish_row(self.loaded, row, outcome, self.gpu_uuid, self.started, self.first[rid], len(self.rows))
            manager.cancel_request(rid)  # a no-op when the manager finished it too
            return

    def check_stops(self, manager: Any) -> None:
        """Fail rows cancelled, past their deadline or shut down while no token of theirs arrived."""
        closing = self.closing.is_set()
        for rid, row in self.active():
            error = stop_error(row.request.job, closing)
            if error is not None:
                row.done = True
                message = f"{error.message} (stopped after {len(row.tokens)} of {row.max_new} tokens)"
                row.request.resolve(JobError(error.code, message))
                manager.cancel_request(rid)

    def wants_restart(self) -> bool:
        """Whether to stop for late joiners: asked while the longest row is in its first 1/RESTART_FRACTION."""
        steps = max(len(row.tokens) for row in self.rows)
        if self.late_joiners is None or steps > self.restart_steps or not self.active():
            return False
        return self.late_joiners()


def run_continuous(
    loaded: LoadedModel,
    rows: Sequence[Row],
    closing: threading.Event,
    gpu_uuid: str | None,
    late_joiners: Callable[[], bool] | None = None,
) -> bool:
    """Decode ``rows`` (greedy, see :func:`refusal`) with the model's continuous-batching manager.

    Same contract as :func:`runners.hf.batch.run_batch`: True means late joiners are waiting
    and the unfinished rows were stopped with ``done=False`` to run again with them. Raises
    the manager's fatal error (out-of-memory, device errors), after dropping the manager.
    """
    batch = _Batch(loaded, rows, closing, gpu_uuid, late_joiners)
    for row in rows:
        row.tokens.clear()
        row.device_seconds = 0.0
        row.generator = None
    with torch.inference_mode():  # the manager's thread runs in the inference mode of the thread that starts it
        manager = _manager(loaded)
        manager.start()
    restart = False
    try:
        for row in rows:
            rid = f"aitbc-{next(_ids)}"
            batch.by_id[rid] = row
            batch.windows[rid] = stop_window(row)
            added = manager.add_request(
                input_ids=list(row.ids),
                request_id=rid,
                max_new_tokens=row.max_new,
                streaming=True,
                eos_token_id=sorted(loaded.eos_ids) or -1,
            )
            if added is None:  # the manager is stopping or its thread died
                raise _failure(manager)
        while batch.active():
            output = manager.get_result(timeout=POLL_S)
            batch.charge()
            if output is not None and output.error is not None and output.request_id in batch.by_id:
                raise _failure(manager)
            if output is not None:
                batch.take(manager, output.request_id, list(output.generated_tokens))
            batch.check_stops(manager)
            if output is not None and batch.wants_restart():
                restart = True
                for rid, _ in batch.active():
                    manager.cancel_request(rid)  # the rows stay done=False for the caller's rerun
                break
            if output is None and not manager.is_running() and batch.active():
                raise _failure(manager)
    except BaseException:
        manager.stop(block=True, hard_stop=True)
        drop_manager(loaded)
        raise
    manager.stop(block=True, keep_for_next_session=True)
    _drain(manager)
    if restart:
        return True
    for rid, row in batch.by_id.items():  # finished by the manager's own length limit without a token for us
        if not row.done:
            finish_row(loaded, row, "length", gpu_uuid, batch.started, batch.first.get(rid), len(rows))
    return False


def _failure(manager: Any) -> BaseException:
    """The error that failed a request: the generation thread's fatal error (recorded just after it fails them)."""
    give_up = time.monotonic() + FAILURE_WAIT_S
    while manager.background_thread_status.fatal_error is None and manager.is_running() and time.monotonic() < give_up:
        time.sleep(POLL_S)  # on the runner's worker thread, never the event loop; the library offers nothing to wait on
    fatal = manager.background_thread_status.fatal_error
    return fatal if fatal is not None else RuntimeError("continuous batching failed a request of this batch")


def _drain(manager: Any) -> None:
    """Drop outputs left in the queue (streamed after a row stopped), so the next batch starts clean."""
    while manager.get_result(timeout=0) is not None:
        pass
