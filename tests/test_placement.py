"""Where a model runs: runners.placement (GPUs as NVML numbers them) and torch's numbering."""

from __future__ import annotations

import pytest

from miner.wire.errors import ConfigError
from runners.base import GpuInfo
from runners.hf.gpumap import TorchGpu, normalise_uuid, parse_pci_bus_id, torch_index, torch_indices
from runners.placement import place_model

GPUS = [
    GpuInfo(0, "GPU-aaaaaaaa-0000-4000-8000-000000000000", "NVIDIA H200", 143771, pci_bus_id="00000000:18:00.0"),
    GpuInfo(1, "GPU-bbbbbbbb-1111-4111-8111-111111111111", "NVIDIA H200", 143771, pci_bus_id="00000000:2A:00.0"),
]


def keys(placements: list) -> list[str]:
    return [p.key for p in placements]


def test_the_placement_table() -> None:
    """Each row of the module's table, on a two-GPU miner."""
    where = "models[name='m']"
    assert keys(place_model(where, GPUS)) == ["gpu0", "gpu1"]  # a copy per GPU
    assert keys(place_model(where, GPUS, devices=[1])) == ["gpu1"]
    assert keys(place_model(where, GPUS, devices=[GPUS[1].uuid.upper(), 0])) == ["gpu1+0"]  # shard, in that order
    assert keys(place_model(where, GPUS, device="cuda:1")) == ["gpu1"]
    assert keys(place_model(where, GPUS, device="auto")) == ["gpu0+1"]
    assert keys(place_model(where, GPUS, device="cpu")) == ["cpu"]
    assert keys(place_model(where, [])) == ["cpu"]  # no GPU on the miner: the CPU
    shard = place_model(where, GPUS, devices=[1, 0])[0]
    assert shard.gpu_uuid == GPUS[1].uuid and shard.uuids == (GPUS[1].uuid, GPUS[0].uuid)


@pytest.mark.parametrize(
    ("gpus", "options", "message"),
    [
        (GPUS, {"devices": [2]}, r"models\[name='m'\].devices: GPU 2 is not one of this miner's GPUs \(0 \(GPU-a"),
        (GPUS, {"device": "cuda:5"}, r"models\[name='m'\].device: GPU 5 is not one of this miner's GPUs"),
        ([], {"devices": [0]}, r"models\[name='m'\].devices: asks for a GPU, but this miner has none"),
        ([], {"device": "auto"}, r"models\[name='m'\].device: asks for a GPU, but this miner has none"),
        (GPUS, {"device": "cpu", "devices": [0]}, r'device = "cpu" and devices = \[0\] contradict'),
    ],
)
def test_impossible_placements_name_the_setting(gpus: list, options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        place_model("models[name='m']", gpus, options.get("devices"), options.get("device"))


def test_torch_numbering_is_matched_by_uuid_then_pci_bus_id() -> None:
    """With CUDA_VISIBLE_DEVICES=1 torch calls NVML's GPU 1 cuda:0; the UUID (or the PCI address) says so."""
    by_uuid = [TorchGpu(0, "bbbbbbbb-1111-4111-8111-111111111111")]  # torch prints UUIDs without "GPU-"
    assert torch_index(GPUS[1], by_uuid) == 0 and torch_index(GPUS[0], by_uuid) is None
    by_pci = [TorchGpu(0, None, (0, 0x2A, 0)), TorchGpu(1, None, (0, 0x18, 0))]
    assert torch_index(GPUS[1], by_pci) == 0 and torch_index(GPUS[0], by_pci) == 1
    assert torch_indices("models[name='m']", GPUS, by_pci, None) == (1, 0)
    assert normalise_uuid("GPU-ABC") == normalise_uuid("abc") == "abc"
    assert parse_pci_bus_id("0000:2a:00.0") == (0, 0x2A, 0) and parse_pci_bus_id("junk") is None


def test_a_gpu_torch_cannot_see_names_cuda_visible_devices() -> None:
    with pytest.raises(ConfigError, match=r"GPU 0 \(GPU-aaaa.*\) is not visible to torch: CUDA_VISIBLE_DEVICES='1'"):
        torch_indices("models[name='m']", GPUS, [TorchGpu(0, GPUS[1].uuid)], "1")
