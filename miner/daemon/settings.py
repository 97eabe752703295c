"""MinerSettings: the one settings object, and the only place that reads env and files.

Sources, highest priority first: keyword arguments (the CLI), environment variables
(``AITBC_MINER_`` prefix, ``__`` for nesting, e.g. ``AITBC_MINER_COORDINATOR__URL``), the
TOML file (``--config``), then defaults. The API key comes from ``coordinator.api_key``,
``coordinator.api_key_file``, or systemd's ``$CREDENTIALS_DIRECTORY/api-key``.

Plain ``http://`` to a coordinator that is not on loopback is refused unless
``coordinator.allow_insecure_http`` is set: the API key would travel in clear.
:meth:`MinerSettings.secret_values` lists every secret the settings hold, so the daemon
can mask them all in its logs.

:func:`load_settings` turns any validation error into a :class:`ConfigError` whose one
line names the setting and how to fix it.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from miner.wire.errors import ConfigError
from miner.wire.net import check_http_url, is_remote_plain_http, parse_host_port
from miner.wire.secretfile import read_secret_file
from runners.base import ModelSpec

DEFAULT_CONFIG = Path("/etc/aitbc-miner/miner.toml")
ENV_PREFIX = "AITBC_MINER_"
CREDENTIAL_NAME = "api-key"
MAX_RESULT_BYTES_CEILING = 64 << 20
MAX_SLOTS = 256  # the most jobs one miner holds in flight

# [[models]] options whose value is a secret: api_key, *_api_key, *token, *password, *secret.
_SECRET_OPTION = re.compile(r"(^|_)api_key$|token$|password$|secret$", re.IGNORECASE)
_SECRET_FILE_OPTION = "api_key_file"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CoordinatorSettings(_Section):
    # Declared before url: the url check reads it.
    allow_insecure_http: bool = Field(
        default=False, description="allow plain http:// to a coordinator beyond loopback (the API key travels in clear)"
    )
    url: str = "http://127.0.0.1:8011"
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    ca_file: Path | None = Field(default=None, description="extra CA bundle for a private TLS coordinator")
    timeout_s: float = Field(default=10.0, gt=0, le=300)
    long_poll_s: float = Field(default=15.0, ge=0, le=120, description="max_wait_seconds sent with each poll")
    poll_interval_s: float = Field(default=1.0, gt=0, le=300, description="pause between polls that return at once")
    idle_backoff_max_s: float = Field(
        default=5.0, gt=0, le=600, description="pause ceiling while the queue stays empty"
    )
    heartbeat_interval_s: float = Field(default=15.0, gt=0, le=600)
    max_polls_per_minute: int = Field(default=90, ge=1, le=10_000, description="stays under the reference 100/min")
    max_result_bytes: int = Field(
        default=1 << 20, ge=1024, le=MAX_RESULT_BYTES_CEILING, description="largest result body the coordinator accepts"
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str, info: ValidationInfo) -> str:
        parts = check_http_url(value, "https://coordinator.example.net or http://127.0.0.1:8011")
        if is_remote_plain_http(value) and not info.data.get("allow_insecure_http", False):
            raise ValueError(
                f"plain http:// to {parts.hostname}, a host beyond loopback, would send the miner API key in clear; "
                "use https:// or set coordinator.allow_insecure_http = true"
            )
        return value.rstrip("/")


class GpuSettings(_Section):
    enabled: bool = Field(default=True, description="false: CPU mode, NVML is not touched")
    devices: list[int | str] = Field(default_factory=list, description="indices or UUIDs; empty = all")


class MetricsSettings(_Section):
    enabled: bool = True
    listen: str = "127.0.0.1:9477"

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        parse_host_port(value, "127.0.0.1:9477")
        return value


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class MinerSettings(BaseSettings):
    """Every setting of the daemon. See ``config/miner.toml`` for a commented example."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    miner_id: str = Field(default_factory=socket.gethostname, min_length=1, max_length=128)
    state_dir: Path = Path("/var/lib/aitbc-miner")
    region: str | None = None
    price: float = Field(0.01, ge=0, description="asking price per GPU second")
    concurrency: int | None = Field(
        None,
        ge=1,
        le=MAX_SLOTS,
        description="cap on jobs in flight; default: what the runners can take (batch room and free GPU memory)",
    )
    drain_grace_s: float = Field(30.0, ge=0, le=3600)
    fake_nvml: Path | None = Field(
        None, description="simulated GPU host: GPUs read from this JSON file instead of the driver (tests, demos)"
    )
    coordinator: CoordinatorSettings = Field(default_factory=CoordinatorSettings)
    gpus: GpuSettings = Field(default_factory=GpuSettings)
    models: list[ModelSpec] = Field(default_factory=list)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    log: LogSettings = Field(default_factory=LogSettings)

    # Set by load_settings; not a setting.
    _config_path: Path | None = None

    @field_validator("models")
    @classmethod
    def _unique_models(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        seen: set[str] = set()
        for spec in models:
            if spec.name in seen:
                raise ValueError(f"model name {spec.name!r} appears twice; each [[models]] name must be unique")
            seen.add(spec.name)
        return models

    @model_validator(mode="after")
    def _check_models(self) -> MinerSettings:
        if not self.models:
            raise ValueError("no models configured; add at least one [[models]] table with name and runner")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = _TOML_FILE.get("path")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    def api_key(self) -> str:
        """The coordinator API key, from the setting, its file, or a systemd credential."""
        c = self.coordinator
        if c.api_key is not None and c.api_key.get_secret_value():
            return c.api_key.get_secret_value()
        candidates = []
        if c.api_key_file is not None:
            candidates.append(("coordinator.api_key_file", c.api_key_file))
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if creds:
            candidates.append(("$CREDENTIALS_DIRECTORY", Path(creds) / CREDENTIAL_NAME))
        for setting, path in candidates:
            if setting == "$CREDENTIALS_DIRECTORY" and not path.is_file():
                continue
            return read_secret_file(path, setting, "the miner API key")
        raise ConfigError(
            "coordinator.api_key: no API key; set coordinator.api_key_file in the config, "
            f"{ENV_PREFIX}COORDINATOR__API_KEY, or LoadCredential={CREDENTIAL_NAME}:... in the systemd unit"
        )

    def secret_values(self) -> list[str]:
        """Every secret these settings hold, to be masked in logs (never raises).

        The coordinator API key from each of its sources (the setting, its file, the
        systemd credential) and, for every ``[[models]]`` entry, the contents of its
        ``api_key_file`` and any inline option named ``api_key``, ``*_api_key``,
        ``*token``, ``*password`` or ``*secret`` (nested tables included). Unreadable
        files are skipped: start-up reports them on its own.
        """
        values: list[str] = []
        c = self.coordinator
        if c.api_key is not None:
            values.append(c.api_key.get_secret_value())
        files = [c.api_key_file] if c.api_key_file is not None else []
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if creds:
            files.append(Path(creds) / CREDENTIAL_NAME)
        for spec in self.models:
            for name, value in _walk_options(spec.options()):
                if name == _SECRET_FILE_OPTION and isinstance(value, (str, Path)):
                    files.append(Path(value))
                elif _SECRET_OPTION.search(name) and isinstance(value, str):
                    values.append(value.strip())
        for path in files:
            try:
                values.append(read_secret_file(path, "secret file"))
            except ConfigError:
                continue
        return list(dict.fromkeys(v for v in values if v))

    def insecure_transport_warning(self) -> str | None:
        """A one-line warning when the API key goes over plain HTTP beyond loopback (allowed by the setting)."""
        url = self.coordinator.url
        if not is_remote_plain_http(url):
            return None
        host = urlsplit(url).hostname
        return (
            f"coordinator.url uses plain http:// to {host}: the miner API key, prompts and results travel "
            "unencrypted (coordinator.allow_insecure_http = true); switch to https:// where you can"
        )

    @property
    def config_path(self) -> Path | None:
        return self._config_path


def _walk_options(options: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """``(name, value)`` of every option, descending into nested tables and lists of tables."""
    for name, value in options.items():
        yield str(name), value
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, dict):
                yield from _walk_options(item)


# The TOML path is chosen at run time; settings_customise_sources is a classmethod, so the
# path is handed over here for the duration of one load_settings call.
_TOML_FILE: dict[str, Path | None] = {}


def _format_error(exc: ValidationError, config_path: Path | None) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if p != "__root__")
    where = f" in {config_path}" if config_path else ""
    env_name = ENV_PREFIX + "__".join(str(p).upper() for p in err["loc"] if not isinstance(p, int)) if loc else ""
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        fix = f"set {loc}{where}" + (f" or {env_name}" if env_name else "")
    elif err["type"] == "extra_forbidden":
        fix = f"remove {loc}{where}; it is not a known setting (check its spelling)"
    else:
        fix = f"fix {loc or 'the settings'}{where}" + (f" or {env_name}" if env_name else "")
    extra = f" ({len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"config error: {loc + ': ' if loc else ''}{msg}; {fix}{extra}"


def load_settings(config_path: Path | str | None = None, **overrides: Any) -> MinerSettings:
    """Load and validate settings. ``config_path=None`` uses the default file if it exists.

    Raises :class:`ConfigError` (one line) for a missing file named explicitly, a
    malformed TOML file, or any invalid setting.
    """
    candidate = Path(config_path) if config_path is not None else DEFAULT_CONFIG
    path: Path | None = candidate
    if not candidate.exists():
        if config_path is not None:
            raise ConfigError(
                f"config error: {candidate} does not exist; pass --config with the path of your miner.toml"
            )
        path = None
    elif candidate.is_dir():
        raise ConfigError(f"config error: {candidate} is a folder; pass --config with the path of your miner.toml")
    _TOML_FILE["path"] = path
    try:
        settings = MinerSettings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, path)) from exc
    except ValueError as exc:  # TOML syntax errors surface as ValueError subclasses
        raise ConfigError(f"config error: {path} is not valid TOML: {exc}; fix the file") from exc
    except OSError as exc:
        raise ConfigError(f"config error: cannot read {path}: {exc.strerror}") from exc
    finally:
        _TOML_FILE.clear()
    settings._config_path = path
    return settings
