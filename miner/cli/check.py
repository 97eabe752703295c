"""``aitbc-miner check``: would this configuration serve? A self-test before going live.

Loads the settings exactly as ``run`` does (:func:`miner.daemon.settings.load_settings`), then
checks, without loading any weights and without registering:

- the coordinator API key is set and readable (``coordinator.api_key``, its file, or the
  systemd credential);
- the state folder is (or can be made) writable and no other miner holds its lock, and an
  existing receipt key is private and well formed;
- the metrics port can be bound (when ``metrics.enabled``);
- the coordinator answers and accepts the key: one heartbeat, the call the daemon makes every
  ``heartbeat_interval_s`` (a coordinator that does not know the miner yet answers "not
  registered", which proves the key was accepted; one that does only has its lease renewed);
- the GPUs in ``gpus.devices`` exist (NVML, or the simulated host of ``fake_nvml``);
- every ``[[models]]`` entry: its runner can be imported and its options are valid; for
  ``transformers`` the folder (or the pinned hub snapshot in the local cache) has a
  ``config.json`` with a decoder shape, a tokenizer and safetensors weights only, the dtype
  is valid, and one job fits the free memory of the GPU(s) the model is bound to; for
  ``openai`` the engine answers ``GET /models`` and lists the model;
- torch can use the GPUs the transformers models are placed on (its CUDA build against the
  driver, and the GPUs visible to it). torch is imported only for that.

Each problem is one line naming the setting and the fix. Exit status: 0 when the miner would
serve (no problem), 1 when a check found a problem, 2 when the settings do not load (the
line ``run`` would print). ``--json`` prints ``{"config", "ok", "problems": [{"check",
"setting", "message"}], "passed": [{"check", "detail"}], "notes": [...]}``.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import fcntl
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from miner.wire.errors import ConfigError, MinerError

if TYPE_CHECKING:  # imported where used: `aitbc-miner --help` builds this parser without loading them
    from miner.daemon.settings import MinerSettings
    from runners.base import GpuInfo, ModelSpec

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_SETTINGS = 2
FIT_PROMPT_TOKENS = 128  # the prompt of the one job a model must fit beside its weights
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tokenizer.tiktoken")


@dataclass(frozen=True)
class Problem:
    """One reason the miner would not serve: ``setting`` is what to change, ``message`` the one line."""

    check: str
    setting: str
    message: str


@dataclass(frozen=True)
class Passed:
    check: str
    detail: str


@dataclass
class CheckReport:
    """Everything ``check`` found; :attr:`ok` is True only without a problem."""

    config: str | None = None
    problems: list[Problem] = field(default_factory=list)
    passed: list[Passed] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, check: str, setting: str, message: str) -> None:
        self.problems.append(Problem(check, setting, message))

    def good(self, check: str, detail: str) -> None:
        self.passed.append(Passed(check, detail))

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "ok": self.ok,
            "problems": [asdict(p) for p in self.problems],
            "passed": [asdict(p) for p in self.passed],
            "notes": list(self.notes),
        }

    def render_text(self) -> str:
        lines = [f"config: {self.config or '(environment only)'}"]
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"ok: {p.check}: {p.detail}" for p in self.passed]
        lines += [f"problem: {p.message}" for p in self.problems]
        if self.ok:
            lines.append("all checks passed: the miner would serve (`aitbc-miner run`)")
        else:
            lines.append(f"{len(self.problems)} problem(s): the miner would not serve; fix each line above")
        return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``check`` beside ``--config`` (which the caller adds)."""
    parser.add_argument(
        "--json",
        action="store_true",
        help="print JSON: config, ok, problems [{check, setting, message}], passed [{check, detail}], notes",
    )


def check_command(args: argparse.Namespace) -> int:
    """Run every check and print the report; 0 only when the miner would serve (see the module docstring).

    A configuration that does not load raises :class:`ConfigError` (the CLI prints it, exit 2);
    with ``--json`` it is printed as the one problem of a JSON report instead, still exit 2.
    """
    from miner.daemon.settings import load_settings
    from miner.ops.logs import configure_logging

    configure_logging("warning", "auto", stream=sys.stderr)  # stdout is the report
    as_json = bool(getattr(args, "json", False))
    try:
        settings = load_settings(getattr(args, "config", None))
    except ConfigError as exc:
        if not as_json:
            raise
        report = CheckReport(config=str(args.config) if getattr(args, "config", None) else None)
        report.problem("settings", "config", str(exc))
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
        return EXIT_SETTINGS
    report = run_checks(settings)
    print(json.dumps(report.to_json(), indent=2, sort_keys=True) if as_json else report.render_text())
    return EXIT_OK if report.ok else EXIT_PROBLEMS


def run_checks(settings: MinerSettings, nvml: Any = None) -> CheckReport:
    """Every check on loaded ``settings``; ``nvml`` (a pynvml-like module) overrides the driver
    and ``settings.fake_nvml``. Never raises for what it checks: each finding is in the report."""
    from miner.ops.logs import register_secret

    for secret in settings.secret_values():
        register_secret(secret)
    report = CheckReport(config=str(settings.config_path) if settings.config_path else None)
    warning = settings.insecure_transport_warning()
    if warning:
        report.notes.append(warning)
    api_key = _check_api_key(settings, report)
    _check_state_dir(settings.state_dir, report)
    gpus = _check_gpus(settings, report, nvml)
    asyncio.run(_check_network(settings, api_key, gpus, report))
    return report


# -- the key, the state folder -------------------------------------------------------------


def _check_api_key(settings: MinerSettings, report: CheckReport) -> str | None:
    try:
        key = settings.api_key()
    except ConfigError as exc:
        report.problem("api_key", "coordinator.api_key", str(exc))
        return None
    report.good("api_key", f"miner API key from {settings.api_key_source()}")
    return key


def _check_state_dir(state_dir: Path, report: CheckReport) -> None:
    """Writable (or creatable), lock free, and an existing receipt key usable; creates nothing."""
    from miner.daemon.keyfile import KEY_FILE_NAME, load_key
    from miner.daemon.statelock import LOCK_FILE_NAME

    if not state_dir.exists():
        parent = state_dir.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
            report.good("state_dir", f"{state_dir} does not exist yet; the miner creates it")
        else:
            report.problem(
                "state_dir",
                "state_dir",
                f"state_dir: {state_dir} does not exist and cannot be created ({parent} is not a writable folder); "
                "create it for the miner's user or set state_dir to a writable folder",
            )
        return
    if not state_dir.is_dir():
        report.problem(
            "state_dir", "state_dir", f"state_dir: {state_dir} is not a folder; set state_dir to a writable folder"
        )
        return
    try:
        fd, probe = tempfile.mkstemp(prefix=".check-", dir=state_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        report.problem(
            "state_dir",
            "state_dir",
            f"state_dir: cannot write in {state_dir} ({exc.strerror or exc}); give the miner's user write access "
            "or set state_dir to a writable folder",
        )
        return
    holder = _lock_holder(state_dir / LOCK_FILE_NAME)
    if holder is not None:
        who = f"pid {holder}" if holder > 0 else "another process"
        report.problem(
            "state_dir",
            "state_dir",
            f"state_dir: {state_dir} is in use by another aitbc-miner ({who}); stop that one first, "
            "or give this one its own state_dir",
        )
        return
    key_path = state_dir / KEY_FILE_NAME
    if not key_path.exists():
        report.good("state_dir", f"{state_dir} writable, not locked; the receipt key is created on first run")
        return
    try:
        load_key(key_path)
    except MinerError as exc:
        report.problem("receipt_key", "state_dir", f"state_dir: {exc}")
        return
    report.good("state_dir", f"{state_dir} writable, not locked; receipt key {key_path} usable")


def _lock_holder(path: Path) -> int | None:
    """``None`` when nobody holds the lock at ``path``; else the holder's pid (0 when unknown)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        return 0
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            return 0
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else 0
    finally:
        os.close(fd)  # closing drops a lock taken here
    return None


# -- GPUs and torch ----------------------------------------------------------------------


def _check_gpus(settings: MinerSettings, report: CheckReport, nvml: Any) -> list[GpuInfo]:
    from miner.host.nvml import probe_gpus

    if not settings.gpus.enabled:
        report.good("gpus", "gpus.enabled = false: CPU mode, NVML not used")
        return []
    try:
        if nvml is None and settings.fake_nvml is not None:
            from miner.host.fakenvml import FileNvml, simulated_host_warning

            nvml = FileNvml(settings.fake_nvml)
            report.notes.append(simulated_host_warning(settings.fake_nvml))
        gpus = probe_gpus(nvml, settings.gpus.devices)
    except ConfigError as exc:
        report.problem("gpus", "gpus.devices", str(exc).removeprefix("config error: "))
        return []
    if gpus:
        names = ", ".join(f"{g.index} {g.name} ({g.uuid})" for g in gpus)
        report.good("gpus", f"{len(gpus)} GPU(s): {names}")
    else:
        report.good("gpus", "no NVIDIA GPU found: models run on the CPU")
    return gpus


def _check_torch(placed: dict[str, list[tuple[GpuInfo, ...]]], gpus: Sequence[GpuInfo], report: CheckReport) -> None:
    """torch can use every GPU a transformers model is placed on (``placed``: model -> copies' GPUs)."""
    from miner.host.cudacompat import cuda_unusable_error, torch_build
    from runners.hf.gpumap import torch_indices, visible_torch_gpus

    wanted = {g.index: g for copies in placed.values() for copy in copies for g in copy}
    if not wanted:
        return
    build = torch_build()
    driver = gpus[0].driver_version if gpus else None
    cuda = gpus[0].cuda_version if gpus else None
    if not build.cuda_available or build.device_count < 1:
        report.problem("torch", "gpus", cuda_unusable_error(build, len(gpus), driver, cuda))
        return
    found = visible_torch_gpus()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    for name, copies in placed.items():
        for copy in copies:
            try:
                torch_indices(_where(name), copy, found, visible)
            except ConfigError as exc:
                report.problem("torch", f"{_where(name)}.devices", str(exc))
                return
    report.good("torch", f"torch {build.version} (CUDA {build.cuda}) sees {build.device_count} GPU(s)")


# -- models, engines, the coordinator -------------------------------------------------------


def _where(name: str) -> str:
    return f"models[name={name!r}]"


def _setting_of(message: str, name: str) -> str:
    """The setting a runner's one-line error names: ``models[name='x'].dtype`` from its start."""
    head = message.removeprefix("config error: ").split(":", 1)[0].strip()
    return head if head.startswith(_where(name)) else _where(name)


async def _check_network(
    settings: MinerSettings, api_key: str | None, gpus: list[GpuInfo], report: CheckReport
) -> None:
    if settings.metrics.enabled:
        await _check_metrics_port(settings.metrics.listen, report)
    placed: dict[str, list[tuple[GpuInfo, ...]]] = {}
    engines: list[Any] = []
    for spec in settings.models:
        try:
            _check_model(spec, settings, gpus, placed, engines, report)
        except ConfigError as exc:
            message = str(exc).removeprefix("config error: ")
            report.problem(f"model {spec.name}", _setting_of(message, spec.name), message)
    if placed:
        from runners.transformers import available

        if available():
            _check_torch({k: v for k, v in placed.items() if v}, gpus, report)
        else:
            report.problem(
                "torch",
                "models.runner",
                "runner 'transformers' needs torch, transformers and safetensors; "
                "install them with: pip install 'aitbc-miner[transformers]'",
            )
    await asyncio.gather(_check_coordinator(settings, api_key, report), _check_engines(engines, report))


async def _check_metrics_port(listen: str, report: CheckReport) -> None:
    from miner.wire.net import parse_host_port

    host, port = parse_host_port(listen, "127.0.0.1:9477")

    async def _refuse(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    try:
        server = await asyncio.start_server(_refuse, host, port)  # binds as the metrics server does
    except OSError as exc:
        report.problem(
            "metrics",
            "metrics.listen",
            f"metrics.listen: cannot listen on {listen}: {exc.strerror or exc}; free that port or set another "
            "metrics.listen (metrics.enabled = false turns the endpoint off)",
        )
        return
    server.close()
    await server.wait_closed()
    report.good("metrics", f"{listen} is free")


def _check_model(
    spec: ModelSpec,
    settings: MinerSettings,
    gpus: list[GpuInfo],
    placed: dict[str, list[tuple[GpuInfo, ...]]],
    engines: list[Any],
    report: CheckReport,
) -> None:
    """One ``[[models]]`` entry; raises ConfigError for its first problem."""
    from runners import load_runner_class

    try:
        load_runner_class(spec.runner)
    except ConfigError as exc:
        raise ConfigError(f"{_where(spec.name)}.runner: {exc}") from exc
    if spec.runner == "transformers":
        _check_transformers(spec, gpus, placed, report)
    elif spec.runner == "openai":
        from runners.base import parse_options
        from runners.openai import OpenAIOptions

        engines.append((spec, parse_options(OpenAIOptions, spec)))
    elif spec.runner == "fake":
        from runners.base import parse_options
        from runners.fake import FakeOptions
        from runners.placement import place_model

        options = parse_options(FakeOptions, spec)
        place_model(_where(spec.name), gpus, options.devices, options.device)
        report.good(f"model {spec.name}", "runner fake (built-in, deterministic text)")
    else:
        report.good(f"model {spec.name}", f"runner {spec.runner} imports; its options are checked when it starts")


def _check_transformers(
    spec: ModelSpec, gpus: list[GpuInfo], placed: dict[str, list[tuple[GpuInfo, ...]]], report: CheckReport
) -> None:
    from runners.base import parse_options
    from runners.hf import source
    from runners.hf.memory import DTYPE_BYTES, MiB, estimate_bytes, mib
    from runners.hf.options import CPU_PLAN, DevicePlan, TransformersOptions, choose_dtype
    from runners.placement import place_model

    where = _where(spec.name)
    options = parse_options(TransformersOptions, spec)
    copies = place_model(where, gpus, options.devices, options.device)
    source.check_source(where, options.path, options.revision)
    folder = _model_folder(where, options.path, options.revision)
    if folder is None:
        placed[spec.name] = [c.gpus for c in copies if not c.on_cpu]
        report.good(
            f"model {spec.name}",
            f"{options.path}@{options.revision} is not in the local hub cache; it is downloaded at start",
        )
        return
    source.check_model_dir(where, folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"{where}.path: no tokenizer in {folder} (tokenizer.json, tokenizer.model or vocab files); "
            "save the tokenizer beside the model with save_pretrained"
        )
    raw, shape, context, max_prompt = source.read_limits(where, folder, options.max_prompt_tokens)
    try:
        params = source.parameter_count(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"{where}.path: unreadable safetensors header in {folder} ({exc}); re-save the model"
        ) from exc
    config_dtype = raw.get("dtype") or raw.get("torch_dtype")
    sizes = []
    for copy in copies:
        bf16_ok = bool(copy.gpus) and all(_capability(g) >= (8, 0) for g in copy.gpus)
        plan = CPU_PLAN if copy.on_cpu else DevicePlan(copy.key, tuple(g.index for g in copy.gpus), copy.gpus)
        dtype = choose_dtype(options.dtype, config_dtype, plan, bf16_ok)
        need = estimate_bytes(
            shape,
            prompt_tokens=min(FIT_PROMPT_TOKENS, max_prompt),
            max_new_tokens=min(options.max_new_tokens, context - 1),
            batch=1,
            dtype=dtype,
            weight_bytes=params * DTYPE_BYTES[dtype],
        )
        room = None if copy.on_cpu else sum(_free_mb(g) for g in copy.gpus) * MiB
        if options.memory_budget_mb is not None:
            budget = options.memory_budget_mb * MiB
            room = budget if room is None else min(room, budget)
        device = "the CPU" if copy.on_cpu else "GPU " + "+".join(str(g.index) for g in copy.gpus)
        if room is not None and need.total > room:
            setting = f"{where}.memory_budget_mb" if options.memory_budget_mb is not None else f"{where}.devices"
            raise ConfigError(
                f"{setting}: one job needs {need.describe()} on {device}, but only {mib(room)} are available; "
                "free memory there, choose a smaller dtype or model, raise memory_budget_mb, "
                "or shard it over more GPUs with devices = [0, 1]"
            )
        sizes.append(f"{device} {dtype} {mib(need.total)}")
    placed[spec.name] = [c.gpus for c in copies if not c.on_cpu]
    report.good(f"model {spec.name}", f"{folder}: config, tokenizer, safetensors; fits ({', '.join(sizes)})")


def _model_folder(where: str, path: str, revision: str | None) -> Path | None:
    """The local folder of ``path``: itself, the cached hub snapshot, or ``None`` (not cached, fetched at start)."""
    from runners.hf import source

    if not source.is_hub_id(path):
        return Path(path).expanduser()
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # without the transformers extra: that is reported on its own
        return None
    cached = try_to_load_from_cache(path, "config.json", revision=revision)
    if isinstance(cached, str):
        return Path(cached).parent
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        raise ConfigError(
            f"{where}.path: {path}@{revision} is not in the local hub cache and HF_HUB_OFFLINE is set; "
            "download it once or point path at a local folder"
        )
    return None


def _capability(gpu: GpuInfo) -> tuple[int, int]:
    major, _, minor = (gpu.compute_capability or "0.0").partition(".")
    return (int(major), int(minor or 0)) if major.isdigit() and (minor or "0").isdigit() else (0, 0)


def _free_mb(gpu: GpuInfo) -> int:
    return gpu.memory_free_mb if gpu.memory_free_mb is not None else gpu.memory_total_mb


async def _check_engines(engines: list[Any], report: CheckReport) -> None:
    """Each openai model's engine answers ``GET /models`` and lists it (as the runner's start does)."""
    if not engines:
        return
    import httpx

    from miner.wire.secretfile import read_secret_file
    from runners.openai_engine import EngineState

    states: dict[tuple[str, Path | None, bool], Any] = {}
    served: list[tuple[ModelSpec, Any, Any]] = []
    for spec, options in engines:
        engine_key = (options.base_url, options.api_key_file, options.check_models)
        engine = states.get(engine_key)
        if engine is None:
            api_key = None
            if options.api_key_file is not None:
                try:
                    api_key = read_secret_file(
                        options.api_key_file, f"{_where(spec.name)}.api_key_file", "the engine's API key"
                    )
                except ConfigError as exc:
                    report.problem(f"model {spec.name}", f"{_where(spec.name)}.api_key_file", str(exc))
                    continue
            engine = states[engine_key] = EngineState(
                options.base_url, api_key, check_models=options.check_models, recheck_interval_s=60.0
            )
        engine.served[spec.name] = options.served_model or spec.name
        served.append((spec, options, engine))
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0), follow_redirects=False) as client:
        await asyncio.gather(*(engine.check(client) for engine in states.values()))
    for spec, options, engine in served:
        model = options.served_model or spec.name
        reason = engine.unready_reason(model)
        where = _where(spec.name)
        if reason is None:
            report.good(f"model {spec.name}", f"the engine at {options.base_url} serves {model!r}")
        elif engine.problem is not None:
            report.problem(
                f"model {spec.name}",
                f"{where}.base_url",
                f"{where}.base_url: the engine at {options.base_url}: {reason}; start the engine or fix base_url",
            )
        else:
            listed = ", ".join(sorted(engine.listed)[:10]) or "nothing"
            report.problem(
                f"model {spec.name}",
                f"{where}.served_model",
                f"{where}.served_model: the engine at {options.base_url} does not list {model!r} (it lists: {listed}); "
                "set served_model to the engine's name for it, or start the engine with that model",
            )


async def _check_coordinator(settings: MinerSettings, api_key: str | None, report: CheckReport) -> None:
    """One heartbeat: reachable, and the key accepted (see the module docstring)."""
    from miner.daemon.client import CoordinatorClient
    from miner.wire.errors import (
        AuthenticationFailed,
        CoordinatorRejected,
        CoordinatorUnavailable,
        NotRegistered,
        RateLimited,
    )

    c = settings.coordinator
    if api_key is None:
        return  # the missing key is its own problem; without one every call is refused
    try:
        client = CoordinatorClient(
            c.url, api_key=api_key, miner_id=settings.miner_id, timeout_s=c.timeout_s, ca_file=c.ca_file
        )
    except ConfigError as exc:
        message = str(exc)
        report.problem("coordinator", message.split(":", 1)[0], message)
        return
    try:
        await client.heartbeat(0)
        report.good("coordinator", f"{c.url} reachable; the API key is accepted (miner {settings.miner_id} known)")
    except NotRegistered:
        report.good("coordinator", f"{c.url} reachable; the API key is accepted (miner not registered yet)")
    except AuthenticationFailed as exc:
        setting = "miner_id" if exc.status == 403 else "coordinator.api_key"
        report.problem(
            "coordinator",
            setting,
            f"{setting}: the coordinator at {c.url} refused the miner ({exc}); set the miner API key the "
            "coordinator's operator gave you" + (", or another miner_id" if exc.status == 403 else ""),
        )
    except RateLimited as exc:
        report.problem(
            "coordinator",
            "coordinator.url",
            f"coordinator.url: {c.url} rate-limited the check; run it again in {exc.retry_after:.0f} s",
        )
    except CoordinatorRejected as exc:
        report.problem(
            "coordinator",
            "coordinator.url",
            f"coordinator.url: {c.url} refused the heartbeat ({exc}); check that the URL is the coordinator's root",
        )
    except CoordinatorUnavailable as exc:
        report.problem(
            "coordinator",
            "coordinator.url",
            f"coordinator.url: cannot reach the coordinator at {c.url} ({exc}); check the URL, the network "
            "and that the coordinator is up",
        )
    finally:
        await client.aclose()


if __name__ == "__main__":  # python -m miner.cli.check --config F
    from miner.cli.main import main

    sys.exit(main(["check", *sys.argv[1:]]))
