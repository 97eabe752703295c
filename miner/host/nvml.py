"""GPU facts through NVML (the ``pynvml`` module of ``nvidia-ml-py``).

Every function takes the NVML module as a parameter (``None`` imports ``pynvml`` lazily),
so tests pass :class:`miner.host.fakenvml.FakeNvml` instead. NVML calls block for a few
microseconds to milliseconds: the daemon runs them through ``asyncio.to_thread``.

A host without the NVIDIA driver is not an error: one log line
(``no NVIDIA driver found (NVML: ...); running in CPU mode``) and an empty GPU list, unless
``gpus.devices`` names GPUs: then nothing could serve them, and it is a ConfigError. A
reading a GPU does not support (NVML ``NOT_SUPPORTED``, e.g. power on some boards) is
``None`` in :class:`~runners.base.GpuInfo`, never a crash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import structlog

from miner.wire.errors import ConfigError
from runners.base import GpuInfo
from runners.placement import describe_gpus, find_gpu

log = structlog.get_logger("miner.host.nvml")

MIB = 1024 * 1024

__all__ = [
    "Nvml",
    "free_vram_mb",
    "probe_gpus",
    "read_gpu_stats",
]


def _import_nvml() -> Any:
    import pynvml  # nvidia-ml-py; importing it does not load libnvidia-ml

    return pynvml


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _read(nvml: Any, fn: str, *args: Any) -> Any:
    """Call ``nvml.<fn>(*args)``; an NVMLError (NOT_SUPPORTED, ...) gives ``None``."""
    try:
        return getattr(nvml, fn)(*args)
    except nvml.NVMLError as exc:
        log.debug("nvml_reading_unavailable", call=fn, error=str(exc))
        return None


def format_cuda_version(value: int | None) -> str | None:
    """NVML's CUDA driver version integer -> ``"major.minor"`` (12040 -> ``"12.4"``)."""
    if not isinstance(value, int) or value <= 0:
        return None
    return f"{value // 1000}.{(value % 1000) // 10}"


def _init(nvml: Any) -> str | None:
    """``nvmlInit``; the reason as a string when NVML cannot start (no driver), else None."""
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return str(exc)
    except OSError as exc:  # a broken libnvidia-ml can surface as a loader error
        return str(exc)
    return None


def _no_driver(reason: str, devices: Sequence[int | str] = ()) -> None:
    """No NVML: CPU mode, unless the owner named GPUs (then nothing can serve them: an error)."""
    if devices:
        wanted = ", ".join(repr(d) for d in devices)
        raise ConfigError(
            f"gpus.devices: GPU {wanted} configured, but NVML cannot see any GPU ({reason}); install or load the "
            "NVIDIA driver, or for CPU mode set gpus.enabled = false and leave gpus.devices empty"
        )
    log.warning("no_nvidia_driver_cpu_mode", reason=reason)


def _read_stats(nvml: Any, handle: Any, gpu: GpuInfo) -> GpuInfo:
    memory = _read(nvml, "nvmlDeviceGetMemoryInfo", handle)
    util = _read(nvml, "nvmlDeviceGetUtilizationRates", handle)
    temp = _read(nvml, "nvmlDeviceGetTemperature", handle, nvml.NVML_TEMPERATURE_GPU)
    power_mw = _read(nvml, "nvmlDeviceGetPowerUsage", handle)
    return dataclasses.replace(
        gpu,
        memory_total_mb=int(memory.total) // MIB if memory is not None else gpu.memory_total_mb,
        memory_free_mb=int(memory.free) // MIB if memory is not None else None,
        utilization_pct=float(util.gpu) if util is not None else None,
        temperature_c=float(temp) if temp is not None else None,
        power_w=power_mw / 1000.0 if power_mw is not None else None,
    )


def _probe_one(nvml: Any, index: int, driver: str | None, cuda: str | None) -> GpuInfo | None:
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
    except nvml.NVMLError as exc:
        log.warning("gpu_unusable_skipped", gpu=index, error=str(exc))
        return None
    uuid = _read(nvml, "nvmlDeviceGetUUID", handle)
    name = _read(nvml, "nvmlDeviceGetName", handle)
    cc = _read(nvml, "nvmlDeviceGetCudaComputeCapability", handle)
    pci = _read(nvml, "nvmlDeviceGetPciInfo", handle)
    base = GpuInfo(
        index=index,
        uuid=_text(uuid) if uuid is not None else f"GPU-index-{index}",
        name=_text(name) if name is not None else "unknown NVIDIA GPU",
        memory_total_mb=0,
        driver_version=driver,
        cuda_version=cuda,
        compute_capability=f"{cc[0]}.{cc[1]}" if cc is not None else None,
        pci_bus_id=_text(pci.busId) if pci is not None else None,
    )
    return _read_stats(nvml, handle, base)


def _select(gpus: list[GpuInfo], devices: Sequence[int | str]) -> list[GpuInfo]:
    if not devices:
        return gpus
    chosen: list[GpuInfo] = []
    for wanted in devices:
        gpu = find_gpu(wanted, gpus)
        if gpu is None:
            raise ConfigError(
                f"gpus.devices: no GPU {wanted!r} on this host (found: {describe_gpus(gpus)}); "
                "list GPU indices or UUIDs from `aitbc-miner probe`, or leave gpus.devices empty for all"
            )
        if gpu not in chosen:
            chosen.append(gpu)
    return chosen


def probe_gpus(nvml: Any = None, devices: Sequence[int | str] = ()) -> list[GpuInfo]:
    """Every GPU NVML sees (or those ``devices`` selects by index or UUID), fully read.

    Without a driver: one warning line and ``[]`` (a :class:`ConfigError` when ``devices``
    names GPUs: nothing could serve them). An unknown entry in ``devices`` raises
    :class:`ConfigError` naming ``gpus.devices``. Initialises and shuts NVML down itself
    (NVML counts references, so a long-lived :class:`Nvml` stays valid).
    """
    if nvml is None:
        try:
            nvml = _import_nvml()
        except ImportError as exc:
            _no_driver(f"the pynvml module is missing ({exc}); pip install nvidia-ml-py", devices)
            return []
    reason = _init(nvml)
    if reason is not None:
        _no_driver(reason, devices)
        return []
    try:
        driver = _read(nvml, "nvmlSystemGetDriverVersion")
        cuda = format_cuda_version(_read(nvml, "nvmlSystemGetCudaDriverVersion"))
        count = _read(nvml, "nvmlDeviceGetCount") or 0
        driver_text = _text(driver) if driver is not None else None
        gpus = [g for i in range(count) if (g := _probe_one(nvml, i, driver_text, cuda)) is not None]
        return _select(gpus, devices)
    finally:
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlShutdown()


def read_gpu_stats(nvml: Any, gpus: Iterable[GpuInfo]) -> list[GpuInfo]:
    """Fresh memory, utilisation, temperature and power for ``gpus`` (NVML already initialised).

    A GPU whose handle cannot be had keeps its identity with the readings set to None.
    """
    out = []
    for gpu in gpus:
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(gpu.index)
        except nvml.NVMLError as exc:
            log.debug("nvml_handle_unavailable", gpu=gpu.index, error=str(exc))
            out.append(
                dataclasses.replace(gpu, memory_free_mb=None, utilization_pct=None, temperature_c=None, power_w=None)
            )
            continue
        out.append(_read_stats(nvml, handle, gpu))
    return out


def free_vram_mb(nvml: Any, index: int) -> int | None:
    """Free memory of GPU ``index`` in MiB, or None when NVML cannot say."""
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
    except nvml.NVMLError:
        return None
    memory = _read(nvml, "nvmlDeviceGetMemoryInfo", handle)
    return int(memory.free) // MIB if memory is not None else None


class Nvml:
    """NVML held open for the life of the daemon: probe once, then cheap readings.

    Contract: :meth:`start` initialises NVML once and returns the selected GPUs (``[]``
    and one log line without a driver; :class:`ConfigError` for an unknown
    ``gpus.devices`` entry). :meth:`read_stats` and :meth:`free_vram_mb` block briefly:
    call them through ``asyncio.to_thread``. :meth:`close` shuts NVML down once; calling
    it again, or without a successful start, does nothing.
    """

    def __init__(self, module: Any = None) -> None:
        self._module = module
        self._lock = threading.Lock()
        self._open = False
        self.gpus: list[GpuInfo] = []

    @property
    def available(self) -> bool:
        return self._open

    @property
    def module(self) -> Any:
        return self._module

    def start(self, devices: Sequence[int | str] = ()) -> list[GpuInfo]:
        with self._lock:
            if self._open:
                return list(self.gpus)
            if self._module is None:
                try:
                    self._module = _import_nvml()
                except ImportError as exc:
                    _no_driver(f"the pynvml module is missing ({exc}); pip install nvidia-ml-py", devices)
                    return []
            reason = _init(self._module)
            if reason is not None:
                _no_driver(reason, devices)
                return []
            self._open = True
        try:
            self.gpus = probe_gpus(self._module, devices)  # its own init/shutdown pair
        except BaseException:
            self.close()
            raise
        return list(self.gpus)

    def read_stats(self) -> list[GpuInfo]:
        """Fresh readings for the started GPUs (``[]`` in CPU mode)."""
        if not self._open:
            return []
        return read_gpu_stats(self._module, self.gpus)

    def free_vram_mb(self, index: int) -> int | None:
        if not self._open:
            return None
        return free_vram_mb(self._module, index)

    def free_vram_probe(self) -> Callable[[int], int | None] | None:
        """For :class:`~runners.base.RunnerContext.free_vram_mb`: a callable, or None on CPU."""
        return self.free_vram_mb if self._open else None

    def close(self) -> None:
        with self._lock:
            if not self._open:
                return
            self._open = False
            with contextlib.suppress(self._module.NVMLError):
                self._module.nvmlShutdown()
