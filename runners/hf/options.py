"""The options of a ``[[models]]`` entry with ``runner = "transformers"``. No torch here.

``path``                local folder written by ``save_pretrained``, or a hub id ``org/name``
``revision``            pinned commit hash; required for a hub id
``dtype``               ``float16`` | ``bfloat16`` | ``float32`` | ``auto`` (default): on CUDA
                        the checkpoint's half-precision dtype (bfloat16 if it says float32);
                        on the CPU float32
``device``              ``cuda:N`` | ``cuda`` | ``cpu`` | ``auto`` (``device_map="auto"`` across
                        the host's GPUs); default ``cuda:0`` when CUDA is available, else ``cpu``
``max_new_tokens``      default and cap of a job's ``max_new_tokens`` (default 256)
``max_prompt_tokens``   longest prompt accepted, in tokens (default: the model's context
                        length minus one)
``max_batch_size``      jobs per batched ``generate`` (default 8)
``preload``             load at start (default true); else on first use, after a check
                        (a hub model's files are fetched at start either way)
``batch_wait_ms``       how long a batch waits for one more companion (default 2 ms): a lone
                        job starts this much later
``batch_window_ms``     the longest a batch keeps collecting companions that keep arriving
                        (default 30 ms)
``attn_implementation`` ``sdpa`` | ``eager`` | ``flash_attention_2`` (default: transformers')
``memory_budget_mb``    cap on what this runner's models and batches may use on the device
                        (with the CUDA free memory when both apply); also enforced on the CPU
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_DEVICE = re.compile(r"^(cpu|auto|cuda(:\d{1,2})?)$")


class TransformersOptions(BaseModel):
    """Validated options of one transformers model entry (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1)
    revision: str | None = None
    dtype: Literal["float16", "bfloat16", "float32", "auto"] = "auto"
    device: str | None = None
    max_new_tokens: int = Field(256, ge=1, le=1_000_000)
    max_prompt_tokens: int | None = Field(None, ge=1, le=10_000_000)
    max_batch_size: int = Field(8, ge=1, le=1024)
    preload: bool = True
    batch_wait_ms: float = Field(2.0, ge=0, le=10_000)
    batch_window_ms: float = Field(30.0, ge=0, le=60_000)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = None
    memory_budget_mb: int | None = Field(None, ge=1)

    @field_validator("device")
    @classmethod
    def _device_form(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().lower()
        if not _DEVICE.match(value):
            raise ValueError(f"unknown device {value!r}; use 'cuda:N', 'cuda', 'cpu' or 'auto'")
        return "cuda:0" if value == "cuda" else value


@dataclass(frozen=True)
class DevicePlan:
    """Where a model lives. ``key`` names its worker: ``cpu``, ``cuda:N`` or ``auto``."""

    key: str
    cuda_indices: tuple[int, ...]  # the GPUs it uses (all visible ones for ``auto``)

    @property
    def is_cuda(self) -> bool:
        return bool(self.cuda_indices)


def plan_device(where: str, device: str | None, cuda_count: int) -> DevicePlan:
    """Resolve a configured device against the visible CUDA devices; ConfigError if impossible."""
    from miner.wire.errors import ConfigError

    if device is None:
        device = "cuda:0" if cuda_count else "cpu"
    if device == "cpu":
        return DevicePlan("cpu", ())
    if cuda_count == 0:
        raise ConfigError(f'{where}.device: {device!r} needs CUDA, but no CUDA device is visible; use device = "cpu"')
    if device == "auto":
        return DevicePlan("auto", tuple(range(cuda_count)))
    index = int(device.partition(":")[2])
    if index >= cuda_count:
        raise ConfigError(
            f"{where}.device: {device!r} does not exist; {cuda_count} CUDA device(s) are visible "
            f"(cuda:0..cuda:{cuda_count - 1})"
        )
    return DevicePlan(device, (index,))


def choose_dtype(option: str, config_dtype: str | None, plan: DevicePlan, bf16_ok: bool) -> str:
    """The dtype name to load with (see ``dtype`` in the module docstring)."""
    if option != "auto":
        return option
    if not plan.is_cuda:
        return "float32"
    if config_dtype in ("float16", "bfloat16"):
        return config_dtype if config_dtype == "float16" or bf16_ok else "float16"
    return "bfloat16" if bf16_ok else "float16"
