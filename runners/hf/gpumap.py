"""NVML's GPUs to torch's device numbers: the same physical GPU, matched by UUID or PCI bus id.

NVML numbers every GPU of the host; torch numbers only those ``CUDA_VISIBLE_DEVICES``
lets it see, in ``CUDA_DEVICE_ORDER`` (the daemon sets ``PCI_BUS_ID`` before torch is
imported; CUDA's own default is "fastest first"). So NVML's GPU 1 can be torch's
``cuda:0``. :func:`torch_index` matches a GPU against what torch reports for each of its
devices: the UUID first, then the PCI bus id. Pure functions here; :func:`visible_torch_gpus`
is the only one that asks torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from miner.wire.errors import ConfigError
from runners.base import GpuInfo


@dataclass(frozen=True)
class TorchGpu:
    """One device as torch sees it: ``cuda:index``, with its UUID and PCI address when known."""

    index: int
    uuid: str | None = None
    pci: tuple[int, int, int] | None = None  # (domain, bus, device)


def normalise_uuid(text: str | None) -> str | None:
    """``GPU-58389f9a-...`` and ``58389f9a-...`` are the same GPU: lower case, no prefix."""
    if not text:
        return None
    text = str(text).strip().lower()
    for prefix in ("gpu-", "mig-"):
        text = text.removeprefix(prefix)
    return text or None


def parse_pci_bus_id(text: str | None) -> tuple[int, int, int] | None:
    """NVML's ``00000000:18:00.0`` (or the legacy ``0000:18:00.0``) -> (domain, bus, device)."""
    if not text:
        return None
    try:
        domain, bus, rest = str(text).strip().split(":")
        return int(domain, 16), int(bus, 16), int(rest.partition(".")[0], 16)
    except ValueError:
        return None


def torch_index(gpu: GpuInfo, devices: Sequence[TorchGpu]) -> int | None:
    """torch's index of ``gpu``, or ``None`` when torch cannot see it."""
    uuid = normalise_uuid(gpu.uuid)
    for device in devices:
        if uuid is not None and normalise_uuid(device.uuid) == uuid:
            return device.index
    pci = parse_pci_bus_id(gpu.pci_bus_id)
    for device in devices:
        if pci is not None and device.pci == pci:
            return device.index
    return None


def torch_indices(
    where: str, gpus: Sequence[GpuInfo], devices: Sequence[TorchGpu], visible: str | None
) -> tuple[int, ...]:
    """torch's indices of ``gpus`` (in order); ConfigError naming the GPU torch cannot see."""
    out = []
    for gpu in gpus:
        index = torch_index(gpu, devices)
        if index is None:
            hint = (
                f"CUDA_VISIBLE_DEVICES={visible!r} hides it from torch; add it there or remove the variable"
                if visible is not None
                else "torch lists no device with its UUID or PCI bus id; check `nvidia-smi -L` and the driver"
            )
            raise ConfigError(f"{where}: GPU {gpu.index} ({gpu.uuid}) is not visible to torch: {hint}")
        out.append(index)
    return tuple(out)


def visible_torch_gpus() -> list[TorchGpu]:
    """Every CUDA device torch can use, with its UUID and PCI address (``[]`` without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        props: Any = torch.cuda.get_device_properties(index)
        uuid = getattr(props, "uuid", None)
        pci = None
        if all(hasattr(props, name) for name in ("pci_domain_id", "pci_bus_id", "pci_device_id")):
            pci = (int(props.pci_domain_id), int(props.pci_bus_id), int(props.pci_device_id))
        found.append(TorchGpu(index, str(uuid) if uuid is not None else None, pci))
    return found
