"""The options of a ``[[models]]`` entry with ``runner = "transformers"``. No torch here.

``path``                local folder written by ``save_pretrained``, or a hub id ``org/name``
``revision``            pinned commit hash; required for a hub id
``dtype``               ``float16`` | ``bfloat16`` | ``float32`` | ``auto`` (default): on CUDA
                        the checkpoint's half-precision dtype (bfloat16 if it says float32);
                        on the CPU float32
``devices``             the GPUs this model runs on, by index or UUID as ``aitbc-miner probe``
                        lists them (a subset of ``gpus.devices``): one GPU, or several to shard
                        a model too large for one. Default: a copy of the model on each of the
                        miner's GPUs
``device``              ``cpu`` runs on the CPU (the only way to get a CPU model on a GPU host);
                        ``cuda:N`` is GPU N as ``probe`` lists it (same as ``devices = [N]``);
                        ``auto`` (or ``cuda``) shards over all of the miner's GPUs
                        (see :mod:`runners.placement`)
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
``decode``              ``auto`` (default) | ``eager`` | ``static`` | ``continuous``: how decoding
                        runs. ``static``: a static KV cache, with ``torch.compile`` (CUDA graphs)
                        on CUDA only; ``continuous``: transformers' continuous batching with paged
                        attention, greedy jobs only (sampled ones run eager); ``auto``: eager on
                        the CPU, on CUDA the fastest of the three as measured at start (cached in
                        ``state_dir/decode_modes.json``; :mod:`runners.hf.decode`)
``memory_budget_mb``    cap on what this runner's models and batches may use on the device
                        (with the CUDA free memory when both apply); also enforced on the CPU
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from runners.base import GpuInfo

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
    devices: list[int | str] | None = Field(None, min_length=1, max_length=64)
    decode: Literal["auto", "eager", "static", "continuous"] = "auto"

    @field_validator("device")
    @classmethod
    def _device_form(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().lower()
        if not _DEVICE.match(value):
            raise ValueError(f"unknown device {value!r}; use 'cuda:N', 'cuda', 'cpu' or 'auto'")
        return "auto" if value == "cuda" else value


@dataclass(frozen=True)
class DevicePlan:
    """Where one copy of a model lives, in torch's numbering and NVML's.

    ``key`` names its worker: ``cpu``, ``cuda:N`` (one GPU) or ``cuda:N+M`` (sharded);
    ``cuda_indices`` are torch's device numbers, ``gpus`` the same GPUs as NVML reports them.
    """

    key: str
    cuda_indices: tuple[int, ...] = ()
    gpus: tuple[GpuInfo, ...] = ()

    @property
    def is_cuda(self) -> bool:
        return bool(self.cuda_indices)

    @property
    def sharded(self) -> bool:
        return len(self.cuda_indices) > 1

    @property
    def nvml_indices(self) -> tuple[int, ...]:
        return tuple(g.index for g in self.gpus)

    @property
    def gpu_uuids(self) -> tuple[str, ...]:
        return tuple(g.uuid for g in self.gpus)

    @classmethod
    def for_cuda(cls, cuda_indices: tuple[int, ...], gpus: tuple[GpuInfo, ...]) -> DevicePlan:
        return cls("cuda:" + "+".join(str(i) for i in cuda_indices), cuda_indices, gpus)


CPU_PLAN = DevicePlan("cpu")


def choose_dtype(option: str, config_dtype: str | None, plan: DevicePlan, bf16_ok: bool) -> str:
    """The dtype name to load with (see ``dtype`` in the module docstring)."""
    if option != "auto":
        return option
    if not plan.is_cuda:
        return "float32"
    if config_dtype in ("float16", "bfloat16"):
        return config_dtype if config_dtype == "float16" or bf16_ok else "float16"
    return "bfloat16" if bf16_ok else "float16"
