"""Fixtures for the transformers runner tests: one tiny random Llama built per session.

Tests marked ``gpu`` are skipped where torch sees no CUDA device.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip this folder's ``gpu`` tests when torch sees no CUDA device."""
    gpu_items = [item for item in items if "gpu" in item.keywords and HERE in Path(item.path).resolve().parents]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (hidden 64, 2 layers, ~700-token BPE) saved with save_pretrained."""
    from runners.tinyllama import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny", hidden=64, layers=2, heads=4)


@pytest.fixture
def model_copy(tiny_model: Path, tmp_path: Path) -> Callable[..., Path]:
    """Copy the tiny model to a fresh folder, optionally editing its files."""

    def make(name: str = "copy", *, drop: tuple[str, ...] = (), config_update: dict[str, Any] | None = None) -> Path:
        dest = tmp_path / name
        shutil.copytree(tiny_model, dest)
        for file in drop:
            (dest / file).unlink()
        if config_update:
            config = json.loads((dest / "config.json").read_text())
            config.update(config_update)
            (dest / "config.json").write_text(json.dumps(config))
        return dest

    return make
