"""Helpers for the transformers runner tests: model specs, jobs and a started runner."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from runners.base import Job, ModelSpec, RunnerContext
from runners.params import parse_text_payload


def spec(name: str, path: Path | str, **options: Any) -> ModelSpec:
    return ModelSpec(name=name, runner="transformers", path=str(path), **options)


def job(
    model: str,
    prompt: str | None = None,
    *,
    messages: list[dict[str, str]] | None = None,
    deadline: float | None = None,
    **params: Any,
) -> Job:
    payload: dict[str, Any] = {"model": model, "parameters": params}
    if messages is not None:
        payload["messages"] = messages
    else:
        payload["prompt"] = prompt
    return Job(job_id="job-" + model, request=parse_text_payload(payload), deadline=deadline)


@asynccontextmanager
async def running(*specs: ModelSpec, context: RunnerContext | None = None) -> AsyncIterator[Any]:
    """A started TransformersRunner for ``specs``, closed on exit."""
    from runners.transformers import TransformersRunner

    runner = TransformersRunner(list(specs), context or RunnerContext())
    await runner.start()
    try:
        yield runner
    finally:
        await runner.aclose()
