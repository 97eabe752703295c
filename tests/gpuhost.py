"""Simulated GPU hosts for tests: the JSON file ``AITBC_MINER_FAKE_NVML`` points at."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

UUIDS = (
    "GPU-0a1b2c3d-0000-4000-8000-000000000000",
    "GPU-1b2c3d4e-1111-4111-8111-111111111111",
    "GPU-2c3d4e5f-2222-4222-8222-222222222222",
    "GPU-3d4e5f60-3333-4333-8333-333333333333",
)


def gpu_entry(index: int, **overrides: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "index": index,
        "uuid": UUIDS[index],
        "name": "NVIDIA H200",
        "memory_mb": 143771,
        "free_mb": 140000,
        "pci_bus_id": f"00000000:{0x18 + 0x10 * index:02X}:00.0",
        "compute_capability": "9.0",
        "utilization_pct": 0,
        "temperature_c": 35,
        "power_w": 90.0,
        "energy_mj": 1000,
        "ecc_uncorrected": 0,
        "xid": [],
        "throttle": [],
        "pcie_width": 16,
        "pcie_max_width": 16,
    }
    entry.update(overrides)
    return entry


def write_host(
    path: Path,
    count: int = 2,
    per_gpu: Mapping[int, Mapping[str, Any]] | None = None,
    driver: str = "580.65.06",
) -> Path:
    """Write (atomically, as a test changing a GPU mid-run needs) a host of ``count`` H200s."""
    gpus = [gpu_entry(i, **dict((per_gpu or {}).get(i, {}))) for i in range(count)]
    data = {"driver": driver, "cuda": "13.0", "gpus": gpus}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)
    return path
