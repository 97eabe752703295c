"""Where a configured model runs: which of the miner's GPUs, as NVML numbers them.

Every runner that uses GPUs places its models the same way (no torch here; a runner that
needs torch's numbering maps these GPUs by UUID or PCI bus id itself):

===============================  ==============================================================
the model's options              placement
===============================  ==============================================================
``device = "cpu"``               the CPU (the only way to get a CPU model on a GPU host)
``devices = [1]``                GPU 1, by index or UUID as ``aitbc-miner probe`` lists them
``devices = [0, 1]``             one copy sharded over GPUs 0 and 1 (a model too large for one)
``device = "cuda:N"``            the same as ``devices = [N]``
``device = "auto"``              one copy sharded over all of the miner's GPUs
neither                          one copy on each of the miner's GPUs (``gpus.devices``); the
                                 CPU when the miner has no GPU
===============================  ==============================================================

A GPU named on a model must be one of the miner's GPUs: anything else is a
:class:`~miner.wire.errors.ConfigError` naming the setting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from miner.wire.errors import ConfigError, ErrorCode, JobError
from runners.base import GpuInfo, RunnerContext

T = TypeVar("T")


@dataclass(frozen=True)
class Placement:
    """One copy of a model: the GPUs it uses (``()`` for the CPU)."""

    gpus: tuple[GpuInfo, ...] = ()

    @property
    def on_cpu(self) -> bool:
        return not self.gpus

    @property
    def key(self) -> str:
        """A stable name: ``cpu``, ``gpu0`` or ``gpu0+1`` (NVML indices)."""
        return "cpu" if not self.gpus else "gpu" + "+".join(str(g.index) for g in self.gpus)

    @property
    def uuids(self) -> tuple[str, ...]:
        return tuple(g.uuid for g in self.gpus)

    @property
    def gpu_uuid(self) -> str | None:
        """The receipt's ``gpu_uuid``: the first GPU (``None`` on the CPU)."""
        return self.gpus[0].uuid if self.gpus else None


def describe_gpus(gpus: Sequence[GpuInfo]) -> str:
    return ", ".join(f"{g.index} ({g.uuid})" for g in gpus) or "none"


def find_gpu(wanted: int | str, gpus: Sequence[GpuInfo]) -> GpuInfo | None:
    """The GPU ``wanted`` names: an NVML index (int or digits) or a UUID (case-insensitive)."""
    text = str(wanted).strip()
    for gpu in gpus:
        if (text.isdigit() and gpu.index == int(text)) or gpu.uuid.lower() == text.lower():
            return gpu
    return None


def place_model(
    where: str, gpus: Sequence[GpuInfo], devices: Sequence[int | str] | None = None, device: str | None = None
) -> list[Placement]:
    """The copies of one model (see the module docstring); ``where`` names its table in errors."""
    if device == "cpu":
        if devices:
            raise ConfigError(f'{where}: device = "cpu" and devices = {list(devices)} contradict; keep one')
        return [Placement()]
    setting = "devices"
    if devices is None and device is not None and device.startswith("cuda:"):
        devices, setting = [int(device.partition(":")[2])], "device"
    if devices is not None or device == "auto":
        if not gpus:
            setting = "devices" if devices is not None and setting == "devices" else "device"
            raise ConfigError(
                f"{where}.{setting}: asks for a GPU, but this miner has none (no NVIDIA driver, or "
                'gpus.enabled = false); set device = "cpu" for CPU mode'
            )
        if devices is None:
            return [Placement(tuple(gpus))]
        chosen: list[GpuInfo] = []
        for wanted in devices:
            gpu = find_gpu(wanted, gpus)
            if gpu is None:
                raise ConfigError(
                    f"{where}.{setting}: GPU {wanted!r} is not one of this miner's GPUs ({describe_gpus(gpus)}); "
                    "name GPUs from gpus.devices by index or UUID as `aitbc-miner probe` lists them"
                )
            if gpu not in chosen:
                chosen.append(gpu)
        return [Placement(tuple(chosen))]
    if not gpus:
        return [Placement()]
    return [Placement((gpu,)) for gpu in gpus]


def choose_copy(
    model: str,
    copies: Sequence[T],
    *,
    uuids: Callable[[T], Sequence[str]],
    order: Callable[[T], Any],
    context: RunnerContext,
    pin_gpu: str | None = None,
) -> T:
    """The copy of ``model`` a new job goes to: the first by ``order`` (e.g. least loaded) among
    those on GPUs that serve now (:meth:`RunnerContext.serving`), on GPU ``pin_gpu`` when given.

    Raises :class:`JobError`: ``INVALID_PARAMETERS`` when no copy is on ``pin_gpu``,
    ``BACKEND_UNAVAILABLE`` when every copy's GPU is drained.
    """
    candidates = list(copies)
    if pin_gpu is not None:
        candidates = [c for c in candidates if tuple(uuids(c))[:1] == (pin_gpu,)]
        if not candidates:
            raise JobError(ErrorCode.INVALID_PARAMETERS, f"model {model!r} has no copy on GPU {pin_gpu}")
    serving = [c for c in candidates if context.serving(uuids(c))]
    if not serving:
        raise JobError(
            ErrorCode.BACKEND_UNAVAILABLE,
            f"every GPU that serves model {model!r} is drained by the miner's health checks; "
            "the job can go to another miner",
        )
    return min(serving, key=order)
