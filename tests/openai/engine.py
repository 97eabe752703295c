"""A small OpenAI-compatible serving engine for the tests: real generation, real SSE.

It serves a transformers causal LM (the tiny random-weight Llama) on the CPU through
``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``, streaming one event per
token like vLLM, with usage counts from the tokenizer. It honours ``max_tokens``,
``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``, ``stop``, ``seed`` and
vLLM's ``ignore_eos``, and stops generating when the client goes away.

:class:`EngineKnobs` switches on the failure modes the runner must survive (slow
answers, HTTP errors, a connection dropped mid-stream, no ``stream_options`` support),
and :class:`EngineLog` records what the engine saw. :class:`EngineServer` runs the app
with uvicorn in a thread on a loopback port and can be stopped and started again on the
same port, like an engine restart.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


class TinyEngine:
    """A causal LM and its tokenizer; one generation at a time, in the caller's thread."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir)
        self.model.eval()
        self.max_model_len = int(self.model.config.max_position_embeddings)
        self._lock = threading.Lock()

    def encode(self, body: dict[str, Any]) -> list[int]:
        if "messages" in body:
            text = self.tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(body["prompt"])["input_ids"])

    def generate(
        self,
        prompt_ids: list[int],
        body: dict[str, Any],
        *,
        stop_event: threading.Event,
        on_token: Callable[[str], object],
        token_delay_s: float = 0.0,
    ) -> tuple[int, str]:
        """Generate for ``body``; call ``on_token`` with each new piece of text.

        Returns the number of generated tokens and the finish reason (``stop``,
        ``length``, or ``abort`` when ``stop_event`` was set from outside).
        """
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        tokenizer, raw_stop = self.tokenizer, body.get("stop") or []
        stops: list[str] = [raw_stop] if isinstance(raw_stop, str) else list(raw_stop)
        generated: list[int] = []
        state = _Progress()

        class _Streamer(BaseStreamer):
            first = True

            def put(self, value: Any) -> None:
                if self.first:  # the prompt itself
                    self.first = False
                    return
                if state.reason is not None:
                    return
                generated.extend(int(t) for t in value.reshape(-1).tolist())
                text = tokenizer.decode(generated, skip_special_tokens=True)
                if text.endswith("\ufffd"):
                    return  # half of a multi-byte character: wait for the rest
                cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    text, state.reason = text[:cut], "stop"
                    stop_event.set()
                delta, state.text = text[len(state.text) :], text
                if delta:
                    on_token(delta)
                if token_delay_s and state.reason is None:
                    stop_event.wait(token_delay_s)

            def end(self) -> None:
                pass

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), stop_event.is_set(), dtype=torch.bool)

        max_tokens = int(body.get("max_tokens") or 16)
        temperature = float(body.get("temperature", 1.0))
        kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "do_sample": temperature > 0}
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=body.get("top_p") or 1.0, top_k=body.get("top_k") or 0)
        if body.get("repetition_penalty"):
            kwargs["repetition_penalty"] = body["repetition_penalty"]
        if body.get("ignore_eos"):
            kwargs["min_new_tokens"] = max_tokens
        with self._lock, torch.inference_mode(), torch.random.fork_rng(devices=[]):
            if body.get("seed") is not None:
                torch.manual_seed(int(body["seed"]))
            out = self.model.generate(
                torch.tensor([prompt_ids]),
                streamer=_Streamer(),
                stopping_criteria=StoppingCriteriaList([_Stop()]),
                pad_token_id=tokenizer.pad_token_id,
                **kwargs,
            )
        n_new = out.shape[1] - len(prompt_ids)
        if state.reason is None:
            state.reason = "abort" if stop_event.is_set() else "length" if n_new >= max_tokens else "stop"
        return n_new, state.reason


@dataclass
class _Progress:
    text: str = ""
    reason: str | None = None


@dataclass
class EngineKnobs:
    """Behaviour switches; tests change them while the engine runs."""

    models: list[str] = field(default_factory=lambda: ["tiny-llama"])
    owned_by: str = "tiny-engine"
    api_key: str | None = None
    delay_s: float = 0.0  # before answering a generation request
    token_delay_s: float = 0.0  # after each generated token
    fail_status: int | None = None  # answer generation requests with this status...
    fail_body: Any = None  # ...and this JSON body
    drop_after_chunks: int | None = None  # cut the connection after this many streamed chunks
    stream_supported: bool = True
    stream_options_supported: bool = True
    max_model_len: int | None = None  # defaults to the model's own


@dataclass
class EngineLog:
    """What the engine saw: request bodies, finished generations, client disconnects."""

    bodies: list[dict[str, Any]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    finished: list[tuple[str, int]] = field(default_factory=list)  # (finish reason, generated tokens)
    first_token_sent: threading.Event = field(default_factory=threading.Event)
    disconnected: threading.Event = field(default_factory=threading.Event)
    generation_ended: threading.Event = field(default_factory=threading.Event)


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def create_engine_app(engine: TinyEngine, knobs: EngineKnobs, record: EngineLog) -> FastAPI:
    """The OpenAI-compatible app around ``engine``."""
    app = FastAPI()

    def unauthorized(request: Request) -> JSONResponse | None:
        if knobs.api_key and request.headers.get("authorization") != f"Bearer {knobs.api_key}":
            return _error(401, "invalid API key", "authentication_error")
        return None

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        refused = unauthorized(request)
        if refused is not None:
            return refused
        data = [{"id": m, "object": "model", "created": 0, "owned_by": knobs.owned_by} for m in knobs.models]
        return {"object": "list", "data": data}

    async def generate(request: Request, chat: bool) -> Any:
        refused = unauthorized(request)
        if refused is not None:
            return refused
        body = await request.json()
        record.bodies.append(body)
        record.paths.append(request.url.path)
        until = time.monotonic() + knobs.delay_s
        while time.monotonic() < until:  # a slow engine that still notices a client leaving
            if await request.is_disconnected():
                record.disconnected.set()
                return _error(499, "client closed request", "Cancelled")
            await asyncio.sleep(0.02)
        if knobs.fail_status is not None:
            return JSONResponse(knobs.fail_body or {"error": {"message": "engine failure"}}, status_code=knobs.fail_status)
        if body.get("model") not in knobs.models:
            return _error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        if "stream_options" in body and not knobs.stream_options_supported:
            return _error(400, "unknown field: stream_options", "BadRequestError")
        prompt_ids = engine.encode(body)
        limit = knobs.max_model_len or engine.max_model_len
        if len(prompt_ids) + int(body.get("max_tokens") or 16) > limit:
            return _error(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(prompt_ids) + int(body.get('max_tokens') or 16)} tokens. Please reduce the length of the input.",
                "BadRequestError",
            )
        meta = {
            "id": f"cmpl-{uuid.uuid4().hex[:12]}",
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": "tiny-engine-1",
        }
        if body.get("stream") and knobs.stream_supported:
            events = _stream(engine, knobs, record, body, prompt_ids, chat, meta)
            return StreamingResponse(events, media_type="text/event-stream")
        pieces: list[str] = []
        stop_event = threading.Event()
        try:
            n_new, reason = await asyncio.to_thread(
                engine.generate, prompt_ids, body, stop_event=stop_event, on_token=pieces.append
            )
        finally:
            stop_event.set()
        record.finished.append((reason, n_new))
        record.generation_ended.set()
        text = "".join(pieces)
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": n_new, "total_tokens": len(prompt_ids) + n_new}
        obj = "chat.completion" if chat else "text_completion"
        return {**meta, "object": obj, "choices": [choice], "usage": usage}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await generate(request, chat=True)

    return app


async def _stream(
    engine: TinyEngine,
    knobs: EngineKnobs,
    record: EngineLog,
    body: dict[str, Any],
    prompt_ids: list[int],
    chat: bool,
    meta: dict[str, Any],
) -> AsyncIterator[bytes]:
    """Server-sent events, one per token; generation stops if the client disconnects."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    stop_event = threading.Event()
    obj = "chat.completion.chunk" if chat else "text_completion"

    def event(choices: list[dict[str, Any]], **more: Any) -> bytes:
        return f"data: {json.dumps({**meta, 'object': obj, 'choices': choices, **more})}\n\n".encode()

    def piece(text: str | None, reason: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
        choice.update({"delta": {"content": text} if text is not None else {}} if chat else {"text": text or ""})
        return choice

    def run() -> tuple[int, str]:
        try:
            n_new, reason = engine.generate(
                prompt_ids,
                body,
                stop_event=stop_event,
                on_token=lambda t: loop.call_soon_threadsafe(queue.put_nowait, t),
                token_delay_s=knobs.token_delay_s,
            )
            record.finished.append((reason, n_new))
            return n_new, reason
        finally:
            record.generation_ended.set()
            loop.call_soon_threadsafe(queue.put_nowait, None)

    worker = asyncio.ensure_future(asyncio.to_thread(run))
    sent = 0
    try:
        if chat:
            yield event([{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}])
        while (text := await queue.get()) is not None:
            yield event([piece(text, None)])
            sent += 1
            record.first_token_sent.set()
            if knobs.drop_after_chunks is not None and sent >= knobs.drop_after_chunks:
                stop_event.set()
                raise ConnectionAbortedError("the test engine drops this connection on purpose")
        n_new, reason = await worker
        yield event([piece(None, reason)])
        opts = body.get("stream_options") or {}
        if opts.get("include_usage"):
            usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": n_new, "total_tokens": len(prompt_ids) + n_new}
            yield event([], usage=usage)
        yield b"data: [DONE]\n\n"
    except asyncio.CancelledError:
        record.disconnected.set()
        raise
    finally:
        stop_event.set()  # the generation thread ends at its next step


class EngineServer:
    """Runs the engine app with uvicorn in a thread on ``127.0.0.1:port`` (0 = a free one)."""

    def __init__(self, app: FastAPI, port: int = 0) -> None:
        self.app = app
        self.port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> EngineServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level="critical",
            lifespan="off",
            ws="none",
            http="h11",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test engine did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._server = self._thread = None
