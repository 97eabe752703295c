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

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from miner.wire.errors import ConfigError

MIB = 1024 * 1024

# Fields a test may mark unsupported, and the NVML call that reads each one.
READINGS = {
    "uuid": "nvmlDeviceGetUUID",
    "name": "nvmlDeviceGetName",
    "memory": "nvmlDeviceGetMemoryInfo",
    "compute_capability": "nvmlDeviceGetCudaComputeCapability",
    "pci_bus_id": "nvmlDeviceGetPciInfo",
    "energy_mj": "nvmlDeviceGetTotalEnergyConsumption",
    "ecc": "nvmlDeviceGetTotalEccErrors",
    "retired_pages": "nvmlDeviceGetRetiredPagesPendingStatus",
    "throttle": "nvmlDeviceGetCurrentClocksEventReasons",
    "pcie": "nvmlDeviceGetCurrPcieLinkWidth",
    "events": "nvmlEventSetCreate",
    "utilization_pct": "nvmlDeviceGetUtilizationRates",
    "temperature_c": "nvmlDeviceGetTemperature",
    "power_w": "nvmlDeviceGetPowerUsage",
    "driver_version": "nvmlSystemGetDriverVersion",
    "cuda_version": "nvmlSystemGetCudaDriverVersion",
}

# pynvml's constants the fake module carries, as the real one does (values from pynvml itself).
_CONSTANT_PREFIXES = ("NVML_", "nvmlClocksThrottleReason", "nvmlClocksEventReason", "nvmlEventType")

_THROTTLE_BITS = {
    "sw_thermal": "nvmlClocksThrottleReasonSwThermalSlowdown",
    "hw_thermal": "nvmlClocksThrottleReasonHwThermalSlowdown",
    "hw_slowdown": "nvmlClocksThrottleReasonHwSlowdown",
    "power_brake": "nvmlClocksThrottleReasonHwPowerBrakeSlowdown",
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
    pci_bus_id: str | None = None  # default: derived from the index
    energy_mj: int = 0  # NVML's total energy counter (millijoules since the driver loaded)
    ecc_uncorrected: int = 0
    retired_pending: bool = False
    xid: list[int] = field(default_factory=list)  # every critical Xid so far; new ones are delivered as events
    throttle: list[str] = field(default_factory=list)  # sw_thermal, hw_thermal, hw_slowdown, power_brake
    pcie_width: int = 16
    pcie_max_width: int = 16
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
            elif name.startswith(_CONSTANT_PREFIXES) and isinstance(getattr(pynvml, name), int):
                setattr(self, name, getattr(pynvml, name))  # the constants the health readings use
        self.gpus = list(gpus)
        for i, gpu in enumerate(self.gpus):
            if gpu.uuid is None:
                gpu.uuid = f"GPU-{i:08x}-fake-4000-8000-{i:012x}"
            if gpu.pci_bus_id is None:
                gpu.pci_bus_id = f"00000000:{0x18 + i:02X}:00.0"
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

    def nvmlDeviceGetPciInfo(self, handle: SimpleNamespace) -> SimpleNamespace:
        gpu = self._device("nvmlDeviceGetPciInfo", "pci_bus_id", handle)
        bus_id = gpu.pci_bus_id or ""
        return SimpleNamespace(busId=self._text(bus_id), busIdLegacy=self._text(bus_id[4:]))

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: SimpleNamespace) -> int:
        gpu = self._device("nvmlDeviceGetTotalEnergyConsumption", "energy_mj", handle)
        return int(gpu.energy_mj)

    def nvmlDeviceGetTotalEccErrors(self, handle: SimpleNamespace, error_type: int, counter_type: int) -> int:
        gpu = self._device("nvmlDeviceGetTotalEccErrors", "ecc", handle)
        nvml = self._pynvml
        if error_type != nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED or counter_type != nvml.NVML_VOLATILE_ECC:
            return 0
        return int(gpu.ecc_uncorrected)

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: SimpleNamespace) -> int:
        gpu = self._device("nvmlDeviceGetRetiredPagesPendingStatus", "retired_pages", handle)
        return self._pynvml.NVML_FEATURE_ENABLED if gpu.retired_pending else self._pynvml.NVML_FEATURE_DISABLED

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: SimpleNamespace) -> int:
        gpu = self._device("nvmlDeviceGetCurrentClocksEventReasons", "throttle", handle)
        return sum(getattr(self._pynvml, _THROTTLE_BITS[name]) for name in set(gpu.throttle) if name in _THROTTLE_BITS)

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle: SimpleNamespace) -> int:
        return int(self._device("nvmlDeviceGetCurrPcieLinkWidth", "pcie", handle).pcie_width)

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle: SimpleNamespace) -> int:
        return int(self._device("nvmlDeviceGetMaxPcieLinkWidth", "pcie", handle).pcie_max_width)

    # -- critical Xid events: each entry of a GPU's ``xid`` list is delivered once ----------

    def nvmlEventSetCreate(self) -> SimpleNamespace:
        self._enter("nvmlEventSetCreate", "events")
        return SimpleNamespace(devices=[], delivered={})

    def nvmlDeviceRegisterEvents(self, handle: SimpleNamespace, event_types: int, event_set: SimpleNamespace) -> None:
        self._device("nvmlDeviceRegisterEvents", "events", handle)
        event_set.devices.append(handle.index)

    def nvmlEventSetWait_v2(self, event_set: SimpleNamespace, timeout_ms: int) -> SimpleNamespace:
        self._enter("nvmlEventSetWait_v2", "events")
        for index in event_set.devices:
            if index >= len(self.gpus):
                continue
            gpu = self.gpus[index]
            seen = event_set.delivered.get(gpu.uuid, 0)
            if len(gpu.xid) > seen:
                event_set.delivered[gpu.uuid] = seen + 1
                return SimpleNamespace(
                    device=SimpleNamespace(index=index, gpu=gpu),
                    eventType=self._pynvml.nvmlEventTypeXidCriticalError,
                    eventData=gpu.xid[seen],
                    gpuInstanceId=0xFFFFFFFF,
                    computeInstanceId=0xFFFFFFFF,
                )
        raise self._error("NVML_ERROR_TIMEOUT")

    def nvmlEventSetFree(self, event_set: SimpleNamespace) -> None:
        self.calls.append("nvmlEventSetFree")


def h200s(count: int = 1, **kwargs: Any) -> FakeNvml:
    """A FakeNvml holding ``count`` idle H200s (the chip of the project's GPU checks)."""
    return FakeNvml([FakeGpu() for _ in range(count)], **kwargs)


# -- a simulated GPU host read from a JSON file -------------------------------------------

FAKE_NVML_ENV = "AITBC_MINER_FAKE_NVML"


class FileNvml(FakeNvml):
    """A :class:`FakeNvml` whose GPUs come from a JSON file, re-read at every NVML poll.

    The file (``AITBC_MINER_FAKE_NVML=FILE``, see ``docs/configuration.md``)::

        {"driver": "580.65.06", "cuda": "13.0",
         "gpus": [{"index": 0, "uuid": "GPU-...", "name": "NVIDIA H200", "memory_mb": 143771,
                   "free_mb": 140000, "pci_bus_id": "00000000:18:00.0", "compute_capability": "9.0",
                   "utilization_pct": 0, "temperature_c": 35, "power_w": 90.0, "energy_mj": 1000,
                   "ecc_uncorrected": 0, "xid": [], "throttle": [], "pcie_width": 16, "pcie_max_width": 16}]}

    Extra keys are allowed. The file is read again by ``nvmlInit``, ``nvmlDeviceGetCount``
    and ``nvmlDeviceGetHandleByIndex`` (the start of every poll), so a test can change a GPU
    while the miner runs; a file that cannot be read or parsed mid-run (being rewritten)
    keeps the last good reading. A bad file at the first read is a :class:`ConfigError`
    naming the variable and the problem.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        super().__init__(_parse_host(self.path, _load_json(self.path)).gpus)
        self._reload(first=True)

    def _reload(self, first: bool = False) -> None:
        try:
            host = _parse_host(self.path, _load_json(self.path))
        except ConfigError:
            if first:
                raise
            return  # mid-rewrite: keep the last good reading
        self.gpus = host.gpus
        self.driver_version = host.driver
        self.cuda_driver_version = host.cuda

    def nvmlInit(self) -> None:
        self._reload()
        super().nvmlInit()

    def nvmlDeviceGetCount(self) -> int:
        self._reload()
        return super().nvmlDeviceGetCount()

    def nvmlDeviceGetHandleByIndex(self, index: int) -> SimpleNamespace:
        self._reload()
        return super().nvmlDeviceGetHandleByIndex(index)


@dataclass
class _Host:
    driver: str
    cuda: int
    gpus: list[FakeGpu]


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{FAKE_NVML_ENV}: cannot read {path}: {exc.strerror}; point it at the JSON file") from exc
    except ValueError as exc:
        raise ConfigError(f"{FAKE_NVML_ENV}: {path} is not valid JSON ({exc}); fix the file") from exc


def _cuda_int(text: Any) -> int:
    major, _, minor = str(text).partition(".")
    return int(major) * 1000 + int(minor or 0) * 10


def _parse_host(path: Path, data: Any) -> _Host:
    """The simulated host of ``data``; ConfigError naming the bad key."""

    def bad(where: str, why: str) -> ConfigError:
        return ConfigError(f"{FAKE_NVML_ENV}: {path}: {where} {why}; see the simulated GPU host format in the docs")

    if not isinstance(data, dict) or not isinstance(data.get("gpus"), list):
        raise bad("the top level", 'must be an object with a "gpus" list')
    try:
        cuda = _cuda_int(data.get("cuda", "12.4"))
    except ValueError:
        raise bad('"cuda"', f"is {data.get('cuda')!r}, not a version like \"13.0\"") from None
    gpus: list[FakeGpu] = []
    entries = sorted(data["gpus"], key=lambda g: g.get("index", 0) if isinstance(g, dict) else 0)
    for position, entry in enumerate(entries):
        where = f"gpus[{position}]"
        if not isinstance(entry, dict):
            raise bad(where, "must be an object")
        try:
            total = int(entry.get("memory_mb", 81920))
            free = int(entry.get("free_mb", total))
            cc = str(entry.get("compute_capability", "9.0")).split(".")
            gpus.append(
                FakeGpu(
                    name=str(entry.get("name", "NVIDIA H200")),
                    memory_total_mb=total,
                    memory_used_mb=max(total - free, 0),
                    uuid=str(entry["uuid"]) if entry.get("uuid") else None,
                    compute_capability=(int(cc[0]), int(cc[1]) if len(cc) > 1 else 0),
                    utilization_pct=int(entry.get("utilization_pct", 0)),
                    temperature_c=int(entry.get("temperature_c", 35)),
                    power_w=float(entry.get("power_w", 75.0)),
                    pci_bus_id=str(entry["pci_bus_id"]) if entry.get("pci_bus_id") else None,
                    energy_mj=int(entry.get("energy_mj") or 0),
                    ecc_uncorrected=int(entry.get("ecc_uncorrected", 0)),
                    retired_pending=bool(entry.get("retired_pending", False)),
                    xid=[int(x) for x in entry.get("xid", [])],
                    throttle=[str(t) for t in entry.get("throttle", [])],
                    pcie_width=int(entry.get("pcie_width", 16)),
                    pcie_max_width=int(entry.get("pcie_max_width", 16)),
                    # "energy_mj": null is a GPU without the energy counter (before Volta);
                    # "unsupported": [...] names any READINGS the GPU cannot give.
                    unsupported={str(u) for u in entry.get("unsupported", [])}
                    | ({"energy_mj"} if "energy_mj" in entry and entry["energy_mj"] is None else set()),
                )
            )
        except (TypeError, ValueError, IndexError) as exc:
            raise bad(where, f"has a value of the wrong type ({exc})") from None
    for i, gpu in enumerate(gpus):
        if gpu.uuid is None:
            gpu.uuid = f"GPU-{i:08x}-fake-4000-8000-{i:012x}"
        if gpu.pci_bus_id is None:
            gpu.pci_bus_id = f"00000000:{0x18 + i:02X}:00.0"
    return _Host(driver=str(data.get("driver", "550.54.15")), cuda=cuda, gpus=gpus)


def simulated_host_warning(path: str | Path) -> str:
    """The line printed (and logged) whenever the simulated GPU host is in use."""
    return (
        f"SIMULATED GPU HOST: GPUs are read from {path} ({FAKE_NVML_ENV}), not from the NVIDIA driver; "
        f"unset {FAKE_NVML_ENV} on a real miner"
    )


def nvml_from_env(environ: Mapping[str, str] | None = None) -> tuple[Any | None, str | None]:
    """``(FileNvml, warning line)`` when ``AITBC_MINER_FAKE_NVML`` names a file, else ``(None, None)``."""
    path = (os.environ if environ is None else environ).get(FAKE_NVML_ENV, "").strip()
    if not path:
        return None, None
    return FileNvml(path), simulated_host_warning(path)
