"""``aitbc-miner config``: the effective settings, each with where its value came from.

Settings are loaded exactly as ``run`` loads them (:func:`miner.daemon.settings.load_settings`),
so a configuration ``run`` would reject fails here with the same one line and exit 2. Each
row names one setting (``coordinator.url``, ``models[0].path``), its value and its source:
``cli``, ``env VARIABLE``, ``file PATH``, ``credential PATH`` (the API key read from
``coordinator.api_key_file`` or ``$CREDENTIALS_DIRECTORY/api-key``) or ``default``.

Secrets never appear: the API key, every ``[[models]]`` option named like a secret
(:func:`~miner.daemon.settings.is_secret_option`), a password inside a URL, and any value
holding a secret the settings know of (:meth:`~miner.daemon.settings.MinerSettings.secret_values`)
are shown as ``***``. The key files themselves are read only to learn what to mask.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr

from miner.daemon.settings import CREDENTIAL_NAME, MinerSettings, Origin, is_secret_option, load_settings

MASK = "***"
_URL_PASSWORD = re.compile(r"(://[^/@:\s]*:)[^/@\s]+@")


@dataclass(frozen=True)
class SettingRow:
    """One effective setting: its dotted name, its value (JSON-ready, secrets masked) and its origin."""

    name: str
    value: Any
    origin: Origin

    def as_json(self) -> dict[str, Any]:
        return {"setting": self.name, "value": self.value, "source": self.origin.kind, "from": self.origin.where}


def _plain(value: Any) -> Any:
    """A JSON-ready copy: paths as strings, secrets masked, models and tables as dicts."""
    if isinstance(value, SecretStr):
        return MASK if value.get_secret_value() else ""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, BaseModel):
        return {k: _plain(v) for k, v in value.model_dump().items()}
    if isinstance(value, dict):
        return {str(k): _option_value(str(k), v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _option_value(name: str, value: Any) -> Any:
    """A ``[[models]]`` option's value, masked when its name is a secret's."""
    return MASK if is_secret_option(name) and value not in (None, "") else _plain(value)


def _mask(value: Any, secrets: list[str]) -> Any:
    """Mask URL passwords and every known secret inside strings, however deep."""
    if isinstance(value, str):
        value = _URL_PASSWORD.sub(rf"\1{MASK}@", value)
        for secret in secrets:
            value = value.replace(secret, MASK)
        return value
    if isinstance(value, dict):
        return {k: _mask(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v, secrets) for v in value]
    return value


def _api_key_origin(settings: MinerSettings) -> Origin:
    source = settings.api_key_source()
    if source == "coordinator.api_key":
        return settings.origin(("coordinator", "api_key"))
    if source == "coordinator.api_key_file":
        return Origin("credential", str(settings.coordinator.api_key_file))
    if source is not None:
        return Origin("credential", str(Path(os.environ.get("CREDENTIALS_DIRECTORY", "")) / CREDENTIAL_NAME))
    return Origin("default")


def _rows(settings: MinerSettings) -> Iterator[SettingRow]:
    for name in MinerSettings.model_fields:
        value = getattr(settings, name)
        if name == "models":
            for i, spec in enumerate(settings.models):
                fields = {"name": spec.name, "runner": spec.runner, **spec.options()}
                for option, option_value in fields.items():
                    shown = _option_value(option, option_value)
                    yield SettingRow(f"models[{i}].{option}", shown, settings.origin(("models", i, option)))
        elif isinstance(value, BaseModel):
            for sub in type(value).model_fields:
                loc = (name, sub)
                if loc == ("coordinator", "api_key"):
                    has_key = settings.api_key_source() is not None
                    yield SettingRow("coordinator.api_key", MASK if has_key else None, _api_key_origin(settings))
                else:
                    yield SettingRow(f"{name}.{sub}", _plain(getattr(value, sub)), settings.origin(loc))
        else:
            yield SettingRow(name, _plain(value), settings.origin((name,)))


def effective_settings(settings: MinerSettings) -> list[SettingRow]:
    """Every setting of ``settings`` in declaration order (models flattened per option), secrets masked."""
    secrets = sorted(settings.secret_values(), key=len, reverse=True)
    return [SettingRow(r.name, _mask(r.value, secrets), r.origin) for r in _rows(settings)]


def render_text(settings: MinerSettings, rows: list[SettingRow]) -> str:
    """Aligned ``setting  value  source`` lines under a line naming the config file."""
    path = settings.config_path
    head = f"config file: {path}" if path is not None else "config file: none (defaults and environment only)"
    table = [("setting", "value", "source")] + [(r.name, json.dumps(r.value), r.origin.describe()) for r in rows]
    width0 = max(len(t[0]) for t in table)
    width1 = min(max(len(t[1]) for t in table), 60)
    lines = [f"{a:<{width0}}  {b:<{width1}}  {c}" for a, b, c in table]
    return "\n".join([head, *lines])


def config_command(args: argparse.Namespace) -> int:
    """Print the effective settings; 0, or a :class:`~miner.wire.errors.ConfigError` (exit 2) as ``run`` would."""
    settings = load_settings(args.config)
    rows = effective_settings(settings)
    if args.json:
        path = settings.config_path
        doc = {"config_file": str(path) if path is not None else None, "settings": [r.as_json() for r in rows]}
        print(json.dumps(doc, indent=2))
    else:
        print(render_text(settings, rows))
    return 0
