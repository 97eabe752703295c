"""Admission: the miner refuses, with the right code, any job it cannot serve as asked."""

from __future__ import annotations

from typing import Any

import pytest

from miner.daemon.admission import admit
from miner.daemon.capabilities import build_capabilities
from miner.wire.errors import ErrorCode, JobError
from runners.base import GpuInfo

GPU = GpuInfo(index=0, uuid="GPU-1", name="NVIDIA GeForce RTX 3090", memory_total_mb=24576, cuda_version="12.4")
CAPS = build_capabilities(gpus=[GPU], models=["llama2"], price=0.01, region="eu")
SERVED = ["llama2"]
OK = {"model": "llama2", "prompt": "hi"}


def check(
    payload: Any, constraints: Any, caps: dict[str, Any], served: list[str], *args: Any, **kw: Any
) -> JobError | None:
    """The JobError admission raises for this job, or None when it is admitted."""
    try:
        admit(payload, constraints, caps, served, *args, **kw)
    except JobError as exc:
        return exc
    return None


def _code(payload: Any, constraints: Any = None, caps: dict[str, Any] = CAPS) -> str | None:
    err = check(payload, constraints, caps, SERVED, "eu")
    return None if err is None else err.code


@pytest.mark.parametrize(
    "constraints",
    [
        None,
        {},
        {"gpu": "NVIDIA GeForce RTX 3090", "min_vram_gb": 24, "cuda": "12", "region": "eu", "max_price": 0.5},
        {"gpu_type": "nvidia-rtx-3090", "min_gpu_memory": 8, "models": ["llama2"]},
        # the reference coordinator sends every constraint field, nulls included
        {"gpu": None, "min_vram_gb": None, "cuda": None, "models": None, "region": None, "max_price": None},
    ],
)
def test_servable_jobs_are_admitted(constraints: Any) -> None:
    """Jobs whose constraints this miner meets, in either spelling, pass admission."""
    assert _code(OK, constraints) is None
    assert admit(OK, constraints, CAPS, SERVED, "eu").model == "llama2"


@pytest.mark.parametrize(
    ("payload", "constraints", "code"),
    [
        ("just text", None, ErrorCode.INVALID_PAYLOAD),
        ({"prompt": "no model"}, None, ErrorCode.INVALID_PAYLOAD),
        ({"model": "llama2"}, None, ErrorCode.INVALID_PAYLOAD),
        ({"model": "llama2", "prompt": "x", "parameters": {"temperature": "hot"}}, None, ErrorCode.INVALID_PARAMETERS),
        ({"model": "llama2", "prompt": "x", "parameters": {"max_tokens": -1}}, None, ErrorCode.INVALID_PARAMETERS),
        ({"model": "mistral-7b", "prompt": "x"}, None, ErrorCode.MODEL_NOT_SERVED),
        (OK, {"models": ["llama2", "mistral-7b"]}, ErrorCode.MODEL_NOT_SERVED),
        (OK, {"min_vram_gb": 80}, ErrorCode.INSUFFICIENT_VRAM),
        (OK, {"min_gpu_memory": 48}, ErrorCode.INSUFFICIENT_VRAM),
        (OK, {"gpu_type": "rtx-3090", "min_gpu_memory": 48}, ErrorCode.INSUFFICIENT_VRAM),
        (OK, {"gpu_type": "h100", "min_gpu_memory": 48}, ErrorCode.CONSTRAINTS_UNMET),
        (OK, {"gpu": "NVIDIA H100"}, ErrorCode.CONSTRAINTS_UNMET),
        (OK, {"cuda": "13.0"}, ErrorCode.CONSTRAINTS_UNMET),
        (OK, {"region": "us"}, ErrorCode.CONSTRAINTS_UNMET),
        (OK, {"max_price": 0.001}, ErrorCode.CONSTRAINTS_UNMET),
        (OK, {"min_vram_gb": "lots"}, ErrorCode.INVALID_PAYLOAD),
        (OK, ["not", "an", "object"], ErrorCode.INVALID_PAYLOAD),
        (OK, {"models": 3}, ErrorCode.INVALID_PAYLOAD),
    ],
)
def test_unservable_jobs_get_the_right_code(payload: Any, constraints: Any, code: str) -> None:
    """Each kind of unservable job maps to its documented error code."""
    assert _code(payload, constraints) == code


def test_cpu_miner_has_no_vram_for_a_memory_constraint() -> None:
    """On a CPU-only miner any GPU memory constraint is INSUFFICIENT_VRAM, never substituted."""
    caps = build_capabilities(gpus=[], models=["llama2"], price=0.01)
    assert _code(OK, {"min_vram_gb": 1}, caps) == ErrorCode.INSUFFICIENT_VRAM
    assert _code(OK, {"gpu": "NVIDIA H200"}, caps) == ErrorCode.CONSTRAINTS_UNMET


def test_error_message_names_what_is_wrong() -> None:
    """The failure message says which model or constraint is the problem."""
    err = check({"model": "mistral-7b", "prompt": "x"}, None, CAPS, SERVED)
    assert err is not None and "mistral-7b" in err.message and "llama2" in err.message
    err = check(OK, {"min_vram_gb": 80}, CAPS, SERVED)
    assert err is not None and "80" in err.message


def test_configured_but_not_ready_model_is_backend_unavailable() -> None:
    """A model that is configured but whose runner is not ready now fails BACKEND_UNAVAILABLE, not MODEL_NOT_SERVED."""
    err = check({"model": "mistral-7b", "prompt": "x"}, None, CAPS, SERVED, configured_models=["llama2", "mistral-7b"])
    assert err is not None and err.code == ErrorCode.BACKEND_UNAVAILABLE


def test_lone_surrogates_are_invalid_payload() -> None:
    """Text that cannot be encoded as UTF-8 (a lone surrogate) fails INVALID_PAYLOAD naming the field."""
    cases = {
        "payload.prompt": {"model": "llama2", "prompt": "a\ud800b"},
        "payload.messages[1].content": {
            "model": "llama2",
            "messages": [{"role": "system", "content": "ok"}, {"role": "user", "content": "\udfff"}],
        },
        "payload.parameters.stop[0]": {"model": "llama2", "prompt": "x", "parameters": {"stop": ["\ud83d"]}},
    }
    for field, payload in cases.items():
        err = check(payload, None, CAPS, SERVED)
        assert err is not None and err.code == ErrorCode.INVALID_PAYLOAD and field in err.message
