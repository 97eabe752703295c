"""An example third-party runner for aitbc-miner: it answers a job with its own input.

It shows everything a plugin needs and nothing more: options validated at start, a
``run`` that watches the job's cancel flag and deadline, honest ``ready_models`` and
close. Options in a ``[[models]]`` table with ``runner = "echo"``:

``mode``            ``echo`` (default) returns the input, ``reverse`` returns it reversed
``delay_s``         seconds each job takes (default 0), to watch cancellation work
``max_new_tokens``  the default and the cap for a job's ``max_new_tokens``, counted in words
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from runners.api import ErrorCode, Job, JobError, ModelSpec, RunnerContext, RunResult, apply_stop, parse_options

__version__ = "0.1.0"


class EchoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["echo", "reverse"] = "echo"
    delay_s: float = Field(0.0, ge=0, le=3600)
    max_new_tokens: int = Field(256, ge=1, le=100_000)


class EchoRunner:
    """Answers each job with its prompt (or last chat message), echoed or reversed."""

    name: ClassVar[str] = "echo"

    def __init__(self, specs: Sequence[ModelSpec], context: RunnerContext) -> None:
        self._specs = list(specs)  # no I/O here: the daemon may construct runners it never starts
        self._options: dict[str, EchoOptions] = {}
        self._closed = False

    async def start(self) -> None:
        # A bad option raises ConfigError naming models[name=...].<option>.
        self._options = {spec.name: parse_options(EchoOptions, spec) for spec in self._specs}

    def ready_models(self) -> list[str]:
        return [] if self._closed else list(self._options)

    async def run(self, job: Job) -> RunResult:
        options = self._options.get(job.model)
        if options is None:
            raise JobError(ErrorCode.MODEL_NOT_SERVED, f"model {job.model!r} is not served by the echo runner")
        started = time.monotonic()
        await self._wait(job, options.delay_s)
        request = job.request
        text = request.prompt if request.prompt is not None else (request.messages or ({"content": ""},))[-1]["content"]
        if options.mode == "reverse":
            text = text[::-1]
        words = text.split()
        limit = min(request.params.max_new_tokens or options.max_new_tokens, options.max_new_tokens)
        output, stopped = apply_stop(" ".join(words[:limit]), request.params.stop)
        return RunResult(
            output=output,
            finish_reason="stop" if stopped or len(words) <= limit else "length",
            prompt_tokens=len(words),
            completion_tokens=len(output.split()),
            ttft_ms=0.0,
            model_revision=f"echo-{__version__}-{options.mode}",
            device="cpu",
            gpu_seconds=time.monotonic() - started,
        )

    @staticmethod
    async def _wait(job: Job, seconds: float) -> None:
        """Sleep without blocking the event loop, stopping early on cancel or deadline."""
        end = time.monotonic() + seconds
        while True:
            job.raise_if_stopped()  # CANCELLED or DEADLINE_EXCEEDED
            left = end - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 0.02))

    async def aclose(self) -> None:
        self._closed = True
