"""Sick GPUs: NVML's health readings, and which GPUs stop taking new jobs.

Every ``gpus.health_poll_s`` the daemon reads, per GPU (:func:`read_health`):

==================  ==========================================================  ==========
check               reading                                                     clears
==================  ==========================================================  ==========
``ecc``             uncorrected ECC errors, volatile counter (since the driver  restart
                    loaded)
``retired_pages``   pages pending retirement, or rows pending remapping (A100+)  restart
``xid``             a critical Xid event in ``gpus.critical_xids`` (NVML event   restart
                    set, where the driver supports it)
``thermal``         clocks held down by thermal slowdown (software or hardware)  on its own
``power_brake``     the hardware power brake (an external power-supply signal)   on its own
``pcie``            a PCIe link narrower than its maximum width                  on its own
==================  ==========================================================  ==========

:class:`GpuHealthMonitor` decides: a GPU with any trouble in ``gpus.drain_on`` is
*drained*: its running jobs finish, it takes no new ones. Trouble that clears on its own
must stay clear for ``gpus.recover_after_s`` before the GPU serves again; ECC, pending
page retirement and Xid errors keep it drained until the miner restarts (after the GPU
has been reset, as NVIDIA advises). A reading NVML cannot give (``NOT_SUPPORTED``) is no
trouble. Nothing here blocks the event loop for long, but NVML calls do block: the daemon
calls :func:`read_health` through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from runners.base import GpuInfo

log = structlog.get_logger("miner.host.gpuhealth")

CHECKS = ("ecc", "retired_pages", "xid", "thermal", "power_brake", "pcie")
STICKY = frozenset({"ecc", "retired_pages", "xid"})  # cleared only by a restart
# Xids that mean the hardware (not a job's own kernel) is in trouble: double-bit ECC (48), page
# retirement and row remapping (63, 64), NVLink (74), fallen off the bus (79), high single-bit
# ECC rate (92), contained and uncontained ECC (94, 95), GSP errors (119, 120), and the internal
# micro-controller faults 61, 62, 68, 69.
DEFAULT_CRITICAL_XIDS = (48, 61, 62, 63, 64, 68, 69, 74, 79, 92, 94, 95, 119, 120)

# NVML's clocks-event (throttle) reason bits, as pynvml names them.
_THERMAL_BITS = {
    "nvmlClocksThrottleReasonSwThermalSlowdown": "sw_thermal",
    "nvmlClocksThrottleReasonHwThermalSlowdown": "hw_thermal",
    "nvmlClocksThrottleReasonHwSlowdown": "hw_slowdown",
}
_POWER_BRAKE_BIT = "nvmlClocksThrottleReasonHwPowerBrakeSlowdown"
THROTTLE_NAMES = (*_THERMAL_BITS.values(), "power_brake")


@dataclass(frozen=True)
class HealthReading:
    """One GPU's health readings; ``None`` where NVML cannot say."""

    index: int
    uuid: str
    ecc_uncorrected: int | None = None
    retired_pending: bool | None = None
    xids: tuple[int, ...] = ()  # critical Xid events since the last reading
    throttle: tuple[str, ...] = ()  # THROTTLE_NAMES currently active
    pcie_width: int | None = None
    pcie_max_width: int | None = None


def _call(nvml: Any, fn: str, *args: Any) -> Any:
    func = getattr(nvml, fn, None)
    if func is None:
        return None
    try:
        return func(*args)
    except nvml.NVMLError:
        return None


def _throttle_names(nvml: Any, mask: int | None) -> tuple[str, ...]:
    if mask is None:
        return ()
    names = [name for attr, name in _THERMAL_BITS.items() if mask & int(getattr(nvml, attr, 0))]
    if mask & int(getattr(nvml, _POWER_BRAKE_BIT, 0)):
        names.append("power_brake")
    return tuple(names)


def read_one(nvml: Any, gpu: GpuInfo, xids: Sequence[int] = ()) -> HealthReading:
    """The readings of ``gpu`` (NVML initialised); ``xids`` come from an :class:`XidWatcher`."""
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(gpu.index)
    except nvml.NVMLError:
        return HealthReading(gpu.index, gpu.uuid, xids=tuple(xids))
    ecc = _call(
        nvml,
        "nvmlDeviceGetTotalEccErrors",
        handle,
        getattr(nvml, "NVML_MEMORY_ERROR_TYPE_UNCORRECTED", 1),
        getattr(nvml, "NVML_VOLATILE_ECC", 0),
    )
    pending = _call(nvml, "nvmlDeviceGetRetiredPagesPendingStatus", handle)
    remapped = _call(nvml, "nvmlDeviceGetRemappedRows", handle)  # (corrected, uncorrected, pending, failed)
    retired: bool | None = None
    if pending is not None:
        retired = int(pending) == int(getattr(nvml, "NVML_FEATURE_ENABLED", 1))
    if remapped is not None:
        retired = bool(retired) or bool(remapped[2]) or bool(remapped[3])
    mask = _call(nvml, "nvmlDeviceGetCurrentClocksEventReasons", handle)
    if mask is None:
        mask = _call(nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", handle)
    width = _call(nvml, "nvmlDeviceGetCurrPcieLinkWidth", handle)
    max_width = _call(nvml, "nvmlDeviceGetMaxPcieLinkWidth", handle)
    return HealthReading(
        index=gpu.index,
        uuid=gpu.uuid,
        ecc_uncorrected=int(ecc) if ecc is not None else None,
        retired_pending=retired,
        xids=tuple(xids),
        throttle=_throttle_names(nvml, int(mask) if mask is not None else None),
        pcie_width=int(width) if width is not None else None,
        pcie_max_width=int(max_width) if max_width is not None else None,
    )


class XidWatcher:
    """Critical Xid events through an NVML event set (where the driver supports one).

    :meth:`drain` returns the events that arrived since the last call, by NVML index,
    without waiting. Without event support (or NVML), it returns nothing, always.
    """

    def __init__(self, nvml: Any, gpus: Sequence[GpuInfo]) -> None:
        self._nvml = nvml
        self._set: Any = None
        self._by_uuid = {g.uuid: g.index for g in gpus}
        self._lock = threading.Lock()
        create = getattr(nvml, "nvmlEventSetCreate", None)
        if create is None:
            return
        try:
            self._set = create()
        except nvml.NVMLError as exc:
            log.info("xid_events_unsupported", error=str(exc))
            return
        kind = int(getattr(nvml, "nvmlEventTypeXidCriticalError", 8))
        for gpu in gpus:
            try:
                nvml.nvmlDeviceRegisterEvents(nvml.nvmlDeviceGetHandleByIndex(gpu.index), kind, self._set)
            except nvml.NVMLError as exc:
                log.info("xid_events_unsupported", gpu=gpu.index, error=str(exc))

    def drain(self) -> dict[int, list[int]]:
        if self._set is None:
            return {}
        found: dict[int, list[int]] = {}
        with self._lock:
            for _ in range(256):  # a bound, should a driver flood events
                try:
                    event = self._nvml.nvmlEventSetWait_v2(self._set, 0)
                except self._nvml.NVMLError:  # TIMEOUT: nothing more waiting
                    break
                index = self._index_of(event)
                if index is not None:
                    found.setdefault(index, []).append(int(event.eventData))
        return found

    def _index_of(self, event: Any) -> int | None:
        uuid = _call(self._nvml, "nvmlDeviceGetUUID", event.device)
        if uuid is None:
            return getattr(event.device, "index", None)
        text = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
        return self._by_uuid.get(text)

    def close(self) -> None:
        with self._lock:
            if self._set is not None:
                with contextlib.suppress(Exception):
                    self._nvml.nvmlEventSetFree(self._set)
                self._set = None


def read_health(nvml: Any, gpus: Iterable[GpuInfo], watcher: XidWatcher | None = None) -> list[HealthReading]:
    """Fresh readings for every GPU (NVML initialised)."""
    events = watcher.drain() if watcher is not None else {}
    return [read_one(nvml, gpu, events.get(gpu.index, ())) for gpu in gpus]


@dataclass
class GpuState:
    """What the monitor knows of one GPU."""

    index: int
    uuid: str
    troubles: dict[str, str] = field(default_factory=dict)  # check -> reason, active now (or sticky)
    clear_since: float | None = None  # when the last transient trouble cleared
    drained: bool = False

    def reason(self) -> str:
        return "; ".join(self.troubles.values())


@dataclass(frozen=True)
class HealthChange:
    index: int
    uuid: str
    drained: bool
    reason: str


class GpuHealthMonitor:
    """Which GPUs serve, from successive :class:`HealthReading` lists (see the module docstring)."""

    def __init__(
        self,
        gpus: Sequence[GpuInfo],
        *,
        drain_on: Collection[str] = CHECKS,
        critical_xids: Collection[int] = DEFAULT_CRITICAL_XIDS,
        recover_after_s: float = 60.0,
    ) -> None:
        self.drain_on = frozenset(drain_on)
        self.critical_xids = frozenset(critical_xids)
        self.recover_after_s = recover_after_s
        self.gpus = {g.index: GpuState(g.index, g.uuid) for g in gpus}
        self._by_uuid = {state.uuid: state for state in self.gpus.values()}

    def usable(self, index: int) -> bool:
        state = self.gpus.get(index)
        return state is None or not state.drained

    def serving(self, uuid: str) -> bool:
        """Whether the GPU with ``uuid`` may take new jobs (an unknown UUID: yes)."""
        state = self._by_uuid.get(uuid)
        return state is None or not state.drained

    def drained(self) -> dict[int, str]:
        """NVML index -> reason, for every drained GPU."""
        return {i: s.reason() or "recovering" for i, s in self.gpus.items() if s.drained}

    def any_serving(self) -> bool:
        return not self.gpus or any(not s.drained for s in self.gpus.values())

    def troubles(self, reading: HealthReading) -> dict[str, str]:
        """The checks ``reading`` fails, each with a reason an owner can act on."""
        found: dict[str, str] = {}
        if reading.ecc_uncorrected:
            found["ecc"] = f"{reading.ecc_uncorrected} uncorrected ECC error(s); reset the GPU, then restart the miner"
        if reading.retired_pending:
            found["retired_pages"] = "memory pages or rows pending retirement; reset the GPU, then restart the miner"
        critical = [x for x in reading.xids if x in self.critical_xids]
        if critical:
            found["xid"] = f"critical Xid {', '.join(map(str, critical))}; check the kernel log, reset the GPU"
        thermal = [t for t in reading.throttle if t != "power_brake"]
        if thermal:
            found["thermal"] = f"thermal slowdown ({', '.join(thermal)}); check cooling"
        if "power_brake" in reading.throttle:
            found["power_brake"] = "hardware power brake engaged; check the power supply"
        if reading.pcie_width and reading.pcie_max_width and reading.pcie_width < reading.pcie_max_width:
            found["pcie"] = f"PCIe link x{reading.pcie_width} of x{reading.pcie_max_width}; reseat the card or riser"
        return {check: why for check, why in found.items() if check in self.drain_on}

    def observe(self, readings: Iterable[HealthReading], now: float) -> list[HealthChange]:
        """Fold in fresh readings; the GPUs whose drained state changed."""
        changes = []
        for reading in readings:
            state = self.gpus.get(reading.index)
            if state is None:
                continue
            current = self.troubles(reading)
            sticky = {c: why for c, why in state.troubles.items() if c in STICKY}
            had_transient = any(c not in STICKY for c in state.troubles)
            state.troubles = {**current, **{c: why for c, why in sticky.items() if c not in current}}
            transient_now = any(c not in STICKY for c in current)
            if had_transient and not transient_now:
                state.clear_since = now
            was = state.drained
            if state.troubles:
                state.drained = True
                if transient_now:
                    state.clear_since = None
            elif state.drained:
                cleared = state.clear_since if state.clear_since is not None else now
                state.clear_since = cleared
                state.drained = now - cleared < self.recover_after_s
            if state.drained != was:
                reason = state.reason() or f"clear for {self.recover_after_s:g} s"
                changes.append(HealthChange(state.index, state.uuid, state.drained, reason))
        return changes

    def report(self) -> list[dict[str, Any]]:
        """Per GPU, for heartbeats, ``/metrics`` and ``/healthz``: index, uuid, state (``ok`` or
        ``drained``), checks (failing now, or sticky until a restart), reason (when drained)."""
        out = []
        for state in self.gpus.values():
            entry: dict[str, Any] = {"index": state.index, "uuid": state.uuid}
            entry["state"] = "drained" if state.drained else "ok"
            entry["checks"] = sorted(state.troubles)
            if state.drained:
                entry["reason"] = state.reason() or f"recovering: serves again after {self.recover_after_s:g} s clear"
            out.append(entry)
        return out


def health_now(
    nvml: Any,
    gpus: Sequence[GpuInfo],
    *,
    drain_on: Collection[str] = CHECKS,
    critical_xids: Collection[int] = DEFAULT_CRITICAL_XIDS,
) -> list[dict[str, Any]]:
    """One reading of every GPU judged as the daemon would judge it (for ``probe``; NVML initialised).

    Xid events are not read here (they arrive while the daemon runs)."""
    monitor = GpuHealthMonitor(gpus, drain_on=drain_on, critical_xids=critical_xids)
    monitor.observe(read_health(nvml, gpus), now=0.0)
    return monitor.report()
