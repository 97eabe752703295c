"""A test runner plugin whose answer is poisoned on request: the job's prompt names the poison.

``ok``            a proper :class:`RunResult`
``set-in-extra``  a set inside ``RunResult.extra``
``nan-in-extra``  a NaN inside ``RunResult.extra``
``bytes-output``  bytes as ``output``
``none``          ``None`` instead of a ``RunResult``
``huge-output``   an output of 4 MB (over the default 1 MiB result limit)
``str-raises``    an output object whose ``str()`` and ``repr()`` raise

Any other prompt is failed with ``INVALID_PARAMETERS``. Option ``delay_s`` (default 0)
makes each job take that long, so jobs can be queued behind a running one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from runners.api import ErrorCode, Job, JobError, ModelSpec, RunnerContext, RunResult, parse_options

HUGE_OUTPUT_BYTES = 4 << 20


class PoisonOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    delay_s: float = Field(0.0, ge=0, le=60)


class StrRaises:
    """An object that cannot be printed: ``str``, ``repr`` and ``format`` raise."""

    def __str__(self) -> str:
        raise RuntimeError("StrRaises.__str__ was called")

    def __repr__(self) -> str:
        raise RuntimeError("StrRaises.__repr__ was called")

    def __format__(self, spec: str) -> str:
        raise RuntimeError("StrRaises.__format__ was called")


def _ok(**fields: Any) -> RunResult:
    return RunResult(**{"output": "fine", "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1,
                        "model_revision": "poison-0.1.0", **fields})  # fmt: skip


POISONS: dict[str, Callable[[], Any]] = {
    "ok": _ok,
    "set-in-extra": lambda: _ok(extra={"tags": {"a", "b"}}),
    "nan-in-extra": lambda: _ok(extra={"score": float("nan")}),
    "bytes-output": lambda: _ok(output=b"fine"),
    "none": lambda: None,
    "huge-output": lambda: _ok(output="x" * HUGE_OUTPUT_BYTES),
    "str-raises": lambda: _ok(output=StrRaises()),
}


class PoisonRunner:
    """Answers each job with the poison its prompt names (see the module docstring)."""

    name: ClassVar[str] = "poison"

    def __init__(self, specs: Sequence[ModelSpec], context: RunnerContext) -> None:
        self._specs = list(specs)
        self._options: dict[str, PoisonOptions] = {}
        self._closed = False

    async def start(self) -> None:
        self._options = {spec.name: parse_options(PoisonOptions, spec) for spec in self._specs}

    def ready_models(self) -> list[str]:
        return [] if self._closed else list(self._options)

    async def run(self, job: Job) -> RunResult:
        options = self._options.get(job.model)
        if options is None:
            raise JobError(ErrorCode.MODEL_NOT_SERVED, "this model is not served by the poison runner")
        poison = POISONS.get((job.request.prompt or "").strip())
        if poison is None:
            raise JobError(ErrorCode.INVALID_PARAMETERS, f"the prompt must name a poison: {', '.join(POISONS)}")
        loop = asyncio.get_running_loop()
        end = loop.time() + options.delay_s
        while loop.time() < end:
            job.raise_if_stopped()
            await asyncio.sleep(min(0.02, end - loop.time()))
        return poison()  # type: ignore[no-any-return]  # poisoned on purpose

    async def aclose(self) -> None:
        self._closed = True
