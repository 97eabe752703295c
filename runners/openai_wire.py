"""The OpenAI-compatible wire format, as the ``openai`` runner speaks it.

Pure functions, no I/O: build a request body from a :class:`~runners.params.TextRequest`,
fold a JSON answer or a stream of server-sent events into a :class:`Generation`, and turn
an engine's refusal or a transport failure into a :class:`~miner.wire.errors.JobError` whose
message never quotes the prompt.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from miner.wire.errors import ErrorCode, JobError
from runners.params import TextRequest

CHAT_PATH = "/chat/completions"
COMPLETIONS_PATH = "/completions"
MODELS_PATH = "/models"

# Parameters whose field name differs between engines; ``param_names`` renames them.
RENAMEABLE_PARAMS = frozenset({"top_p", "top_k", "repetition_penalty", "stop", "seed"})

_LENGTH_REASONS = frozenset({"length", "max_tokens", "model_length"})
_FAILED_REASONS = frozenset({"abort", "error", "cancelled"})
_CONTEXT_WORDS = re.compile(r"context|too long|maximum.*length|max_total_tokens|exceed|truncat", re.IGNORECASE)
_QUOTE_WINDOW = 16
_MAX_ENGINE_MESSAGE = 200


@dataclass
class Generation:
    """What an engine answered, accumulated over one answer or a stream of chunks."""

    parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    text_chunks: int = 0
    engine_model: str | None = None
    system_fingerprint: str | None = None
    first_text_at: float | None = None  # time.monotonic() of the first non-empty text
    done: bool = False  # the stream's ``[DONE]`` was seen (or the answer was not streamed)

    @property
    def text(self) -> str:
        return "".join(self.parts)


def build_body(
    request: TextRequest,
    served_model: str,
    max_tokens: int,
    *,
    stream: bool,
    include_usage: bool,
    param_names: Mapping[str, str] | None = None,
    extra_body: Mapping[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The path (relative to ``base_url``) and JSON body for this request.

    Greedy decoding is sent as ``temperature: 0`` because OpenAI-compatible engines
    default to sampling at 1.0, while a job without ``temperature`` means greedy here.
    """
    p = request.params
    names = param_names or {}
    body: dict[str, Any] = dict(extra_body or {})
    body["model"] = served_model
    if request.messages is not None:
        path = CHAT_PATH
        body["messages"] = [dict(m) for m in request.messages]
    else:
        path = COMPLETIONS_PATH
        body["prompt"] = request.prompt
    body["max_tokens"] = max_tokens
    body["temperature"] = 0.0 if p.greedy else p.temperature
    body["n"] = 1
    optional = {
        "top_p": p.top_p,
        "top_k": p.top_k,
        "repetition_penalty": p.repetition_penalty,
        "stop": list(p.stop) or None,
        "seed": p.seed,
    }
    for name, value in optional.items():
        wire_name = names.get(name, name)
        if value is not None and wire_name:
            body[wire_name] = value
    body["stream"] = stream
    if stream and include_usage:
        body["stream_options"] = {"include_usage": True}
    return path, body


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _malformed(what: str) -> JobError:
    return JobError(ErrorCode.RUNNER_ERROR, f"the engine sent a malformed answer: {what}")


def _fold(gen: Generation, data: Any, *, chat: bool, streamed: bool) -> None:
    """Fold one answer (or one streamed chunk) into ``gen``."""
    if not isinstance(data, dict):
        raise _malformed(f"expected a JSON object, got {type(data).__name__}")
    if isinstance(data.get("model"), str):
        gen.engine_model = data["model"]
    if isinstance(data.get("system_fingerprint"), str):
        gen.system_fingerprint = data["system_fingerprint"]
    usage = data.get("usage")
    if isinstance(usage, dict):
        gen.prompt_tokens = _int_or_none(usage.get("prompt_tokens"))
        gen.completion_tokens = _int_or_none(usage.get("completion_tokens"))
    choices = data.get("choices")
    if not isinstance(choices, list):
        raise _malformed("no 'choices' list")
    if not choices:
        if not streamed:
            raise _malformed("an empty 'choices' list")
        return  # the usage-only chunk that ends a stream with include_usage
    choice = choices[0]
    if not isinstance(choice, dict):
        raise _malformed("choices[0] is not an object")
    if chat:
        holder = choice.get("delta" if streamed else "message")
        text = holder.get("content") if isinstance(holder, dict) else None
    else:
        text = choice.get("text")
    if text is not None and not isinstance(text, str):
        raise _malformed("the generated text is not a string")
    if text:
        gen.parts.append(text)
        gen.text_chunks += 1
        if gen.first_text_at is None:
            gen.first_text_at = time.monotonic()
    reason = choice.get("finish_reason")
    if isinstance(reason, str) and reason:
        gen.finish_reason = reason


def parse_answer(data: Any, *, chat: bool) -> Generation:
    """A complete (non-streamed) answer as a :class:`Generation`."""
    gen = Generation(done=True)
    _fold(gen, data, chat=chat, streamed=False)
    return gen


def fold_chunk(gen: Generation, payload: str, *, chat: bool, inputs: Iterable[str] = ()) -> None:
    """Fold one server-sent event's ``data`` into ``gen``; an in-stream error raises.

    ``inputs`` are the job's texts, which an error message must not quote.
    """
    if payload.strip() == "[DONE]":
        gen.done = True
        return
    try:
        data = json.loads(payload)
    except ValueError:
        raise _malformed("a streamed event is not JSON") from None
    if isinstance(data, dict) and "error" in data and "choices" not in data:
        raise JobError(
            ErrorCode.BACKEND_UNAVAILABLE, f"the engine reported an error mid-stream{_engine_says(data, inputs)}"
        )
    _fold(gen, data, chat=chat, streamed=True)


async def iter_sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The ``data`` of each server-sent event (multi-line data joined with newlines)."""
    lines: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
            continue
        if line.startswith("data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(" ") else value)
        # comments (":"), "event:", "id:" and "retry:" lines carry nothing we use
    if lines:
        yield "\n".join(lines)


def finish_reason(raw: str | None, *, stop_cut: bool) -> str:
    """The result's ``stop`` | ``length`` from the engine's reason; failures raise."""
    if stop_cut:
        return "stop"
    if raw in _FAILED_REASONS:
        raise JobError(ErrorCode.BACKEND_UNAVAILABLE, f"the engine ended the generation with finish_reason {raw!r}")
    if raw in _LENGTH_REASONS:
        return "length"
    return "stop"  # includes engine-specific names for end of sequence


def _quotes_input(text: str, inputs: Iterable[str]) -> bool:
    for secret in inputs:
        if not secret:
            continue
        if len(secret) <= _QUOTE_WINDOW:
            if len(secret.strip()) >= 4 and secret in text:
                return True
            continue
        for i in range(max(len(text) - _QUOTE_WINDOW + 1, 0)):
            if text[i : i + _QUOTE_WINDOW] in secret:
                return True
    return False


def _extract_message(data: Any) -> str:
    """The human part of an engine's error body, in the shapes engines use."""
    if isinstance(data, str):
        return data
    if not isinstance(data, dict):
        return ""
    error = data.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    if isinstance(error, str):
        return error
    if isinstance(data.get("message"), str):
        return data["message"]
    detail = data.get("detail")
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):  # FastAPI validation errors: keep loc and msg, never "input"
        items = [d for d in detail if isinstance(d, dict)]
        return "; ".join(f"{'.'.join(str(x) for x in d.get('loc', ()))}: {d.get('msg', '')}" for d in items)
    return ""


def _engine_says(data: Any, inputs: Iterable[str]) -> str:
    message = " ".join(_extract_message(data).split())[:_MAX_ENGINE_MESSAGE]
    if not message:
        return ""
    if _quotes_input(message, inputs):
        return " (the engine's message quotes the input, so it is withheld)"
    return f" (engine: {message})"


def request_inputs(request: TextRequest) -> list[str]:
    """The texts an error message must never quote."""
    if request.messages is not None:
        return [m["content"] for m in request.messages]
    return [request.prompt or ""]


def engine_error(status: int, body: bytes, *, base_url: str, served_model: str, inputs: Iterable[str]) -> JobError:
    """Map an engine's HTTP error answer to a job error code and a safe message."""
    try:
        data: Any = json.loads(body)
    except ValueError:
        data = body.decode("utf-8", "replace")
    says = _engine_says(data, list(inputs))
    where = f"the engine at {base_url}"
    if status == 404:
        return JobError(ErrorCode.MODEL_NOT_SERVED, f"{where} does not serve model {served_model!r} (404){says}")
    if status in (400, 413, 422):
        if _CONTEXT_WORDS.search(_extract_message(data)):
            return JobError(
                ErrorCode.INVALID_PARAMETERS,
                f"the prompt plus max_new_tokens exceed the model's context length ({status}){says}",
            )
        return JobError(ErrorCode.INVALID_PARAMETERS, f"{where} refused the request ({status}){says}")
    if status in (401, 403):
        return JobError(
            ErrorCode.BACKEND_UNAVAILABLE, f"{where} refused the API key ({status}); check api_key_file for this model"
        )
    if 300 <= status < 400:
        return JobError(
            ErrorCode.BACKEND_UNAVAILABLE,
            f"{where} answered with a redirect ({status}); set base_url to where it points",
        )
    return JobError(ErrorCode.BACKEND_UNAVAILABLE, f"{where} answered HTTP {status}{says}")


def transport_error(exc: httpx.HTTPError, *, base_url: str, mid_stream: bool) -> JobError:
    """Map a connection-level failure to ``BACKEND_UNAVAILABLE`` with a hint."""
    kind = type(exc).__name__
    if isinstance(exc, httpx.ConnectError):
        return JobError(
            ErrorCode.BACKEND_UNAVAILABLE, f"the engine at {base_url} is not reachable ({kind}); is it running?"
        )
    if isinstance(exc, httpx.TimeoutException):
        return JobError(ErrorCode.BACKEND_UNAVAILABLE, f"the engine at {base_url} timed out ({kind})")
    if mid_stream:
        message = f"the engine at {base_url} dropped the connection mid-answer ({kind})"
        return JobError(ErrorCode.BACKEND_UNAVAILABLE, message)
    return JobError(ErrorCode.BACKEND_UNAVAILABLE, f"the engine at {base_url} failed ({kind})")


def parse_model_list(data: Any) -> dict[str, str | None]:
    """``GET /models`` as ``{id: owned_by}``; ValueError if it is not a model list."""
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError("the answer has no 'data' list")
    models: dict[str, str | None] = {}
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            owner = entry.get("owned_by")
            models[entry["id"]] = owner if isinstance(owner, str) and owner else None
    return models


def match_served(served_model: str, listed: Mapping[str, str | None]) -> str | None:
    """The listed id that serves ``served_model``; an untagged name matches ``name:latest``."""
    if served_model in listed:
        return served_model
    if ":" not in served_model and f"{served_model}:latest" in listed:
        return f"{served_model}:latest"
    return None
