"""Wire shapes shared by the miner and the local coordinator.

Constraints come in two spellings (docs/protocol.md): the published API's
``gpu_type``/``min_gpu_memory`` and the reference service's ``gpu``/``min_vram_gb``.
:func:`parse_constraints` accepts both and :func:`unmet_constraint` applies the matching
rules of the reference coordinator, so the coordinator's dispatch and the miner's own
admission check agree by construction.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from miner.wire.errors import ConstraintError

__all__ = [
    "ConstraintError",
    "Constraints",
    "normalise_gpu_name",
    "parse_constraints",
    "parse_timestamp",
    "unmet_constraint",
    "utc_iso",
]

_GPU_NOISE = re.compile(r"\b(nvidia|geforce)\b")
_GPU_SEPARATORS = re.compile(r"[\s\-_]+")


def normalise_gpu_name(name: str) -> str:
    """``nvidia-rtx-3090`` and ``NVIDIA GeForce RTX 3090`` both become ``rtx3090``."""
    text = _GPU_SEPARATORS.sub(" ", name.lower())
    text = _GPU_NOISE.sub(" ", text)
    return _GPU_SEPARATORS.sub("", text)


@dataclass(frozen=True)
class Constraints:
    """Job constraints, both spellings folded into one shape. ``None`` means "any"."""

    gpu: str | None = None  # exact name (reference spelling)
    gpu_type: str | None = None  # published spelling, matched after normalising
    min_vram_gb: float | None = None
    cuda: str | None = None
    models: tuple[str, ...] = ()
    region: str | None = None
    max_price: float | None = None


def _opt_str(raw: dict[str, Any], field: str) -> str | None:
    value = raw.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConstraintError(field, f"must be a string, got {type(value).__name__}")
    return value


def _opt_number(raw: dict[str, Any], field: str) -> float | None:
    value = raw.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConstraintError(field, "must be a finite number")
    if value < 0:
        raise ConstraintError(field, "must not be negative")
    return float(value)


def parse_constraints(raw: Any) -> Constraints:
    """Parse a constraints object in either spelling. Unknown keys are ignored."""
    if raw is None:
        return Constraints()
    if not isinstance(raw, dict):
        raise ConstraintError("", f"constraints must be an object, got {type(raw).__name__}")
    vram = _opt_number(raw, "min_vram_gb")
    published_vram = _opt_number(raw, "min_gpu_memory")
    if vram is None or (published_vram is not None and published_vram > vram):
        vram = published_vram
    cuda = raw.get("cuda")
    if cuda is not None and (isinstance(cuda, bool) or not isinstance(cuda, (str, int, float))):
        raise ConstraintError("cuda", "must be a version string such as \"12.4\"")
    models = raw.get("models")
    if models is None:
        models = ()
    elif isinstance(models, str):
        models = (models,)
    elif isinstance(models, list) and all(isinstance(m, str) for m in models):
        models = tuple(models)
    else:
        raise ConstraintError("models", "must be a list of model names")
    return Constraints(
        gpu=_opt_str(raw, "gpu"),
        gpu_type=_opt_str(raw, "gpu_type"),
        min_vram_gb=vram,
        cuda=None if cuda is None else str(cuda),
        models=models,
        region=_opt_str(raw, "region"),
        max_price=_opt_number(raw, "max_price"),
    )


def unmet_constraint(constraints: Constraints, capabilities: dict[str, Any], region: str | None = None) -> str | None:
    """Return why ``capabilities`` cannot serve a job with ``constraints``, or ``None``.

    The GPU rules apply to one GPU: some single GPU must match the name and hold the
    memory. ``region`` is the miner's top-level region (``capabilities["region"]`` is
    used when it is not given).
    """
    gpus = [g for g in capabilities.get("gpus") or [] if isinstance(g, dict)]
    if constraints.gpu or constraints.gpu_type or constraints.min_vram_gb:
        def fits(g: dict[str, Any]) -> bool:
            name = str(g.get("name", ""))
            if constraints.gpu and name != constraints.gpu:
                return False
            if constraints.gpu_type and normalise_gpu_name(name) != normalise_gpu_name(constraints.gpu_type):
                return False
            if constraints.min_vram_gb:
                memory_mb = g.get("memory_mb")
                if not isinstance(memory_mb, (int, float)) or constraints.min_vram_gb * 1024 > memory_mb:
                    return False
            return True

        if not any(fits(g) for g in gpus):
            wanted = constraints.gpu or constraints.gpu_type or "any GPU"
            vram = f" with {constraints.min_vram_gb:g} GB" if constraints.min_vram_gb else ""
            return f"needs {wanted}{vram}; this miner has {', '.join(str(g.get('name')) for g in gpus) or 'no GPU'}"
    if constraints.cuda and constraints.cuda not in str(capabilities.get("cuda") or ""):
        return f"needs CUDA {constraints.cuda}; this miner has {capabilities.get('cuda') or 'none'}"
    served = set(capabilities.get("models") or [])
    missing = [m for m in constraints.models if m not in served]
    if missing:
        return f"needs models {missing} that this miner does not serve"
    miner_region = region if region is not None else capabilities.get("region")
    if constraints.region and constraints.region != miner_region:
        return f"needs region {constraints.region}; this miner is in {miner_region or 'no region'}"
    price = capabilities.get("price")
    if constraints.max_price is not None and isinstance(price, (int, float)) and price > constraints.max_price:
        return f"pays at most {constraints.max_price:g} per unit; this miner asks {price:g}"
    return None


def parse_timestamp(value: str) -> datetime:
    """Parse an ISO 8601 timestamp, naive (taken as UTC) or aware; returns an aware UTC time."""
    text = value.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def utc_iso(ts: float) -> str:
    """ISO 8601 UTC with a ``Z`` suffix, e.g. ``2026-11-28T17:13:21.123456Z``."""
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
