"""The shipped config examples load through the real settings loader and mean what their comments say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from miner.daemon.settings import load_settings
from runners.base import parse_options

CONFIG = Path(__file__).resolve().parents[2] / "config"
TOML_EXAMPLES = sorted(CONFIG.glob("*.toml"))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("AITBC_MINER_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)


def read_env_example() -> tuple[dict[str, str], list[str]]:
    values, commented = {}, []
    for line in (CONFIG / "miner.env.example").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("# AITBC_MINER_"):
            commented.append(line[2:])
        elif line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name] = value
    return values, commented


def test_the_three_toml_examples_exist() -> None:
    """config/ ships the single-GPU, multi-GPU and openai examples."""
    assert {p.name for p in TOML_EXAMPLES} >= {"miner.toml", "miner-multi-gpu.toml", "miner-openai.toml"}


@pytest.mark.parametrize("path", TOML_EXAMPLES, ids=lambda p: p.name)
def test_toml_example_loads(path: Path) -> None:
    """Each TOML example validates through load_settings and names at least one model."""
    settings = load_settings(path)
    assert settings.models and settings.config_path == path
    assert settings.metrics.listen.startswith("127.0.0.1:"), "examples keep metrics on loopback"


def test_single_gpu_example_serves_llama2_on_one_gpu() -> None:
    """config/miner.toml is the one-GPU llama2 example with safetensors weights from a local path."""
    settings = load_settings(CONFIG / "miner.toml")
    assert [m.name for m in settings.models] == ["llama2"]
    assert settings.models[0].runner == "transformers" and "path" in settings.models[0].options()
    assert settings.gpus.devices == [0] and settings.concurrency is None  # claiming follows batch room and memory


def test_multi_gpu_example_uses_several_gpus_and_models() -> None:
    """config/miner-multi-gpu.toml selects two GPUs and serves several models across runners."""
    settings = load_settings(CONFIG / "miner-multi-gpu.toml")
    assert settings.gpus.devices == [0, 1]
    assert len(settings.models) >= 3 and {m.runner for m in settings.models} >= {"transformers", "openai"}


def test_multi_gpu_example_puts_each_transformers_model_on_its_own_gpu() -> None:
    """The two transformers models of the multi-GPU example are placed on GPU 0 and GPU 1, not both on 0."""
    from runners.base import GpuInfo
    from runners.hf.options import TransformersOptions
    from runners.placement import place_model

    settings = load_settings(CONFIG / "miner-multi-gpu.toml")
    gpus = [GpuInfo(i, f"GPU-{i}", "NVIDIA H200", 143771) for i in settings.gpus.devices if isinstance(i, int)]
    placed = []
    for spec in settings.models:
        if spec.runner == "transformers":
            options = parse_options(TransformersOptions, spec)
            placed += [p.key for p in place_model(spec.name, gpus, options.devices, options.device)]
    assert placed == ["gpu0", "gpu1"]


def test_openai_example_options_validate_against_the_runner() -> None:
    """Every openai model table in the examples passes the openai runner's own option check."""
    from runners.openai import OpenAIOptions

    specs = [m for p in TOML_EXAMPLES for m in load_settings(p).models if m.runner == "openai"]
    assert specs
    for spec in specs:
        options = parse_options(OpenAIOptions, spec)
        assert options.base_url.startswith("http://127.0.0.1:")


def test_env_example_overrides_the_toml(monkeypatch: pytest.MonkeyPatch) -> None:
    """miner.env.example's variables load and win over the TOML file, as its header says."""
    values, commented = read_env_example()
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AITBC_MINER_MINER_ID", "from-env")
    settings = load_settings(CONFIG / "miner.toml")
    assert settings.miner_id == "from-env"
    assert settings.coordinator.url == values["AITBC_MINER_COORDINATOR__URL"]
    assert str(settings.coordinator.api_key_file) == values["AITBC_MINER_COORDINATOR__API_KEY_FILE"]
    assert settings.log.format == "json" and settings.gpus.devices == [0]
    models_line = next(line for line in commented if line.startswith("AITBC_MINER_MODELS="))
    monkeypatch.setenv("AITBC_MINER_MODELS", models_line.partition("=")[2])
    assert [m.name for m in load_settings(CONFIG / "miner-openai.toml").models] == [
        m["name"] for m in json.loads(models_line.partition("=")[2])
    ]


@pytest.mark.parametrize("instance", ["0", "GPU-4c3b2a10-0000-4000-8000-000000000001"])
def test_template_unit_device_variable_parses(monkeypatch: pytest.MonkeyPatch, instance: str) -> None:
    """The GPU selection aitbc-miner@.service sets from its instance name parses as gpus.devices."""
    unit = (CONFIG.parent / "systemd" / "aitbc-miner@.service").read_text(encoding="utf-8")
    line = next(l for l in unit.splitlines() if l.startswith('Environment="AITBC_MINER_GPUS__DEVICES='))
    # systemd unquotes Environment="NAME=VALUE" and turns \" into "; then %i is the instance.
    name, _, value = line[len('Environment="') : -1].replace('\\"', '"').partition("=")
    monkeypatch.setenv(name, value.replace("%i", instance))
    assert load_settings(CONFIG / "miner.toml").gpus.devices == [instance]


def test_transformers_example_options_validate_against_the_runner() -> None:
    """Every transformers model table in the examples passes the transformers runner's option model."""
    import importlib.util

    if importlib.util.find_spec("runners.transformers") is None:
        pytest.skip("runners.transformers is not in this checkout")
    import inspect

    from pydantic import BaseModel

    import runners.transformers as module

    models = [
        obj for name, obj in vars(module).items()
        if inspect.isclass(obj) and issubclass(obj, BaseModel) and name.endswith("Options") and obj.__module__.startswith("runners.")
    ]
    if len(models) != 1:
        pytest.skip(f"cannot tell the transformers options model apart: {[m.__name__ for m in models]}")
    specs = [m for p in TOML_EXAMPLES for m in load_settings(p).models if m.runner == "transformers"]
    assert specs
    for spec in specs:
        parse_options(models[0], spec)
