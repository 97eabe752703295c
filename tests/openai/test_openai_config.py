"""The shipped example configuration for serving engines stays valid."""

from __future__ import annotations

from pathlib import Path

from miner.daemon.settings import load_settings
from runners.base import parse_options
from runners.openai import OpenAIOptions

CONFIG = Path(__file__).resolve().parents[2] / "config" / "miner-openai.toml"


def test_example_config_loads_and_its_openai_options_parse() -> None:
    """config/miner-openai.toml passes settings validation and every openai model's options validate."""
    settings = load_settings(CONFIG)
    openai_models = [spec for spec in settings.models if spec.runner == "openai"]
    assert openai_models
    for spec in openai_models:
        options = parse_options(OpenAIOptions, spec)
        assert options.base_url.startswith("http") and options.served_model
