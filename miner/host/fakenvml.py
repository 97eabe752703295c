"""FakeNvml: a stand-in for the ``pynvml`` module, for tests and demos without a GPU.

It offers the functions :mod:`miner.host.nvml` calls, with the same names, argument order,
return shapes (``bytes`` or ``str`` strings, a memory struct in bytes, power in mW) and
the real ``pynvml.NVMLError`` classes (importing ``pynvml`` does not load the driver), so
code under test cannot tell it apart. Errors are injected, never patched in::

    nvml = FakeNvml([FakeGpu("NVIDIA H200", memory_total_mb=143771)],
                    unsupported={"power_w"})          # power reads raise NOT_SUPPORTED
    FakeNvml(init_error="library_not_found")          # a host without the driver
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

MIB = 1024 * 1024

# Fields a test may mark unsupported, and the NVML call that reads each one.
READINGS = {
    "uuid": "nvmlDeviceGetUUID",
    "name": "nvmlDeviceGetName",
    "memory": "nvmlDeviceGetMemoryInfo",
    "compute_capability": "nvmlDeviceGetCudaComputeCapability",
    "utilization_pct": "nvmlDeviceGetUtilizationRates",
    "temperature_c": "nvmlDeviceGetTemperature",
    "power_w": "nvmlDeviceGetPowerUsage",
    "driver_version": "nvmlSystemGetDriverVersion",
    "cuda_version": "nvmlSystemGetCudaDriverVersion",
}

_INIT_ERRORS = {
    "library_not_found": "NVML_ERROR_LIBRARY_NOT_FOUND",
    "driver_not_loaded": "NVML_ERROR_DRIVER_NOT_LOADED",
    "no_permission": "NVML_ERROR_NO_PERMISSION",
}


@dataclass
class FakeGpu:
    """One simulated GPU; change ``memory_used_mb`` etc. between reads to simulate load."""

    name: str = "NVIDIA H200"
    memory_total_mb: int = 143771
    memory_used_mb: int = 512
    uuid: str | None = None  # default: derived from the index
    compute_capability: tuple[int, int] = (9, 0)
    utilization_pct: int = 0
    temperature_c: int = 35
    power_w: float = 75.0
    unsupported: set[str] = field(default_factory=set)  # READINGS keys that raise NOT_SUPPORTED
    lost: bool = False  # every call on this GPU raises GPU_IS_LOST


class FakeNvml:
    """A configurable fake of the ``pynvml`` module (see the module docstring).

    Contract: ``nvmlInit``/``nvmlShutdown`` are reference-counted like NVML's; device
    calls before ``nvmlInit`` raise ``NVMLError_Uninitialized``. ``calls`` records each
    function name called, in order.
    """

    def __init__(
        self,
        gpus: Iterable[FakeGpu] = (),
        *,
        driver_version: str = "550.54.15",
        cuda_driver_version: int = 12040,
        init_error: str | None = None,
        unsupported: Iterable[str] = (),
        bytes_strings: bool = False,
    ) -> None:
        import pynvml  # the real error classes and constants; this does not load libnvidia-ml

        self._pynvml = pynvml
        self.NVMLError = pynvml.NVMLError
        self.NVMLError_LibraryNotFound = pynvml.NVMLError_LibraryNotFound
        self.NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
        for name in dir(pynvml):
            if name.startswith("NVML_ERROR_") or name.startswith("NVMLError_"):
                setattr(self, name, getattr(pynvml, name))
        self.gpus = list(gpus)
        for i, gpu in enumerate(self.gpus):
            if gpu.uuid is None:
                gpu.uuid = f"GPU-{i:08x}-fake-4000-8000-{i:012x}"
        if init_error is not None and init_error not in _INIT_ERRORS:
            raise ValueError(f"init_error must be one of {sorted(_INIT_ERRORS)}, not {init_error!r}")
        self.driver_version = driver_version
        self.cuda_driver_version = cuda_driver_version
        self.init_error = init_error
        self.unsupported = set(unsupported)  # applies to every GPU (and the system calls)
        self.bytes_strings = bytes_strings
        self.init_count = 0
        self.calls: list[str] = []

    # -- helpers ---------------------------------------------------------------------

    def _error(self, code_name: str) -> Exception:
        return self._pynvml.NVMLError(getattr(self._pynvml, code_name))

    def _text(self, value: str) -> str | bytes:
        return value.encode() if self.bytes_strings else value

    def _enter(self, fn: str, reading: str | None = None, handle: Any = None) -> FakeGpu | None:
        self.calls.append(fn)
        if self.init_count <= 0:
            raise self._error("NVML_ERROR_UNINITIALIZED")
        gpu = handle.gpu if handle is not None else None
        if gpu is not None and gpu.lost:
            raise self._error("NVML_ERROR_GPU_IS_LOST")
        if reading is not None and (reading in self.unsupported or (gpu is not None and reading in gpu.unsupported)):
            raise self._error("NVML_ERROR_NOT_SUPPORTED")
        return gpu

    def _device(self, fn: str, reading: str, handle: Any) -> FakeGpu:
        """:meth:`_enter` for a device function: a handle without a GPU is refused as NVML does."""
        gpu = self._enter(fn, reading, handle)
        if gpu is None:
            raise self._error("NVML_ERROR_INVALID_ARGUMENT")
        return gpu

    # -- the pynvml functions miner.host.nvml uses ----------------------------------------

    def nvmlInit(self) -> None:
        self.calls.append("nvmlInit")
        if self.init_error is not None:
            raise self._error(_INIT_ERRORS[self.init_error])
        self.init_count += 1

    def nvmlShutdown(self) -> None:
        self.calls.append("nvmlShutdown")
        if self.init_count <= 0:
            raise self._error("NVML_ERROR_UNINITIALIZED")
        self.init_count -= 1

    def nvmlSystemGetDriverVersion(self) -> str | bytes:
        self._enter("nvmlSystemGetDriverVersion", "driver_version")
        return self._text(self.driver_version)

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._enter("nvmlSystemGetCudaDriverVersion", "cuda_version")
        return self.cuda_driver_version

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> SimpleNamespace:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise self._error("NVML_ERROR_INVALID_ARGUMENT")
        if self.gpus[index].lost:
            raise self._error("NVML_ERROR_GPU_IS_LOST")
        return SimpleNamespace(index=index, gpu=self.gpus[index])

    def nvmlDeviceGetUUID(self, handle: SimpleNamespace) -> str | bytes:
        gpu = self._device("nvmlDeviceGetUUID", "uuid", handle)
        return self._text(gpu.uuid or "")  # never empty: the constructor fills in a missing uuid

    def nvmlDeviceGetName(self, handle: SimpleNamespace) -> str | bytes:
        gpu = self._device("nvmlDeviceGetName", "name", handle)
        return self._text(gpu.name)

    def nvmlDeviceGetMemoryInfo(self, handle: SimpleNamespace) -> SimpleNamespace:
        gpu = self._device("nvmlDeviceGetMemoryInfo", "memory", handle)
        total, used = gpu.memory_total_mb * MIB, gpu.memory_used_mb * MIB
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetCudaComputeCapability(self, handle: SimpleNamespace) -> tuple[int, int]:
        gpu = self._device("nvmlDeviceGetCudaComputeCapability", "compute_capability", handle)
        return gpu.compute_capability

    def nvmlDeviceGetUtilizationRates(self, handle: SimpleNamespace) -> SimpleNamespace:
        gpu = self._device("nvmlDeviceGetUtilizationRates", "utilization_pct", handle)
        return SimpleNamespace(gpu=gpu.utilization_pct, memory=0)

    def nvmlDeviceGetTemperature(self, handle: SimpleNamespace, sensor: int) -> int:
        gpu = self._device("nvmlDeviceGetTemperature", "temperature_c", handle)
        if sensor != self.NVML_TEMPERATURE_GPU:
            raise self._error("NVML_ERROR_INVALID_ARGUMENT")
        return gpu.temperature_c

    def nvmlDeviceGetPowerUsage(self, handle: SimpleNamespace) -> int:
        gpu = self._device("nvmlDeviceGetPowerUsage", "power_w", handle)
        return int(gpu.power_w * 1000)  # milliwatts, as NVML reports it


def h200s(count: int = 1, **kwargs: Any) -> FakeNvml:
    """A FakeNvml holding ``count`` idle H200s (the chip of the project's GPU checks)."""
    return FakeNvml([FakeGpu() for _ in range(count)], **kwargs)
