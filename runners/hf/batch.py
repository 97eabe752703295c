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
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from miner.wire.errors import JobError
from runners.base import Job, RunResult, stop_error
from runners.hf.model import LoadedModel
from runners.params import GenerationParams, apply_stop

# A batch may restart to take in jobs that arrive during its first 1/RESTART_FRACTION.
RESTART_FRACTION = 8


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
        # Tokens to decode when looking for a stop string: enough for its bytes, one per token.
        self.windows = [4 * max((len(s) for s in row.params.stop), default=0) + 8 for row in rows]

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
            token = last[i]
            if token in self.loaded.eos_ids:
                self.finish(row, "stop")
                continue
            row.tokens.append(token)
            error = stop_error(row.request.job, closing)
            if error is not None:
                self.fail(
                    row,
                    JobError(error.code, f"{error.message} (stopped after {len(row.tokens)} of {row.max_new} tokens)"),
                )
            elif row.params.stop and self._stop_seen(row, self.windows[i]):
                self.finish(row, "stop")
            elif len(row.tokens) >= row.max_new:
                self.finish(row, "length")
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

    def _stop_seen(self, row: Row, window: int) -> bool:
        tail = self.loaded.tokenizer.decode(row.tokens[-window:], skip_special_tokens=True)
        return any(s in tail for s in row.params.stop)

    def fail(self, row: Row, error: BaseException) -> None:
        row.done = True
        row.request.resolve(error)

    def finish(self, row: Row, reason: str) -> None:
        row.done = True
        now = time.monotonic()
        text = self.loaded.tokenizer.decode(row.tokens, skip_special_tokens=True)
        text, stopped = apply_stop(text, row.params.stop)
        if stopped:
            reason = "stop"
        first = self.first_token_at or now
        elapsed = max(now - self.started, 1e-9)
        entry = self.loaded.entry
        row.request.resolve(
            RunResult(
                output=text,
                finish_reason=reason,
                prompt_tokens=len(row.ids),
                completion_tokens=len(row.tokens),
                ttft_ms=round((first - row.request.enqueued) * 1000, 3),
                model_revision=entry.revision,
                device=entry.plan.key if entry.plan.key != "auto" else str(self.loaded.device),
                gpu_uuid=self.gpu_uuid,
                gpu_seconds=round(row.device_seconds, 6),
                extra={"tokens_per_s": round(len(row.tokens) / elapsed, 2), "batch_size": len(self.rows)},
            )
        )


def generation_config(loaded: LoadedModel, params: GenerationParams, max_new: int) -> GenerationConfig:
    """Every decoding setting spelled out, so the checkpoint's generation defaults never apply."""
    return GenerationConfig(
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


def run_batch(
    loaded: LoadedModel,
    rows: Sequence[Row],
    closing: threading.Event,
    gpu_uuid: str | None,
    late_joiners: Callable[[], bool] | None = None,
) -> bool:
    """Generate for ``rows`` (same model, same sampling key) and resolve every row's future.

    ``late_joiners()`` is asked after each of the first steps (the first 1/``RESTART_FRACTION``
    of the longest row): when it says compatible jobs are now waiting, generation stops and
    this returns True, leaving the unfinished rows ``done=False`` for the caller to run again
    together with the newcomers (greedy and seeded rows give the same output on the rerun).
    Raises what ``generate`` raises (out-of-memory, device errors); rows already finished
    keep their results, the others stay ``done=False`` for the caller to retry or fail.
    """
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
    with torch.inference_mode():
        loaded.model.generate(
            input_ids=input_ids.to(loaded.device),
            attention_mask=mask.to(loaded.device),
            generation_config=generation_config(loaded, params, max(row.max_new for row in rows)),
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
