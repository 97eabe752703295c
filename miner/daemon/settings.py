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
line names the setting, where its value came from and how to fix it: a bad value from an
environment variable names the variable, not the TOML file; a list or table variable that is
not JSON names the variable; an ``AITBC_MINER_*`` variable that is no setting stops start-up
naming the closest known one, as an unknown TOML key does. ``AITBC_MINER_CONFIG`` (the
``--config`` default) is the one variable under the prefix that is not a setting.
:meth:`MinerSettings.origin` says where each effective value came from (``aitbc-miner config``).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import socket
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin
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
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from miner.host.gpuhealth import DEFAULT_CRITICAL_XIDS
from miner.wire.errors import ConfigError
from miner.wire.net import check_http_url, is_remote_plain_http, parse_host_port
from miner.wire.secretfile import read_secret_file
from runners.base import ModelSpec

DEFAULT_CONFIG = Path("/etc/aitbc-miner/miner.toml")
ENV_PREFIX = "AITBC_MINER_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"  # the --config default; the one AITBC_MINER_ variable that is not a setting
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


HealthCheck = Literal["ecc", "retired_pages", "xid", "thermal", "power_brake", "pcie"]


class GpuSettings(_Section):
    enabled: bool = Field(default=True, description="false: CPU mode, NVML is not touched")
    devices: list[int | str] = Field(default_factory=list, description="indices or UUIDs; empty = all")
    health_poll_s: float = Field(
        default=5.0, ge=0, le=3600, description="read each GPU's health (ECC, Xid, throttling, PCIe) this often; 0: off"
    )
    drain_on: list[HealthCheck] = Field(
        default_factory=lambda: list(get_args(HealthCheck)),
        description="the health checks that stop a GPU taking new jobs (its running jobs finish)",
    )
    recover_after_s: float = Field(
        default=60.0, ge=0, le=86_400,
        description="a GPU drained by thermal, power-brake or PCIe trouble serves again once clear this long",
    )
    critical_xids: list[int] = Field(
        default_factory=lambda: list(DEFAULT_CRITICAL_XIDS),
        description="Xid event codes that drain a GPU until the miner restarts",
    )


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
    summary_interval_s: float = Field(
        default=600.0, ge=0, le=86_400, description="a summary line (jobs, tokens, earnings, idle) this often; 0: off"
    )
    idle_warning_s: float = Field(
        default=1800.0, ge=0, le=7 * 86_400, description="warn once, with likely causes, after this long idle; 0: off"
    )


class BenchmarkSettings(_Section):
    enabled: bool = Field(
        default=True,
        description="measure each served model on each GPU at start (or reuse the cached record) and publish "
        "the signed records in the capabilities",
    )
    max_new_tokens: int = Field(
        default=32, ge=1, le=4096, description="new tokens each benchmark job generates (greedy, fixed prompts)"
    )
    timeout_s: float = Field(
        default=120.0, gt=0, le=3600,
        description="the longest one benchmark step (a job, or a batch of jobs) may take; past it the model "
        "is published without a record",
    )


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
    benchmark: BenchmarkSettings = Field(default_factory=BenchmarkSettings)

    # Set by load_settings; not settings.
    _config_path: Path | None = None
    _sources: LoadedSources | None = None

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
        toml_data = _TOML_FILE.get("data")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_data is not None:
            sources.append(InitSettingsSource(settings_cls, init_kwargs=toml_data))
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

    def api_key_source(self) -> str | None:
        """Where :meth:`api_key` would read the key, without reading it: ``coordinator.api_key``,
        ``coordinator.api_key_file``, ``$CREDENTIALS_DIRECTORY/api-key``, or ``None`` (no key)."""
        c = self.coordinator
        if c.api_key is not None and c.api_key.get_secret_value():
            return "coordinator.api_key"
        if c.api_key_file is not None:
            return "coordinator.api_key_file"
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if creds and (Path(creds) / CREDENTIAL_NAME).is_file():
            return f"$CREDENTIALS_DIRECTORY/{CREDENTIAL_NAME}"
        return None

    def origin(self, loc: Sequence[str | int]) -> Origin:
        """Where the effective value at ``loc`` (e.g. ``("coordinator", "url")``, ``("models", 0, "path")``)
        came from: the command line, an environment variable, the TOML file, or the default."""
        return (self._sources or LoadedSources()).origin(loc)

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


def is_secret_option(name: str) -> bool:
    """True for a ``[[models]]`` option whose value is a secret (``api_key``, ``*_api_key``, ``*token``,
    ``*password``, ``*secret``): logs and ``aitbc-miner config`` never show it."""
    return bool(_SECRET_OPTION.search(name))


def _walk_options(options: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """``(name, value)`` of every option, descending into nested tables and lists of tables."""
    for name, value in options.items():
        yield str(name), value
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, dict):
                yield from _walk_options(item)


@dataclass(frozen=True)
class Origin:
    """Where one setting's value came from. ``kind``: ``cli``, ``env``, ``file``, ``credential`` or
    ``default``; ``where``: the variable, the file's path, the credential's path ("" for a default)."""

    kind: Literal["cli", "env", "file", "credential", "default"]
    where: str = ""

    def describe(self) -> str:
        return f"{self.kind} {self.where}".strip()


@dataclass(frozen=True)
class LoadedSources:
    """What one :func:`load_settings` call read: the TOML data, the ``AITBC_MINER_*`` variables
    (names upper-cased) and the keyword overrides."""

    config_path: Path | None = None
    toml: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    overrides: frozenset[str] = frozenset()

    def env_var(self, loc: Sequence[str | int]) -> str | None:
        """The variable that set ``loc``: ``PREFIX_SECTION__FIELD``, else the JSON one of its top level."""
        names = [str(p) for p in loc]
        if len(loc) >= 2 and isinstance(loc[0], str) and isinstance(loc[1], str):
            nested = f"{ENV_PREFIX}{names[0].upper()}__{names[1].upper()}"
            if nested in self.env:
                return nested
        if loc and isinstance(loc[0], str) and f"{ENV_PREFIX}{names[0].upper()}" in self.env:
            return f"{ENV_PREFIX}{names[0].upper()}"
        return None

    def in_file(self, loc: Sequence[str | int]) -> bool:
        node: Any = self.toml
        for part in loc:
            in_list = isinstance(part, int) and isinstance(node, list) and 0 <= part < len(node)
            in_table = isinstance(part, str) and isinstance(node, Mapping) and part in node
            if not (in_list or in_table):
                return False
            node = node[part]
        return True

    def origin(self, loc: Sequence[str | int]) -> Origin:
        if loc and loc[0] in self.overrides:
            return Origin("cli")
        var = self.env_var(loc)
        if var is not None:
            return Origin("env", var)
        if self.config_path is not None and self.in_file(loc):
            return Origin("file", str(self.config_path))
        return Origin("default")


def format_loc(loc: Sequence[str | int]) -> str:
    """``("models", 0, "path")`` -> ``models[0].path``."""
    text = ""
    for part in loc:
        if part == "__root__":
            continue
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _section_fields() -> dict[str, type[BaseModel]]:
    return {
        name: info.annotation
        for name, info in MinerSettings.model_fields.items()
        if isinstance(info.annotation, type) and issubclass(info.annotation, _Section)
    }


def _is_json_valued(annotation: Any) -> bool:
    """True for the annotations pydantic-settings decodes as JSON from a variable: lists, tables, models."""
    if annotation is None:
        return False
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    origin = get_origin(annotation)
    if origin in (list, dict, set, tuple):
        return True
    return any(_is_json_valued(arg) for arg in get_args(annotation) if arg is not type(None)) if origin else False


def known_env_variables() -> dict[str, str]:
    """Every variable that sets something, mapped to the setting's name: ``AITBC_MINER_MINER_ID`` ->
    ``miner_id``, ``AITBC_MINER_COORDINATOR__URL`` -> ``coordinator.url``, ``AITBC_MINER_GPUS`` ->
    ``gpus`` (the whole table as JSON); ``AITBC_MINER_CONFIG`` -> ``--config``."""
    known = {CONFIG_ENV: "--config"}
    sections = _section_fields()
    for name in MinerSettings.model_fields:
        known[f"{ENV_PREFIX}{name.upper()}"] = name
        for sub in sections[name].model_fields if name in sections else ():
            known[f"{ENV_PREFIX}{name.upper()}__{sub.upper()}"] = f"{name}.{sub}"
    return known


def _env_annotation(name: str) -> Any:
    setting = known_env_variables().get(name, "")
    top, _, sub = setting.partition(".")
    info = MinerSettings.model_fields.get(top)
    if info is None:
        return None
    if not sub:
        return info.annotation
    section = _section_fields().get(top)
    sub_info = section.model_fields.get(sub) if section is not None else None
    return sub_info.annotation if sub_info is not None else None


def check_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``AITBC_MINER_*`` variables of ``environ`` (names upper-cased, as pydantic-settings reads
    them case-insensitively), after checking each: an unknown name, or a list or table variable whose
    value is not JSON, raises a one-line :class:`ConfigError` naming the variable."""
    known = known_env_variables()
    found: dict[str, str] = {}
    for raw_name, value in environ.items():
        name = raw_name.upper()
        if not name.startswith(ENV_PREFIX):
            continue
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                f"config error: {raw_name}: not a known setting{hint}; fix its spelling or unset it "
                f"(every {ENV_PREFIX}* variable names a setting, see docs/configuration.md)"
            )
        if _is_json_valued(_env_annotation(name)):
            try:
                json.loads(value)
            except ValueError as exc:
                msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
                raise ConfigError(
                    f"config error: {raw_name}: not valid JSON ({msg}); lists and tables in environment "
                    f"variables are JSON, e.g. '[0, 1]' or '{{\"name\": \"llama2\"}}'; fix or unset {raw_name}"
                ) from exc
        found[name] = value
    return found


# The TOML data is read at run time; settings_customise_sources is a classmethod, so the data
# is handed over here for the duration of one load_settings call.
_TOML_FILE: dict[str, dict[str, Any] | None] = {}


def _format_error(exc: ValidationError, sources: LoadedSources) -> str:
    err = exc.errors()[0]
    loc_parts: list[str | int] = [p for p in err["loc"] if p != "__root__"]
    loc = format_loc(loc_parts)
    config_path = sources.config_path
    where = f" in {config_path}" if config_path else ""
    env_name = _env_name(loc_parts)
    msg = err["msg"].removeprefix("Value error, ")
    origin = sources.origin(loc_parts) if loc_parts else Origin("default")
    levels_in_var = origin.where.removeprefix(ENV_PREFIX).count("__") + 1
    if origin.kind == "env" and len(loc_parts) > levels_in_var:
        # The value came in a JSON variable holding the whole list or table.
        verb = "remove" if err["type"] == "extra_forbidden" else ("set" if err["type"] == "missing" else "fix")
        fix = f"{verb} {loc} in {origin.where}"
    elif origin.kind == "env":
        overrides = f" (it overrides {loc}{where})" if config_path and sources.in_file(loc_parts) else ""
        fix = f"fix or unset {origin.where}{overrides}"
    elif origin.kind == "cli":
        fix = f"fix the command line's {loc}"
    elif err["type"] == "missing":
        fix = f"set {loc}{where}" + (f" or {env_name}" if env_name else "")
    elif err["type"] == "extra_forbidden":
        fix = f"remove {loc}{where}; it is not a known setting (check its spelling)"
    else:
        fix = f"fix {loc or 'the settings'}{where}" + (f" or {env_name}" if env_name else "")
    extra = f" ({len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"config error: {loc + ': ' if loc else ''}{msg}; {fix}{extra}"


def _env_name(loc: Sequence[str | int]) -> str:
    """The variable for ``loc``: ``PREFIX_SECTION__FIELD`` inside a table, else ``PREFIX_TOP``."""
    if not loc or not isinstance(loc[0], str):
        return ""
    top = f"{ENV_PREFIX}{loc[0].upper()}"
    if len(loc) >= 2 and isinstance(loc[1], str) and loc[0] in _section_fields():
        return f"{top}__{loc[1].upper()}"
    return top


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config error: {path} is not valid TOML: {exc}; fix the file") from exc
    except OSError as exc:
        raise ConfigError(f"config error: cannot read {path}: {exc.strerror}") from exc


def load_settings(config_path: Path | str | None = None, **overrides: Any) -> MinerSettings:
    """Load and validate settings. ``config_path=None`` uses the default file if it exists.

    Raises :class:`ConfigError` (one line) for a missing file named explicitly, a malformed
    TOML file, an unknown ``AITBC_MINER_*`` variable, a list or table variable that is not
    JSON, or any invalid setting (naming the variable when the value came from one).
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
    env = check_environment(os.environ)
    toml_data = _read_toml(path) if path is not None else None
    sources = LoadedSources(path, toml_data or {}, env, frozenset(overrides))
    _TOML_FILE["data"] = toml_data
    try:
        settings = MinerSettings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, sources)) from exc
    except ValueError as exc:  # pydantic-settings' SettingsError: a variable it could not decode
        raise ConfigError(
            f"config error: an {ENV_PREFIX}* variable could not be read: {exc}; fix or unset it"
        ) from exc
    finally:
        _TOML_FILE.clear()
    settings._config_path = path
    settings._sources = sources
    return settings
