"""The text-generation job payload and its parameters, parsed and validated once.

Every runner takes a :class:`TextRequest`; invalid input raises :class:`JobError` with
``INVALID_PAYLOAD`` (the payload's shape) or ``INVALID_PARAMETERS`` (naming the field).
Unknown parameters are ignored. Conventions follow the OpenAI API where they overlap:
``temperature: 0`` means greedy decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from miner.wire.errors import ErrorCode, JobError

MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})


@dataclass(frozen=True)
class GenerationParams:
    """Sampling parameters. ``None`` means "the runner's default"."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature is None or self.temperature == 0

    @property
    def sampling(self) -> str:
        """``greedy``, ``seeded`` (sampled with a seed: reproducible) or ``unseeded`` (not)."""
        if self.greedy:
            return "greedy"
        return "seeded" if self.seed is not None else "unseeded"

    def canonical(self) -> dict[str, Any]:
        """The parameters as parsed, for the receipt's ``params_sha256`` (unset ones left out)."""
        fields = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
            "stop": list(self.stop) or None,
            "seed": self.seed,
        }
        return {k: v for k, v in fields.items() if v is not None}

    def sampling_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys can share one batched ``generate`` call."""
        if self.greedy:
            return ("greedy", self.repetition_penalty)
        return ("sample", self.temperature, self.top_p, self.top_k, self.repetition_penalty, self.seed)


@dataclass(frozen=True)
class TextRequest:
    """A text-generation job: ``prompt`` or chat ``messages`` (exactly one is set)."""

    model: str
    prompt: str | None
    messages: tuple[dict[str, str], ...] | None
    params: GenerationParams


def _invalid(field: str, message: str) -> JobError:
    return JobError(ErrorCode.INVALID_PARAMETERS, f"parameters.{field}: {message}")


def _number(params: dict[str, Any], field: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
    value = params.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _invalid(field, f"must be a number, got {type(value).__name__}")
    if value < lo or value > hi or (lo_open and value == lo):
        bracket = "(" if lo_open else "["
        raise _invalid(field, f"must be in {bracket}{lo:g}, {hi:g}], got {value:g}")
    return float(value)


def _integer(params: dict[str, Any], field: str, lo: int, hi: int) -> int | None:
    value = params.get(field)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(field, f"must be an integer, got {type(value).__name__}")
    if value < lo or value > hi:
        raise _invalid(field, f"must be between {lo} and {hi}, got {value}")
    return value


def parse_params(params: Any) -> GenerationParams:
    """Validate ``payload.parameters``; raise ``INVALID_PARAMETERS`` naming the field."""
    if params is None:
        return GenerationParams()
    if not isinstance(params, dict):
        raise JobError(ErrorCode.INVALID_PARAMETERS, f"parameters must be an object, got {type(params).__name__}")
    field = "max_new_tokens" if params.get("max_new_tokens") is not None else "max_tokens"
    max_new = _integer(params, field, 1, 1_000_000)
    stop_raw = params.get("stop")
    if stop_raw is None:
        stop: tuple[str, ...] = ()
    elif isinstance(stop_raw, str):
        stop = (stop_raw,)
    elif isinstance(stop_raw, list) and all(isinstance(s, str) for s in stop_raw):
        stop = tuple(stop_raw)
    else:
        raise _invalid("stop", "must be a string or a list of strings")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise _invalid("stop", f"at most {MAX_STOP_SEQUENCES} sequences")
    if any(not s or len(s) > MAX_STOP_LENGTH for s in stop):
        raise _invalid("stop", f"each sequence must have 1 to {MAX_STOP_LENGTH} characters")
    return GenerationParams(
        max_new_tokens=max_new,
        temperature=_number(params, "temperature", 0.0, 2.0),
        top_p=_number(params, "top_p", 0.0, 1.0, lo_open=True),
        top_k=_integer(params, "top_k", 0, 1_000_000),
        repetition_penalty=_number(params, "repetition_penalty", 0.0, 10.0, lo_open=True),
        stop=stop,
        seed=_integer(params, "seed", 0, 2**63 - 1),
    )


def _parse_messages(raw: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise JobError(ErrorCode.INVALID_PAYLOAD, "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise JobError(ErrorCode.INVALID_PAYLOAD, f"messages[{i}] must be an object")
        role, content = msg.get("role"), msg.get("content")
        if role not in CHAT_ROLES:
            raise JobError(ErrorCode.INVALID_PAYLOAD, f"messages[{i}].role must be one of {sorted(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise JobError(ErrorCode.INVALID_PAYLOAD, f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return tuple(out)


def parse_text_payload(payload: Any) -> TextRequest:
    """Parse a job payload ``{"model", "prompt" | "messages", "parameters"?}``."""
    if not isinstance(payload, dict):
        raise JobError(ErrorCode.INVALID_PAYLOAD, f"payload must be an object, got {type(payload).__name__}")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise JobError(ErrorCode.INVALID_PAYLOAD, "payload.model must be a non-empty string")
    prompt, messages = payload.get("prompt"), payload.get("messages")
    if (prompt is None) == (messages is None):
        raise JobError(ErrorCode.INVALID_PAYLOAD, "payload needs exactly one of prompt or messages")
    if prompt is not None and not isinstance(prompt, str):
        raise JobError(ErrorCode.INVALID_PAYLOAD, f"payload.prompt must be a string, got {type(prompt).__name__}")
    return TextRequest(
        model=model,
        prompt=prompt,
        messages=None if messages is None else _parse_messages(messages),
        params=parse_params(payload.get("parameters")),
    )


def payload_model(payload: Any) -> str | None:
    """The job-facing model name, if the payload names one; for admission and logs."""
    if isinstance(payload, dict) and isinstance(payload.get("model"), str):
        return payload["model"]
    return None


def apply_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """Cut ``text`` at the first stop sequence; returns the text and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
