"""Device facts for the worker: free memory (CUDA and/or a budget) and fatal CUDA errors."""

from __future__ import annotations

from collections.abc import Callable

import torch

from runners.hf.memory import MiB

FATAL_MARKERS = (
    "cuda error",
    "cuda driver error",
    "device-side assert",
    "illegal memory access",
    "unspecified launch failure",
    "cublas_status_execution_failed",
    "cublas_status_internal_error",
    "ecc error",
    "uncorrectable",
    "nccl error",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's out-of-memory error, also when CUDA reports it as a generic error."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def is_device_fatal(exc: BaseException) -> bool:
    """True for a CUDA error after which the device (context) cannot be trusted."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    text = str(exc).lower()
    if "out of memory" in text:
        return False
    accelerator_error = getattr(torch, "AcceleratorError", ())  # torch >= 2.8
    return isinstance(exc, accelerator_error) or any(marker in text for marker in FATAL_MARKERS)


class MemoryProbe:
    """Free memory for a device: CUDA's free memory and/or a configured budget.

    ``cuda_indices`` are torch's numbers of the device's GPUs and ``nvml_indices`` NVML's
    numbers of the same GPUs (the two differ under ``CUDA_VISIBLE_DEVICES``);
    ``free_vram_mb`` takes an NVML index.
    """

    def __init__(
        self,
        cuda_indices: tuple[int, ...],
        budget_bytes: int | None,
        free_vram_mb: Callable[[int], int | None] | None,
        nvml_indices: tuple[int, ...] = (),
    ) -> None:
        self.cuda_indices = cuda_indices
        self.budget_bytes = budget_bytes
        self.free_vram_mb = free_vram_mb
        self.nvml_indices = nvml_indices if len(nvml_indices) == len(cuda_indices) else ()

    def free_bytes(self, resident_bytes: int) -> int | None:
        """Bytes still usable, or ``None`` when nothing limits this device (CPU, no budget)."""
        limits = []
        if self.cuda_indices:
            free = 0
            for i, index in enumerate(self.cuda_indices):
                nvml_index = self.nvml_indices[i] if self.nvml_indices else None
                reported = (
                    self.free_vram_mb(nvml_index) if self.free_vram_mb is not None and nvml_index is not None else None
                )
                free += reported * MiB if reported is not None else torch.cuda.mem_get_info(index)[0]
                free += torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)  # torch's own cache
            limits.append(free)
        if self.budget_bytes is not None:
            limits.append(self.budget_bytes - resident_bytes)
        return min(limits) if limits else None
