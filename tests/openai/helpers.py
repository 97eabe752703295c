"""Small builders shared by the openai runner tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from runners.base import Job, ModelSpec, RunnerContext
from runners.openai import OpenAIRunner
from runners.params import parse_text_payload


def make_runner(base_url: str, *, name: str = "llama2", served_model: str = "tiny-llama", **options: Any) -> OpenAIRunner:
    spec = ModelSpec(name=name, runner="openai", base_url=base_url, served_model=served_model, **options)
    return OpenAIRunner([spec], RunnerContext())


def make_job(
    prompt: str | None = "The miner claims a job",
    *,
    messages: list[dict[str, str]] | None = None,
    model: str = "llama2",
    deadline_in: float | None = None,
    **params: Any,
) -> Job:
    payload: dict[str, Any] = {"model": model, "parameters": params}
    if messages is not None:
        payload["messages"] = messages
    else:
        payload["prompt"] = prompt
    deadline = None if deadline_in is None else time.monotonic() + deadline_in
    return Job(job_id="job-1", request=parse_text_payload(payload), deadline=deadline)


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; return its last value."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.02)
    return True
