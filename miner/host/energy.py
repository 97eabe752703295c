"""GPU energy per job: NVML's energy counter, or power readings integrated where it is missing.

:class:`EnergyMeter` reads every GPU's energy in millijoules (:meth:`EnergyMeter.read`):
NVML's total energy counter (``nvmlDeviceGetTotalEnergyConsumption``, Volta and later) where
the GPU has it, else a counter of its own that integrates the power readings
(``nvmlDeviceGetPowerUsage``, trapezoids between successive reads; the daemon reads at every
job start and end and every heartbeat, so the samples are dense while jobs run).

A job's energy (:func:`job_energy`) is the advance of its GPUs' counters between its start
and its end, times its share of those GPUs' time: its ``gpu_seconds`` over the seconds
between the two reads, the way a batch's time is split over its jobs. Its ``energy_method`` is ``counter``,
``power_samples`` (any of its GPUs integrated) or ``none`` (the CPU, or no reading).

A counter that goes backwards (a GPU reset or a driver reload restarts it at zero) counts
from zero; an advance no GPU could draw (above :data:`MAX_PLAUSIBLE_W` over the interval)
is discarded; neither ever yields a negative or a huge figure.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runners.base import GpuInfo

# Well above any single GPU's board power (an H200 SXM is 700 W; a B200 1 kW).
MAX_PLAUSIBLE_W = 5000.0


@dataclass(frozen=True)
class EnergyReading:
    """One GPU's energy counter at a moment: millijoules, how they were counted, when."""

    mj: float
    method: str  # "counter" | "power_samples"
    at: float  # monotonic seconds


class EnergyMeter:
    """Per-GPU energy counters (see the module docstring). :meth:`read` blocks on NVML briefly:
    call it through ``asyncio.to_thread``. Thread-safe."""

    def __init__(self, nvml: Any, gpus: Sequence[GpuInfo], clock: Callable[[], float] = time.monotonic) -> None:
        self._nvml = nvml
        self._gpus = list(gpus)
        self._clock = clock
        self._lock = threading.Lock()
        self._integrated: dict[str, float] = {}  # uuid -> mJ integrated from power readings
        self._last_power: dict[str, tuple[float, float]] = {}  # uuid -> (at, watts)

    def read(self) -> dict[str, EnergyReading]:
        """Every GPU's counter now, by UUID; a GPU with neither counter nor power reading is left out."""
        out: dict[str, EnergyReading] = {}
        nvml = self._nvml
        with self._lock:
            for gpu in self._gpus:
                now = self._clock()
                try:
                    handle = nvml.nvmlDeviceGetHandleByIndex(gpu.index)
                except nvml.NVMLError:
                    continue
                try:
                    counter = float(nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
                    out[gpu.uuid] = EnergyReading(counter, "counter", now)
                    continue
                except (nvml.NVMLError, AttributeError):
                    pass
                try:
                    watts = float(nvml.nvmlDeviceGetPowerUsage(handle)) / 1000.0
                except (nvml.NVMLError, AttributeError):
                    continue
                total = self._integrated.get(gpu.uuid, 0.0)
                last = self._last_power.get(gpu.uuid)
                if last is not None:
                    at, before = last
                    total += max(now - at, 0.0) * (before + watts) / 2.0 * 1000.0
                self._integrated[gpu.uuid] = total
                self._last_power[gpu.uuid] = (now, watts)
                out[gpu.uuid] = EnergyReading(total, "power_samples", now)
        return out


def advance_mj(before: EnergyReading, after: EnergyReading) -> float | None:
    """Millijoules between two readings of one GPU; ``None`` when the advance is not believable."""
    if before.method != after.method:
        return None
    delta = after.mj - before.mj
    if delta < 0:  # the counter restarted (GPU reset, driver reload): count from zero
        delta = after.mj
    elapsed = max(after.at - before.at, 0.0)
    if delta > MAX_PLAUSIBLE_W * 1000.0 * (elapsed + 1.0):
        return None
    return delta


def job_energy(
    before: Mapping[str, EnergyReading],
    after: Mapping[str, EnergyReading],
    uuids: Sequence[str],
    gpu_seconds: float | None,
) -> tuple[float | None, str]:
    """``(energy_j, energy_method)`` of one job that ran on ``uuids`` between two reads.

    The job's share of a GPU's energy is ``gpu_seconds`` over the seconds between the two
    reads (1 when it ran alone, or when the runner reports no ``gpu_seconds``);
    ``(None, "none")`` on the CPU or when no GPU of the job has a believable reading.
    """
    if not uuids:
        return None, "none"
    total, methods = 0.0, set()
    for uuid in uuids:
        b, a = before.get(uuid), after.get(uuid)
        if b is None or a is None:
            continue
        delta = advance_mj(b, a)
        if delta is None:
            continue
        elapsed = a.at - b.at
        share = 1.0 if gpu_seconds is None or elapsed <= 0 else min(max(gpu_seconds / elapsed, 0.0), 1.0)
        total += delta * share
        methods.add(a.method)
    if not methods:
        return None, "none"
    method = "power_samples" if "power_samples" in methods else "counter"
    return round(total / 1000.0, 6), method
