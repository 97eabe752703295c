"""A runner's answer, checked once and encoded once, before anything durable is built from it.

A runner is a plugin: what it returns cannot be trusted to be a well-formed
:class:`~runners.base.RunResult`. :func:`check_run_result` checks every field against its
declared type and returns a fresh ``RunResult`` the runner no longer holds;
:func:`encode_body` turns the result body into the exact bytes that are stored and sent.
Either one raises :class:`~miner.wire.errors.JobError` (``RESULT_INVALID`` or
``RESULT_TOO_LARGE``), which fails the one job and lets the daemon go on.

Messages name the field and the type found (``type(x).__name__``) and never the value:
nothing here calls ``str``, ``repr``, ``format``, ``==`` or ``hash`` on an object the runner
handed in, and types are compared with ``type(x) is ...`` so that a proxy or a subclass
cannot run code while it is being checked.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from miner.wire.errors import ErrorCode, JobError
from runners.base import RunResult

__all__ = ["DEFAULT_MAX_RESULT_BYTES", "MAX_EXTRA_DEPTH", "check_run_result", "encode_body"]

DEFAULT_MAX_RESULT_BYTES = 1 << 20
MAX_EXTRA_DEPTH = 32  # containers nested inside RunResult.extra, the dict itself counting as 1
MAX_INT = (1 << 63) - 1  # what every JSON reader (and the receipt's canonical form) takes as an int

_JSON_TYPES = "None, bool, int, finite float, str, list, or dict with str keys"
_SHOWN_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,40}")
_OPTIONAL_INTS = ("prompt_tokens", "completion_tokens")
_OPTIONAL_FLOATS = ("ttft_ms", "gpu_seconds")
_OPTIONAL_STRS = ("model_revision", "gpu_uuid", "dtype")
_REQUIRED_STRS = ("output", "finish_reason", "device")
_FIELDS = (*_REQUIRED_STRS, *_OPTIONAL_INTS, *_OPTIONAL_FLOATS, *_OPTIONAL_STRS, "gpu_uuids", "extra")
MAX_GPU_UUIDS = 64


def _invalid(where: str, problem: str) -> JobError:
    return JobError(
        ErrorCode.RESULT_INVALID,
        f"the runner's result is invalid: {where} {problem}; the runner plugin must be fixed",
    )


_TYPE_NAME = type.__dict__["__name__"]  # reads the type's own name slot: a metaclass cannot intercept it


def _type_name(value: object) -> str:
    name = _TYPE_NAME.__get__(type(value))
    return name if _SHOWN_KEY.fullmatch(name) else "(unprintable name)"


def _check_str(value: str, where: str) -> None:
    """A str that UTF-8 can encode (no lone surrogates)."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _invalid(where, "holds a lone surrogate, which UTF-8 cannot encode") from None


def _check_int(value: int, where: str, *, minimum: int) -> None:
    if not minimum <= value <= MAX_INT:
        low = "0" if minimum == 0 else "-(2**63-1)"
        raise _invalid(where, f"is an int out of range (it must be from {low} to 2**63-1)")


def _key_label(key: str, position: int) -> str:
    """How a dict key is named in a message: itself when it looks like a name, else its position."""
    return f"[{key!r}]" if _SHOWN_KEY.fullmatch(key) else f"[key #{position}]"


def _copy_json(value: Any, where: str, depth: int) -> Any:
    """Return a copy of ``value`` made only of exact JSON types, or raise naming the first bad part."""
    kind = type(value)
    if value is None or kind is bool:
        return value
    if kind is str:
        _check_str(value, where)
        return value
    if kind is int:
        _check_int(value, where, minimum=-MAX_INT)
        return value
    if kind is float:
        if not math.isfinite(value):
            raise _invalid(where, "is a float that is NaN or infinite; JSON has neither")
        return value
    if kind is list or kind is dict:
        if depth >= MAX_EXTRA_DEPTH:
            raise _invalid(where, f"nests deeper than {MAX_EXTRA_DEPTH} levels")
        if kind is list:
            return [_copy_json(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
        copied: dict[str, Any] = {}
        for position, (key, item) in enumerate(list(value.items())):
            if type(key) is not str:
                raise _invalid(f"{where}[key #{position}]", f"is a key of type {_type_name(key)}; keys must be str")
            _check_str(key, f"{where}[key #{position}]")
            copied[key] = _copy_json(item, where + _key_label(key, position), depth + 1)
        return copied
    raise _invalid(where, f"is of type {_type_name(value)}; it must be JSON ({_JSON_TYPES})")


def _checked_fields(values: dict[str, Any]) -> dict[str, Any]:
    for name in _FIELDS:
        if name not in values:
            raise _invalid(f"RunResult.{name}", "is missing")
    checked: dict[str, Any] = {}
    for name in (*_REQUIRED_STRS, *_OPTIONAL_STRS):
        value = values[name]
        optional = name in _OPTIONAL_STRS
        if value is None and optional:
            checked[name] = value
            continue
        if type(value) is not str:
            wanted = "a str or None" if optional else "a str"
            raise _invalid(f"RunResult.{name}", f"is of type {_type_name(value)}; it must be {wanted}")
        _check_str(value, f"RunResult.{name}")
        checked[name] = value
    for name in _OPTIONAL_INTS:
        value = values[name]
        if value is not None and type(value) is not int:
            raise _invalid(f"RunResult.{name}", f"is of type {_type_name(value)}; it must be an int >= 0 or None")
        if value is not None:
            _check_int(value, f"RunResult.{name}", minimum=0)
        checked[name] = value
    for name in _OPTIONAL_FLOATS:
        value = values[name]
        if value is not None and type(value) is not float and type(value) is not int:
            raise _invalid(f"RunResult.{name}", f"is of type {_type_name(value)}; it must be a float >= 0 or None")
        if type(value) is int:
            _check_int(value, f"RunResult.{name}", minimum=0)
        elif value is not None and not (math.isfinite(value) and value >= 0):
            raise _invalid(f"RunResult.{name}", "must be a finite number >= 0 (it is NaN, infinite or negative)")
        checked[name] = None if value is None else float(value)
    uuids = values["gpu_uuids"]
    if type(uuids) not in (tuple, list) or len(uuids) > MAX_GPU_UUIDS:
        raise _invalid("RunResult.gpu_uuids", f"must be a tuple of at most {MAX_GPU_UUIDS} str")
    for i, uuid in enumerate(list(uuids)):
        if type(uuid) is not str:
            raise _invalid(f"RunResult.gpu_uuids[{i}]", f"is of type {_type_name(uuid)}; it must be a str")
        _check_str(uuid, f"RunResult.gpu_uuids[{i}]")
    checked["gpu_uuids"] = tuple(uuids)
    extra = values["extra"]
    if type(extra) is not dict:
        raise _invalid("RunResult.extra", f"is of type {_type_name(extra)}; it must be a dict")
    checked["extra"] = _copy_json(extra, "RunResult.extra", 0)
    return checked


def check_run_result(result: object) -> RunResult:
    """Check a runner's answer field by field and return a fresh, trusted :class:`RunResult`.

    Raises ``JobError(RESULT_INVALID)`` naming the first field that breaks the contract and
    the type found there. The returned object shares nothing mutable with ``result``.
    """
    if result is None:
        raise _invalid("the answer", "is None, not a RunResult (the runner's run() must return one)")
    if type(result) is not RunResult:
        raise _invalid("the answer", f"is of type {_type_name(result)}, not a RunResult")
    try:
        values = dict(object.__getattribute__(result, "__dict__"))
        return RunResult(**_checked_fields(values))
    except JobError:
        raise
    except (RecursionError, RuntimeError):  # e.g. extra changed size while it was being read
        raise _invalid("RunResult.extra", "changed while it was being checked") from None


def encode_body(body: dict[str, Any], *, limit: int) -> bytes:
    """The bytes of a result body as stored and sent: compact JSON, UTF-8, at most ``limit`` bytes.

    Raises ``JobError(RESULT_INVALID)`` when the body is not JSON (NaN, a set, a lone
    surrogate...), ``JobError(RESULT_TOO_LARGE)`` when it is over ``limit``.
    """
    if type(limit) is not int or limit < 1:
        raise ValueError("encode_body: limit must be a positive int (coordinator.max_result_bytes)")
    try:
        data = json.dumps(body, allow_nan=False, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except Exception as exc:  # TypeError, ValueError, UnicodeEncodeError, RecursionError, a raising __class__...
        raise JobError(
            ErrorCode.RESULT_INVALID,
            f"the result body cannot be encoded as JSON ({type(exc).__name__}); the runner plugin must be fixed",
        ) from None
    if len(data) > limit:
        raise JobError(
            ErrorCode.RESULT_TOO_LARGE,
            f"the result body is {len(data)} bytes; the coordinator accepts at most {limit} "
            "(coordinator.max_result_bytes)",
        )
    return data
