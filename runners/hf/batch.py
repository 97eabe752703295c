"""One batched ``generate`` call: left padding, per-row stopping, per-row results.

Each job in a batch is a :class:`Row`. A :class:`BatchControl` stopping criterion runs
after every decoding step: it records the first-token time, splits the step's wall time
over the rows still running, and finishes a row as soon as it hits EOS, a stop string,
its own ``max_new_tokens``, a cancel or its deadline. A finished row's future is resolved
right away (the daemon gets its result without waiting for the rest of the batch) and
generate stops once every row is finished. Sampling happens in :class:`RowSampler` with a
``torch.Generator`` per row, so a seeded job draws the same numbers alone or in a batch.

``gpu_seconds`` of a result is the job's share of the batch's wall time: each step's
time divided equally among the rows still running at that step (the shares of a batch
sum to its wall time).

:func:`run_batch` decodes in the model's decode mode (:mod:`runners.hf.decode`): ``eager``
(a dynamic KV cache), ``static`` (a static one, compiled on CUDA) or ``continuous``
(:mod:`runners.hf.continuous`). Per-token stopping (:func:`advance_row`) and result
building (:func:`finish_row`) are shared by all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from miner.wire.errors import JobError
from runners.base import Job, RunResult, stop_error
from runners.hf.model import LoadedModel
from runners.params import GenerationParams, apply_stop

log = structlog.get_logger("runners.transformers")

# A batch may restart to take in jobs that arrive during its first 1/RESTART_FRACTION.
RESTART_FRACTION = 8
STATIC_CACHE_STEP = 256  # a static KV cache's length is a multiple of this many tokens


@dataclass(eq=False)
class Request:
    """A job waiting for (or in) a batch, with the future its ``run()`` awaits."""

    job: Job
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    _state: str = "queued"  # queued -> taken | abandoned
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def queued(self) -> bool:
        return self._state == "queued"

    def take(self) -> bool:
        """Claim the request for a batch; False when ``run()`` already gave up on it."""
        with self._lock:
            if self._state != "queued":
                return False
            self._state = "taken"
            return True

    def abandon(self) -> bool:
        """Withdraw a request no batch has taken yet (cancel/deadline while queued)."""
        with self._lock:
            if self._state != "queued":
                return False
            self._state = "abandoned"
            return True

    def resolve(self, value: RunResult | BaseException) -> None:
        """Settle the future from any thread."""
        settle_threadsafe(self.loop, self.future, value)


def settle_threadsafe(loop: asyncio.AbstractEventLoop, future: asyncio.Future, value: Any) -> None:
    """Set a result (or an exception) on ``future`` from a worker thread."""
    with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is waiting any more
        loop.call_soon_threadsafe(_settle, future, value)


def _settle(future: asyncio.Future, value: Any) -> None:
    if future.done():
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)


@dataclass(eq=False)
class Row:
    """One job's place in a batch."""

    request: Request
    ids: list[int]
    max_new: int
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    device_seconds: float = 0.0

    @property
    def params(self) -> GenerationParams:
        return self.request.job.request.params


class RowSampler(LogitsProcessor):
    """Samples each row with its own generator and returns scores whose argmax is the draw."""

    def __init__(self, rows: Sequence[Row], params: GenerationParams) -> None:
        self.rows = rows
        self.warpers: list[Any] = [TemperatureLogitsWarper(float(params.temperature or 1.0))]
        if params.top_k:
            self.warpers.append(TopKLogitsWarper(top_k=params.top_k))
        if params.top_p is not None and params.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=params.top_p))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        probs = torch.softmax(scores, dim=-1)
        picks = [torch.multinomial(probs[i], 1, generator=row.generator) for i, row in enumerate(self.rows)]
        chosen = torch.stack(picks)  # (batch, 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen, 0.0)


class BatchControl(StoppingCriteria):
    """Per-step bookkeeping and per-row stopping (see the module docstring)."""

    def __init__(
        self,
        loaded: LoadedModel,
        rows: Sequence[Row],
        closing: threading.Event,
        gpu_uuid: str | None,
        late_joiners: Callable[[], bool] | None = None,
    ) -> None:
        self.loaded = loaded
        self.rows = rows
        self.closing = closing
        self.gpu_uuid = gpu_uuid
        self.late_joiners = late_joiners
        self.restart = False
        self.steps = 0
        self.restart_steps = max(row.max_new for row in rows) // RESTART_FRACTION
        self.started = time.monotonic()
        self.last = self.started
        self.first_token_at: float | None = None
        self.windows = [stop_window(row) for row in rows]

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        last = input_ids[:, -1].tolist()
        now = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = now
        active = [row for row in self.rows if not row.done]
        for row in active:
            row.device_seconds += (now - self.last) / len(active)
        self.last = now
        closing = self.closing.is_set()
        for i, row in enumerate(self.rows):
            if row.done:
                continue
            outcome = advance_row(self.loaded, row, last[i], closing, self.windows[i])
            if isinstance(outcome, JobError):
                self.fail(row, outcome)
            elif outcome is not None:
                self.finish(row, outcome)
        self.steps += 1
        if (
            self.late_joiners is not None
            and self.steps <= self.restart_steps
            and not all(r.done for r in self.rows)
            and self.late_joiners()
        ):
            self.restart = True  # stop here; the caller reruns the unfinished rows with the newcomers
            return torch.ones(len(self.rows), dtype=torch.bool, device=input_ids.device)
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)

    def fail(self, row: Row, error: BaseException) -> None:
        row.done = True
        row.request.resolve(error)

    def finish(self, row: Row, reason: str) -> None:
        finish_row(self.loaded, row, reason, self.gpu_uuid, self.started, self.first_token_at, len(self.rows))


def stop_window(row: Row) -> int:
    """Tokens to decode when looking for a stop string: enough for its bytes, one per token."""
    return 4 * max((len(s) for s in row.params.stop), default=0) + 8


def advance_row(loaded: LoadedModel, row: Row, token: int, closing: bool, window: int) -> str | JobError | None:
    """Take one decoded ``token`` for an unfinished ``row``: its finish reason, its error, or None to go on.

    EOS finishes with ``stop`` (and is not kept); any other token is appended, then a cancel,
    a deadline or shutdown gives a JobError, a stop string ``stop`` and the row's
    ``max_new_tokens`` ``length``. Shared by every decode mode, so they stop rows alike.
    """
    if token in loaded.eos_ids:
        return "stop"
    row.tokens.append(token)
    error = stop_error(row.request.job, closing)
    if error is not None:
        return JobError(error.code, f"{error.message} (stopped after {len(row.tokens)} of {row.max_new} tokens)")
    if row.params.stop:
        tail = loaded.tokenizer.decode(row.tokens[-window:], skip_special_tokens=True)
        if any(s in tail for s in row.params.stop):
            return "stop"
    if len(row.tokens) >= row.max_new:
        return "length"
    return None


def finish_row(
    loaded: LoadedModel,
    row: Row,
    reason: str,
    gpu_uuid: str | None,
    started: float,
    first_token_at: float | None,
    batch_size: int,
) -> None:
    """Mark ``row`` done and resolve its future with its :class:`RunResult` (every decode mode builds it here).

    ``started`` is when its batch began, ``first_token_at`` when its first token was seen
    (None: now); the text is cut at the first stop string.
    """
    row.done = True
    now = time.monotonic()
    text = loaded.tokenizer.decode(row.tokens, skip_special_tokens=True)
    text, stopped = apply_stop(text, row.params.stop)
    if stopped:
        reason = "stop"
    first = first_token_at or now
    elapsed = max(now - started, 1e-9)
    entry = loaded.entry
    row.request.resolve(
        RunResult(
            output=text,
            finish_reason=reason,
            prompt_tokens=len(row.ids),
            completion_tokens=len(row.tokens),
            ttft_ms=round((first - row.request.enqueued) * 1000, 3),
            model_revision=entry.revision,
            device=entry.plan.key if entry.plan.key != "auto" else str(loaded.device),
            gpu_uuid=gpu_uuid,
            gpu_seconds=round(row.device_seconds, 6),
            extra={"tokens_per_s": round(len(row.tokens) / elapsed, 2), "batch_size": batch_size},
        )
    )


def generation_config(
    loaded: LoadedModel, params: GenerationParams, max_new: int, mode: str = "eager", width: int = 0
) -> GenerationConfig:
    """Every decoding setting spelled out, so the checkpoint's generation defaults never apply.

    ``mode="static"`` adds a static KV cache sized for ``width`` prompt tokens plus
    ``max_new`` (rounded up to :data:`STATIC_CACHE_STEP`, so similar batches reuse one
    compiled graph); transformers compiles the forward (CUDA graphs) on CUDA only, and
    compiling is switched off elsewhere.
    """
    config = GenerationConfig(
        max_new_tokens=max_new,
        do_sample=False,  # RowSampler samples; generate takes its argmax
        num_beams=1,
        repetition_penalty=params.repetition_penalty or 1.0,
        no_repeat_ngram_size=0,
        min_length=0,
        pad_token_id=loaded.pad_id,
        eos_token_id=sorted(loaded.eos_ids) or None,
        use_cache=True,
    )
    if mode == "static":
        config.cache_implementation = "static"
        config.max_cache_len = -(-(width + max_new) // STATIC_CACHE_STEP) * STATIC_CACHE_STEP
        config.disable_compile = loaded.device.type != "cuda"
    return config


def run_batch(
    loaded: LoadedModel,
    rows: Sequence[Row],
    closing: threading.Event,
    gpu_uuid: str | None,
    late_joiners: Callable[[], bool] | None = None,
    mode: str | None = None,
) -> bool:
    """Generate for ``rows`` (same model, same sampling key) and resolve every row's future.

    Decodes in ``mode`` (default ``loaded.decode_mode``): ``eager`` and ``static`` run one
    ``generate`` here (``static``: see :func:`generation_config`); ``continuous`` runs
    :func:`runners.hf.continuous.run_continuous`, except for a batch it refuses
    (:func:`runners.hf.continuous.refusal`: sampled or repetition-penalised jobs), which
    runs eager. Every mode gives the same output, stops rows alike and splits time alike.

    ``late_joiners()`` is asked after each of the first steps (the first 1/``RESTART_FRACTION``
    of the longest row): when it says compatible jobs are now waiting, generation stops and
    this returns True, leaving the unfinished rows ``done=False`` for the caller to run again
    together with the newcomers (greedy and seeded rows give the same output on the rerun).
    Raises what ``generate`` raises (out-of-memory, device errors); rows already finished
    keep their results, the others stay ``done=False`` for the caller to retry or fail.
    """
    mode = mode or loaded.decode_mode
    if mode == "continuous":
        from runners.hf.continuous import refusal, run_continuous  # it imports this module

        reason = refusal(rows[0].params)
        if reason is None:
            return run_continuous(loaded, rows, closing, gpu_uuid, late_joiners)
        log.debug("decode_mode_fallback", model=loaded.name, mode=mode, used="eager", reason=reason)
        mode = "eager"
    width = max(len(row.ids) for row in rows)
    input_ids = torch.full((len(rows), width), loaded.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row.ids) :] = torch.tensor(row.ids, dtype=torch.long)
        mask[i, width - len(row.ids) :] = 1
        row.tokens.clear()
        row.device_seconds = 0.0
        row.generator = make_generator(row.params, loaded.device)  # fresh, also on a retry
    params = rows[0].params
    control = BatchControl(loaded, rows, closing, gpu_uuid, late_joiners)
    processors = LogitsProcessorList([RowSampler(rows, params)] if not params.greedy else [])
    max_new = max(row.max_new for row in rows)
    with torch.inference_mode():
        loaded.model.generate(
            input_ids=input_ids.to(loaded.device),
            attention_mask=mask.to(loaded.device),
            generation_config=generation_config(loaded, params, max_new, mode, width),
            logits_processor=processors,
            stopping_criteria=StoppingCriteriaList([control]),
        )
    if control.restart:
        return True
    for row in rows:  # generate can stop on its own length limit in the same step as ours
        if not row.done:
            control.finish(row, "length")
    return False


def make_generator(params: GenerationParams, device: torch.device) -> torch.Generator | None:
    """A row's sampling generator: seeded from the job's ``seed``, else from fresh entropy."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()
    return generator
