"""What the miner registers: its capabilities, in the shape the coordinator matches on.

The reference coordinator matches ``gpus[].name``, ``gpus[].memory_mb``, ``cuda``,
``models`` and ``price`` (docs/protocol.md) and stores every other key, so the miner
adds its receipt key, software version, runners and per-GPU details. ``None`` readings are
left out rather than sent as ``null``. ``benchmarks`` holds the signed capability benchmark
records (:mod:`miner.daemon.benchmark`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from miner import __version__
from runners.base import GpuInfo

SOFTWARE_NAME = "aitbc-miner"


def gpu_capability(gpu: GpuInfo) -> dict[str, Any]:
    """One ``gpus[]`` entry: ``name`` and ``memory_mb`` (total MiB) plus optional details."""
    entry: dict[str, Any] = {
        "index": gpu.index,
        "uuid": gpu.uuid,
        "name": gpu.name,
        "memory_mb": gpu.memory_total_mb,
        "compute_capability": gpu.compute_capability,
        "driver_version": gpu.driver_version,
        "cuda": gpu.cuda_version,
    }
    return {k: v for k, v in entry.items() if v is not None}


def cuda_of(gpus: Sequence[GpuInfo]) -> str | None:
    """The CUDA driver version to advertise: the first GPU's that is known, or ``None``."""
    return next((g.cuda_version for g in gpus if g.cuda_version), None)


def build_capabilities(
    *,
    gpus: Sequence[GpuInfo],
    models: Sequence[str],
    price: float,
    region: str | None = None,
    key_id: str | None = None,
    runners: Mapping[str, Sequence[str]] | None = None,
    version: str = __version__,
    benchmarks: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The ``capabilities`` object of ``POST /v1/miners/register``.

    ``models`` must be the job-facing names that are ready to serve now; ``runners`` maps
    each runner name to the models it serves; ``benchmarks`` (signed records, one per model
    and GPU) is published as given, ``None`` leaves the key out.
    """
    caps: dict[str, Any] = {
        "gpus": [gpu_capability(g) for g in gpus],
        "models": list(models),
        "price": price,
        "device": "cuda" if gpus else "cpu",
        "software": {"name": SOFTWARE_NAME, "version": version},
    }
    cuda = cuda_of(gpus)
    if cuda is not None:
        caps["cuda"] = cuda
    if region is not None:
        caps["region"] = region
    if key_id is not None:
        caps["receipt_key"] = {"alg": "Ed25519", "key_id": key_id}
    if runners is not None:
        caps["runners"] = {name: list(names) for name, names in runners.items()}
    if benchmarks is not None:
        caps["benchmarks"] = [dict(record) for record in benchmarks]
    return caps
