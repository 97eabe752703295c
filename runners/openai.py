"""The ``openai`` runner: forwards jobs to an OpenAI-compatible serving engine.

For GPU owners who already run vLLM, text-generation-inference, llama.cpp's server or
Ollama: the miner feeds that engine instead of loading a second copy of the model. A job
with ``messages`` goes to ``/chat/completions``, one with a ``prompt`` to ``/completions``.
Options in a ``[[models]]`` table with ``runner = "openai"``:

``base_url``            the engine's OpenAI API root, e.g. ``http://127.0.0.1:8000/v1`` (required)
``served_model``        the engine's name for this model (default: the job-facing ``name``)
``api_key_file``        a file holding the engine's API key, read at start, sent as a bearer token
``max_new_tokens``      the default and the cap for a job's ``max_new_tokens`` (default 512)
``timeout_s``           the longest one job may take at the engine (default 600)
``connect_timeout_s``   how long to wait for a connection (default 5)
``stream``              ``true`` | ``false`` | ``"auto"`` (default): stream the answer, so a
                        cancelled job closes the stream and the engine stops generating
``recheck_interval_s``  how often the engine's model list is re-read (default 30)
``check_models``        advertise only models ``GET /models`` lists (default true); false for
                        an engine without a model list: advertised while the engine answers
``param_names``         rename or drop job parameters the engine spells differently, e.g.
                        ``{ repetition_penalty = "repeat_penalty" }``; ``""`` drops one
``extra_body``          fixed fields merged into every request body (job parameters win)
``max_concurrent``      jobs of this model sent to the engine at once (default 16): engines
                        batch continuously, so claiming keeps this many in flight while the
                        engine serves the model (the miner's ``concurrency`` caps the total)

The miner advertises a model only while its engine is reachable and lists it; a
background task re-checks every ``recheck_interval_s``, so an engine restart is followed
rather than fatal. Engine failures become job error codes (see :mod:`runners.openai_wire`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import httpx
import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator

from miner.wire.errors import ErrorCode, JobError
from miner.wire.net import check_http_url
from miner.wire.secretfile import read_secret_file
from runners.base import Job, ModelSpec, RunnerContext, RunResult, parse_options
from runners.openai_engine import EngineState
from runners.openai_wire import (
    RENAMEABLE_PARAMS,
    Generation,
    build_body,
    engine_error,
    finish_reason,
    fold_chunk,
    iter_sse_data,
    parse_answer,
    request_inputs,
    transport_error,
)
from runners.params import apply_stop

log = structlog.get_logger("runners.openai")

_WATCH_INTERVAL_S = 0.02  # how often a running job's cancel flag and deadline are looked at
_CHECK_TIMEOUT_S = 10.0


class OpenAIOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_url: str
    served_model: str | None = Field(None, min_length=1)
    api_key_file: Path | None = None
    max_new_tokens: int = Field(512, ge=1, le=1_000_000)
    timeout_s: float = Field(600.0, gt=0, le=86_400)
    connect_timeout_s: float = Field(5.0, gt=0, le=300)
    stream: bool | Literal["auto"] = "auto"
    recheck_interval_s: float = Field(30.0, gt=0, le=3600)
    check_models: bool = True
    param_names: dict[str, str] = Field(default_factory=dict)
    extra_body: dict[str, Any] = Field(default_factory=dict)
    max_concurrent: int = Field(16, ge=1, le=1024)

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        try:
            check_http_url(value, "http://127.0.0.1:8000/v1", plain=True)
        except ValueError as exc:
            raise ValueError(f"{exc}; put the engine's API key in api_key_file") from None
        return value.rstrip("/")

    @field_validator("param_names")
    @classmethod
    def _check_param_names(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - RENAMEABLE_PARAMS)
        if unknown:
            raise ValueError(f"cannot rename {unknown}; renameable: {sorted(RENAMEABLE_PARAMS)}")
        return value


@dataclass
class _Served:
    name: str
    options: OpenAIOptions
    engine: EngineState

    @property
    def served_model(self) -> str:
        return self.options.served_model or self.name

    def unready_reason(self) -> str | None:
        return self.engine.unready_reason(self.served_model)


async def _watch_stop(job: Job, give_up_at: float) -> str:
    """Return why a running job must stop: ``cancelled``, ``deadline`` or ``timeout``."""
    while True:
        if job.cancel_event.is_set():
            return "cancelled"
        now = time.monotonic()
        if job.deadline is not None and now >= job.deadline:
            return "deadline"
        if now >= give_up_at:
            return "timeout"
        limit = give_up_at if job.deadline is None else min(give_up_at, job.deadline)
        await asyncio.sleep(min(_WATCH_INTERVAL_S, limit - now))


class OpenAIRunner:
    """Runs jobs on OpenAI-compatible engines over one shared ``httpx.AsyncClient``.

    ``ready_models()`` names only the configured models whose engine answers and lists
    them; ``run()`` streams where it can, so cancelling a job (or passing its deadline)
    closes the connection and the engine stops generating.
    """

    name: ClassVar[str] = "openai"

    def __init__(self, specs: Sequence[ModelSpec], context: RunnerContext) -> None:
        self._specs = list(specs)
        self._context = context
        self._served: dict[str, _Served] = {}
        self._engines: list[EngineState] = []
        self._client: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        engines: dict[tuple[str, Path | None, bool], EngineState] = {}
        for spec in self._specs:
            options = parse_options(OpenAIOptions, spec)
            engine_key = (options.base_url, options.api_key_file, options.check_models)
            engine = engines.get(engine_key)
            if engine is None:
                api_key = None
                if options.api_key_file is not None:
                    setting = f"models[name={spec.name!r}].api_key_file"
                    api_key = read_secret_file(options.api_key_file, setting, "the engine's API key")
                engine = engines[engine_key] = EngineState(
                    options.base_url,
                    api_key,
                    check_models=options.check_models,
                    recheck_interval_s=options.recheck_interval_s,
                )
            engine.recheck_interval_s = min(engine.recheck_interval_s, options.recheck_interval_s)
            served = self._served[spec.name] = _Served(spec.name, options, engine)
            engine.served[spec.name] = served.served_model
        self._engines = list(engines.values())
        client = self._client = httpx.AsyncClient(timeout=httpx.Timeout(_CHECK_TIMEOUT_S), follow_redirects=False)
        log.info("engines_checking", engines=[e.base_url for e in self._engines], timeout_s=_CHECK_TIMEOUT_S)
        await asyncio.gather(*(engine.check(client) for engine in self._engines))
        self._tasks = [
            asyncio.create_task(engine.recheck_forever(client), name=f"openai-recheck {engine.base_url}")
            for engine in self._engines
        ]

    def ready_models(self) -> list[str]:
        if self._client is None:
            return []
        return [name for name, served in self._served.items() if served.unready_reason() is None]

    def capacity(self) -> int:
        """Jobs the engines can take now: ``max_concurrent`` of each model they serve."""
        ready = set(self.ready_models())
        return sum(s.options.max_concurrent for name, s in self._served.items() if name in ready)

    def max_capacity(self) -> int:
        return sum(s.options.max_concurrent for s in self._served.values())

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # -- running a job ----------------------------------------------------------------

    async def run(self, job: Job) -> RunResult:
        served = self._served.get(job.model)
        if served is None:
            raise JobError(ErrorCode.MODEL_NOT_SERVED, f"model {job.model!r} is not served by the openai runner")
        if self._client is None:
            raise JobError(ErrorCode.RUNNER_ERROR, "the openai runner is not started (or already closed)")
        job.raise_if_stopped()
        options = served.options
        asked = job.request.params.max_new_tokens
        max_tokens = min(asked or options.max_new_tokens, options.max_new_tokens)
        started = time.monotonic()
        gen, streamed = await self._guard(
            job, self._exchange(served, job, max_tokens), started + options.timeout_s, options
        )
        return self._result(served, job, gen, streamed, started)

    async def _guard(
        self,
        job: Job,
        work_coro: Coroutine[Any, Any, tuple[Generation, bool]],
        give_up_at: float,
        options: OpenAIOptions,
    ) -> tuple[Generation, bool]:
        """Run the exchange until it ends or the job must stop; stopping closes the stream."""
        work = asyncio.ensure_future(work_coro)
        watch = asyncio.ensure_future(_watch_stop(job, give_up_at))
        try:
            await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            pending = [task for task in (work, watch) if not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if work.done() and not work.cancelled():
            return work.result()
        reason = watch.result()
        if reason == "cancelled":
            raise JobError(ErrorCode.CANCELLED, "the job was cancelled; the engine stream was closed")
        if reason == "deadline":
            raise JobError(
                ErrorCode.DEADLINE_EXCEEDED, "the job passed its deadline (TTL) while the engine was generating"
            )
        raise JobError(
            ErrorCode.BACKEND_UNAVAILABLE,
            f"the engine at {options.base_url} did not finish within timeout_s={options.timeout_s:g} s",
        )

    async def _exchange(self, served: _Served, job: Job, max_tokens: int) -> tuple[Generation, bool]:
        """One request to the engine; returns what it generated and whether it streamed."""
        assert self._client is not None
        options, engine = served.options, served.engine
        stream = options.stream is not False
        chat = job.request.messages is not None
        path, body = build_body(
            job.request,
            served.served_model,
            max_tokens,
            stream=stream,
            include_usage=engine.usage_in_stream,
            param_names=options.param_names,
            extra_body=options.extra_body,
        )
        timeout = httpx.Timeout(options.timeout_s, connect=options.connect_timeout_s, pool=options.timeout_s)
        url = engine.base_url + path
        answered = retry = False
        try:
            if not stream:
                response = await self._client.post(url, json=body, headers=engine.headers(), timeout=timeout)
                answered = True
                if response.status_code >= 300:  # redirects are not followed
                    raise self._refused(served, job, response.status_code, response.content)
                return parse_answer(_json(response), chat=chat), False
            async with self._client.stream(
                "POST", url, json=body, headers=engine.headers(), timeout=timeout
            ) as response:
                answered = True
                if response.status_code >= 300:  # redirects are not followed
                    content = await response.aread()
                    if "stream_options" in body and self._refuses_stream_options(served, response.status_code, content):
                        retry = True
                    else:
                        raise self._refused(served, job, response.status_code, content)
                elif "text/event-stream" not in response.headers.get("content-type", ""):
                    await response.aread()  # the engine answered without streaming
                    return parse_answer(_json(response), chat=chat), False
                else:
                    return await self._read_stream(response, job, chat, engine.base_url), True
        except httpx.HTTPError as exc:
            if isinstance(exc, httpx.ConnectError):
                engine.mark_unreachable(type(exc).__name__)
            raise transport_error(exc, base_url=engine.base_url, mid_stream=answered) from exc
        if not retry:  # every other path above returns or raises
            raise JobError(ErrorCode.RUNNER_ERROR, "the openai runner reached an unexpected state")
        return await self._exchange(served, job, max_tokens)

    @staticmethod
    async def _read_stream(response: httpx.Response, job: Job, chat: bool, base_url: str) -> Generation:
        gen, inputs = Generation(), request_inputs(job.request)
        async for payload in iter_sse_data(response):
            fold_chunk(gen, payload, chat=chat, inputs=inputs)
            if gen.done:
                break
            job.raise_if_stopped()
        if not gen.done and gen.finish_reason is None:
            raise JobError(
                ErrorCode.BACKEND_UNAVAILABLE,
                f"the engine at {base_url} ended the stream before the generation finished",
            )
        return gen

    @staticmethod
    def _refuses_stream_options(served: _Served, status: int, content: bytes) -> bool:
        """Whether the engine refused ``stream_options``; if so it is not sent to that engine again."""
        engine = served.engine
        if status not in (400, 422) or b"stream_options" not in content:
            return False
        if engine.usage_in_stream:
            engine.usage_in_stream = False
            log.info("engine_stream_options_refused", base_url=engine.base_url, fallback="counting streamed chunks")
        return True

    @staticmethod
    def _refused(served: _Served, job: Job, status: int, content: bytes) -> JobError:
        error = engine_error(
            status,
            content,
            base_url=served.engine.base_url,
            served_model=served.served_model,
            inputs=request_inputs(job.request),
        )
        if error.code == ErrorCode.MODEL_NOT_SERVED:
            served.engine.forget(served.served_model)
        return error

    def _result(self, served: _Served, job: Job, gen: Generation, streamed: bool, started: float) -> RunResult:
        params = job.request.params
        text, cut = apply_stop(gen.text, params.stop)
        completion_tokens = gen.completion_tokens
        if completion_tokens is None and streamed:
            completion_tokens = gen.text_chunks  # engines send about one token per chunk
        engine_model = gen.engine_model or served.served_model
        owner = served.engine.owner_of(served.served_model)
        revision = engine_model if not owner or owner == engine_model else f"{engine_model}@{owner}"
        extra: dict[str, Any] = {"served_model": served.served_model, "streamed": streamed}
        if gen.system_fingerprint:
            extra["system_fingerprint"] = gen.system_fingerprint
        ttft = (gen.first_text_at - started) * 1000.0 if streamed and gen.first_text_at is not None else None
        return RunResult(
            output=text,
            finish_reason=finish_reason(gen.finish_reason, stop_cut=cut),
            prompt_tokens=gen.prompt_tokens,
            completion_tokens=completion_tokens,
            ttft_ms=ttft,
            model_revision=revision,
            device="remote",
            extra=extra,
        )


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise JobError(ErrorCode.RUNNER_ERROR, "the engine sent a malformed answer: not JSON") from None
