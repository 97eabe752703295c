"""One place that writes a miner.toml for tests that run the real daemon against a
local coordinator: fast pacing, no GPU, no metrics port, JSON logs."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.servers import RunningCoordinator

FAST_COORDINATOR = {
    "poll_interval_s": 0.05,
    "idle_backoff_max_s": 0.2,
    "heartbeat_interval_s": 0.5,
    "long_poll_s": 1,
    "max_polls_per_minute": 6000,
}


def _value(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, Path):
        value = str(value)
    return json.dumps(value)  # strings, numbers, booleans and lists are valid TOML as JSON writes them


def _table(values: Mapping[str, Any]) -> str:
    return "".join(f"{key} = {_value(value)}\n" for key, value in values.items() if value is not None)


def write_miner_config(
    path: Path,
    coordinator: RunningCoordinator,
    state_dir: Path,
    *,
    models: Sequence[Mapping[str, Any]],
    coordinator_options: Mapping[str, Any] | None = None,
    gpus: Mapping[str, Any] | None = None,
    benchmark: Mapping[str, Any] | None = None,
    **settings: Any,
) -> Path:
    """Write ``path``: top-level ``settings``, the coordinator (miner key unless
    ``api_key_file`` is given), the ``[gpus]`` table (CPU mode unless given), the
    ``[benchmark]`` table (off unless given: a start-up benchmark only where a test
    measures it), and one ``[[models]]`` table per mapping in ``models``."""
    section = {"url": coordinator.url, **FAST_COORDINATOR, **(coordinator_options or {})}
    if "api_key_file" not in section:
        section["api_key"] = coordinator.miner_key
    text = _table({"miner_id": "rig-test", "state_dir": state_dir, **settings})
    text += "\n[coordinator]\n" + _table(section)
    text += "\n[gpus]\n" + _table(gpus if gpus is not None else {"enabled": False})
    text += "\n[benchmark]\n" + _table(benchmark if benchmark is not None else {"enabled": False})
    text += "\n[metrics]\nenabled = false\n\n[log]\nformat = \"json\"\n"
    for model in models:
        text += "\n[[models]]\n" + _table(model)
    path.write_text(text, encoding="utf-8")
    return path
