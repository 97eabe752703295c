"""Runner registry: built-ins by ``"module:Class"`` string, imported only when chosen,
plus third-party runners from the ``aitbc_miner.runners`` entry-point group.

A plugin that fails to import, or does not implement the runner protocol, is reported by
:func:`runner_status` (what ``aitbc-miner probe`` lists) and skipped, never fatal; it is
an error only when a ``[[models]]`` entry names it. The protocol is in
:mod:`runners.base`; ``docs/plugins.md`` shows a third-party runner end to end.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from miner.wire.errors import ConfigError

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


# What a runner class must provide (runners.base.Runner); checked when it is imported.
RUNNER_MEMBERS = ("name", "start", "ready_models", "run", "aclose")


def discover() -> dict[str, str]:
    """Every runner name and where it comes from: built-ins, then entry-point plugins.

    A plugin never replaces a built-in of the same name. Unreadable package metadata
    is skipped rather than stopping the miner.
    """
    found = dict(BUILTIN_RUNNERS)
    try:
        plugins = list(entry_points(group=ENTRY_POINT_GROUP))
    except Exception:  # broken metadata of some installed package: no plugins, not a crash
        plugins = []
    for ep in plugins:
        found.setdefault(ep.name, ep.value)
    return found


def missing_members(cls: Any) -> list[str]:
    """The runner-protocol members ``cls`` lacks (empty when it looks like a runner)."""
    if not isinstance(cls, type):
        return ["a class"]
    missing = [m for m in RUNNER_MEMBERS[1:] if not callable(getattr(cls, m, None))]
    if not isinstance(getattr(cls, "name", None), str):
        missing.insert(0, "name")
    return missing


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
        cls = import_from_string(target)
    except Exception as exc:  # a plugin may raise anything while importing
        hint = " (install the extra: pip install 'aitbc-miner[transformers]')" if name == "transformers" else ""
        what = str(exc) if isinstance(exc, ImportError) else f"{type(exc).__name__}: {exc}"
        raise ConfigError(f"runner {name!r} cannot be imported: {what}{hint}") from exc
    missing = missing_members(cls)
    if missing:
        raise ConfigError(
            f"runner {name!r} ({target}) does not implement the runner protocol: missing {', '.join(missing)}"
        )
    return cls


def runner_status() -> dict[str, str]:
    """For ``probe``: each runner's name -> "available" or why it cannot be imported."""
    status = {}
    for name, target in discover().items():
        try:
            cls = import_from_string(target)
        except Exception as exc:  # a broken plugin is reported, never fatal
            status[name] = f"unavailable: {type(exc).__name__}: {exc}"
            continue
        missing = missing_members(cls)
        status[name] = f"unavailable: not a runner (missing {', '.join(missing)})" if missing else "available"
    return status


def runner_version(runner: Any) -> str | None:
    """The version of the code that ran a job: a ``version`` attribute of the runner class,
    else aitbc-miner's for a built-in, else the version of the installed distribution that
    provides the runner's top-level package (``None`` when unknown). Cached per class."""
    cls = type(runner)
    if cls not in _VERSIONS:
        _VERSIONS[cls] = _class_version(cls)
    return _VERSIONS[cls]


_VERSIONS: dict[type, str | None] = {}


def _class_version(cls: type) -> str | None:
    declared = getattr(cls, "version", None)
    if isinstance(declared, str):
        return declared
    top = cls.__module__.split(".", 1)[0]
    if top == "runners":
        from miner import __version__

        return __version__
    from importlib.metadata import PackageNotFoundError, packages_distributions, version

    try:
        dists = packages_distributions().get(top) or []
        return version(dists[0]) if dists else None
    except (PackageNotFoundError, ValueError):
        return None
