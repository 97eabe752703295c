"""Runner registry: built-ins by ``"module:Class"`` string, imported only when chosen,
plus third-party runners from the ``aitbc_miner.runners`` entry-point group.

A plugin that fails to import is reported by :func:`discover` and skipped, never fatal.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from miner.errors import ConfigError

ENTRY_POINT_GROUP = "aitbc_miner.runners"

BUILTIN_RUNNERS: dict[str, str] = {
    "fake": "runners.fake:FakeRunner",
    "transformers": "runners.transformers:TransformersRunner",
    "openai": "runners.openai:OpenAIRunner",
}


def import_from_string(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ImportError(f"{target!r} is not of the form 'module:attribute'")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise ImportError(f"module {module_name!r} has no attribute {attr!r}") from exc


def discover() -> dict[str, str]:
    """Every runner name and where it comes from: built-ins, then entry-point plugins."""
    found = dict(BUILTIN_RUNNERS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def load_runner_class(name: str) -> type:
    """Import the runner class called ``name``; ConfigError with the fix if that fails."""
    targets = discover()
    target = targets.get(name)
    if target is None:
        raise ConfigError(
            f"unknown runner {name!r}; known runners: {', '.join(sorted(targets))} "
            f"(third-party runners register in the {ENTRY_POINT_GROUP!r} entry-point group)"
        )
    try:
        return import_from_string(target)
    except ImportError as exc:
        hint = " (install the extra: pip install 'aitbc-miner[transformers]')" if name == "transformers" else ""
        raise ConfigError(f"runner {name!r} cannot be imported: {exc}{hint}") from exc


def runner_status() -> dict[str, str]:
    """For ``probe``: each runner's name -> "available" or why it cannot be imported."""
    status = {}
    for name, target in discover().items():
        try:
            import_from_string(target)
        except Exception as exc:  # a broken plugin is reported, never fatal
            status[name] = f"unavailable: {type(exc).__name__}: {exc}"
        else:
            status[name] = "available"
    return status
