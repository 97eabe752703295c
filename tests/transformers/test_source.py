"""Model sources without loading: the download progress log, the builder, the registry entry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import structlog

from runners import load_runner_class
from runners.hf.source import is_hub_id, log_progress_class, parameter_count
from runners.transformers import TransformersRunner


def test_download_progress_goes_to_the_log() -> None:
    """The hub download progress bar writes log events with bytes done and total, not terminal output."""
    bar_class = log_progress_class("org/model")
    with structlog.testing.capture_logs() as logs:
        bar = bar_class(total=1000, unit="B", mininterval=0, desc="Downloading bytes")
        bar.update(400)
        bar.update(600)
        bar.close()
    events = [e for e in logs if e["event"] == "model_download_progress"]
    assert events and events[-1]["done"] == 1000 and events[-1]["total"] == 1000
    assert all(e["model"] == "org/model" for e in events)


def test_hub_ids_and_local_paths_are_told_apart(tiny_model: Path) -> None:
    """org/name strings are hub ids unless such a local path exists."""
    assert is_hub_id("meta-llama/Llama-2-7b-hf")
    assert not is_hub_id(str(tiny_model))
    assert not is_hub_id("just-a-name")


def test_builder_writes_a_loadable_safetensors_llama(tiny_model: Path) -> None:
    """The tiny builder writes config, safetensors weights and a tokenizer with a chat template."""
    names = {p.name for p in tiny_model.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names
    assert not any(n.endswith(".bin") for n in names)
    assert 150_000 < parameter_count(tiny_model) < 250_000


def test_registry_resolves_the_transformers_runner() -> None:
    """The built-in registry name 'transformers' imports TransformersRunner."""
    assert load_runner_class("transformers") is TransformersRunner


def test_offline_hub_model_missing_from_the_cache_is_a_config_error(tmp_path: Path) -> None:
    """With HF_HUB_OFFLINE=1 a pinned hub model that is not cached stops start with a clear ConfigError."""
    code = """
import asyncio
from miner.wire.errors import ConfigError
from runners.base import ModelSpec, RunnerContext
from runners.transformers import TransformersRunner
spec = ModelSpec(name="llama2", runner="transformers", path="meta-llama/Llama-2-7b-hf", revision="a" * 40)
try:
    asyncio.run(TransformersRunner([spec], RunnerContext()).start())
except ConfigError as exc:
    print(exc)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    assert "is not in the local hub cache" in out.stdout, out.stdout + out.stderr
