"""NVML probing against FakeNvml (passed in, never patched) and the real pynvml without a driver."""

from __future__ import annotations

import asyncio
import importlib.util
import re

import pytest
from structlog.testing import capture_logs

from miner.daemon.capabilities import cuda_of, gpu_capability
from miner.host.fakenvml import FakeGpu, FakeNvml, h200s
from miner.host.nvml import Nvml, format_cuda_version, free_vram_mb, probe_gpus, read_gpu_stats
from miner.wire.errors import ConfigError


def two_gpus(**kwargs) -> FakeNvml:
    return FakeNvml(
        [
            FakeGpu(
                "NVIDIA H200",
                memory_total_mb=143771,
                memory_used_mb=1024,
                utilization_pct=37,
                temperature_c=48,
                power_w=212.5,
            ),
            FakeGpu("NVIDIA GeForce RTX 3090", memory_total_mb=24576, memory_used_mb=576, compute_capability=(8, 6)),
        ],
        **kwargs,
    )


def test_probe_reads_every_field_of_several_gpus() -> None:
    """probe_gpus returns one GpuInfo per device with identity, memory, versions and readings."""
    nvml = two_gpus()
    gpus = probe_gpus(nvml)
    assert [g.index for g in gpus] == [0, 1]
    h200, rtx = gpus
    assert h200.name == "NVIDIA H200" and h200.uuid == nvml.gpus[0].uuid
    assert (h200.memory_total_mb, h200.memory_free_mb) == (143771, 143771 - 1024)
    assert (h200.driver_version, h200.cuda_version, h200.compute_capability) == ("550.54.15", "12.4", "9.0")
    assert (h200.utilization_pct, h200.temperature_c, h200.power_w) == (37.0, 48.0, 212.5)
    assert rtx.compute_capability == "8.6" and rtx.memory_total_mb == 24576
    assert nvml.init_count == 0, "probe_gpus pairs nvmlInit with nvmlShutdown"


def test_bytes_strings_are_decoded() -> None:
    """Older pynvml versions return bytes for names, UUIDs and versions; they come out as str."""
    gpu = probe_gpus(two_gpus(bytes_strings=True))[1]
    assert gpu.name == "NVIDIA GeForce RTX 3090" and isinstance(gpu.uuid, str) and gpu.driver_version == "550.54.15"


def test_unsupported_readings_become_none() -> None:
    """A reading NVML does not support is None for that field only, never a crash."""
    nvml = FakeNvml([FakeGpu(unsupported={"power_w", "temperature_c"}), FakeGpu()], unsupported={"cuda_version"})
    a, b = probe_gpus(nvml)
    assert a.power_w is None and a.temperature_c is None and a.utilization_pct == 0.0
    assert b.power_w == 75.0
    assert a.cuda_version is None and cuda_of([a, b]) is None


def test_lost_gpu_is_skipped_at_probe_with_one_warning() -> None:
    """A GPU lost before the probe is left out with a warning naming it; the others are probed."""
    nvml = two_gpus()
    nvml.gpus[0].lost = True
    with capture_logs() as logs:
        gpus = probe_gpus(nvml)
    assert [g.index for g in gpus] == [1]
    assert [(e["event"], e["gpu"], e["error"]) for e in logs] == [("gpu_unusable_skipped", 0, "GPU is lost")]


def test_lost_gpu_keeps_identity_with_blank_readings() -> None:
    """A GPU that raises GPU_IS_LOST after the probe keeps its identity with empty readings; the others still read."""
    nvml = two_gpus()
    nvml.gpus[1].unsupported = {"name"}
    gpus = probe_gpus(nvml)
    assert gpus[1].name == "unknown NVIDIA GPU"
    nvml.nvmlInit()
    nvml.gpus[0].lost = True
    stats = read_gpu_stats(nvml, gpus)
    assert stats[0].memory_free_mb is None and stats[0].uuid == gpus[0].uuid
    assert stats[1].memory_free_mb == 24576 - 576


def test_device_selection_by_index_and_uuid() -> None:
    """gpus.devices picks GPUs by index or UUID (case-insensitive), in the order given, without duplicates."""
    nvml = two_gpus()
    uuid1 = nvml.gpus[1].uuid
    assert [g.index for g in probe_gpus(nvml, [1])] == [1]
    assert [g.index for g in probe_gpus(nvml, [uuid1.upper(), "0", 1])] == [1, 0]


def test_unknown_device_is_a_config_error_naming_the_setting() -> None:
    """An index or UUID that no GPU has raises ConfigError naming gpus.devices and what was found."""
    nvml = two_gpus()
    with pytest.raises(ConfigError, match=r"gpus\.devices: no GPU 7 .*found: 0 \(GPU-"):
        probe_gpus(nvml, [7])
    with pytest.raises(ConfigError, match="gpus.devices: no GPU 'GPU-nope'"):
        probe_gpus(nvml, ["GPU-nope"])
    assert nvml.init_count == 0


@pytest.mark.parametrize("error", ["library_not_found", "driver_not_loaded"])
def test_no_driver_logs_one_line_and_returns_empty(error: str) -> None:
    """Without a driver probe_gpus logs exactly one 'running in CPU mode' warning and returns []."""
    with capture_logs() as logs:
        assert probe_gpus(FakeNvml(init_error=error)) == []
    assert len(logs) == 1
    assert logs[0]["log_level"] == "warning"
    assert logs[0]["event"] == "no_nvidia_driver_cpu_mode" and logs[0]["reason"]


@pytest.mark.skipif(importlib.util.find_spec("pynvml") is None, reason="nvidia-ml-py not installed")
def test_real_pynvml_on_this_host_never_raises() -> None:
    """The real pynvml module gives either GPUs or the CPU-mode line, never an exception."""
    with capture_logs() as logs:
        gpus = probe_gpus()
    if not gpus:
        assert [e["event"] for e in logs if e["event"] == "no_nvidia_driver_cpu_mode"], logs
    for gpu in gpus:  # on a GPU host: the real driver's answers have the expected shapes
        assert gpu.uuid.startswith(("GPU-", "MIG-")) and gpu.memory_total_mb > 0 and gpu.name
        assert gpu.cuda_version is None or re.fullmatch(r"\d+\.\d+", gpu.cuda_version)
        assert gpu.compute_capability is None or re.fullmatch(r"\d+\.\d+", gpu.compute_capability)


def test_nvml_wrapper_holds_nvml_open_and_reads_cheaply() -> None:
    """Nvml.start initialises once, read_stats and free_vram_mb see load changes, close shuts down once."""
    nvml = h200s(2)
    wrapper = Nvml(nvml)
    gpus = wrapper.start(devices=[1])
    assert wrapper.available and [g.index for g in gpus] == [1] and nvml.init_count == 1
    assert wrapper.start() == gpus and nvml.init_count == 1
    nvml.gpus[1].memory_used_mb = 100_000
    nvml.gpus[1].utilization_pct = 99
    stats = asyncio.run(asyncio.to_thread(wrapper.read_stats))
    assert stats[0].memory_free_mb == 143771 - 100_000 and stats[0].utilization_pct == 99.0
    probe = wrapper.free_vram_probe()
    assert probe is not None and probe(1) == 43771
    wrapper.close()
    wrapper.close()
    assert nvml.init_count == 0 and not wrapper.available
    assert wrapper.read_stats() == [] and wrapper.free_vram_mb(1) is None


def test_nvml_wrapper_cpu_mode() -> None:
    """Without a driver the wrapper is unavailable, returns no GPUs and offers no VRAM probe."""
    wrapper = Nvml(FakeNvml(init_error="library_not_found"))
    with capture_logs() as logs:
        assert wrapper.start() == []
    assert len(logs) == 1 and not wrapper.available and wrapper.free_vram_probe() is None
    wrapper.close()


def test_nvml_wrapper_releases_nvml_on_bad_selection() -> None:
    """A ConfigError from gpus.devices during start leaves NVML shut down."""
    nvml = h200s(1)
    with pytest.raises(ConfigError):
        Nvml(nvml).start(devices=["GPU-missing"])
    assert nvml.init_count == 0


def test_free_vram_and_uninitialised_reads() -> None:
    """free_vram_mb reads free MiB; called before nvmlInit it answers None instead of raising."""
    nvml = h200s(1)
    assert free_vram_mb(nvml, 0) is None
    nvml.nvmlInit()
    assert free_vram_mb(nvml, 0) == 143771 - 512
    assert free_vram_mb(nvml, 5) is None


def test_capability_shape_and_cuda_formatting() -> None:
    """gpu_capability gives name and memory_mb (what the coordinator matches) plus uuid and index."""
    gpus = probe_gpus(two_gpus())
    caps = [gpu_capability(g) for g in gpus]
    assert caps[0]["name"] == "NVIDIA H200" and caps[0]["memory_mb"] == 143771
    assert caps[1]["uuid"] == gpus[1].uuid and caps[1]["index"] == 1 and caps[1]["compute_capability"] == "8.6"
    assert cuda_of(gpus) == "12.4"
    assert [format_cuda_version(v) for v in (12040, 11080, 13000, 0, None)] == ["12.4", "11.8", "13.0", None, None]


def test_fake_nvml_behaves_like_nvml_before_init() -> None:
    """FakeNvml raises the real pynvml NVMLError_Uninitialized for device calls before nvmlInit."""
    import pynvml

    nvml = h200s(1)
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        nvml.nvmlDeviceGetCount()
    with pytest.raises(ValueError, match="init_error must be one of"):
        FakeNvml(init_error="sometimes")
