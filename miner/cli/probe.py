"""``aitbc-miner probe``: what this host would register, without registering.

Prints the GPUs NVML sees (or CPU mode), the driver and CUDA versions, torch's version and
CUDA build beside the driver's highest CUDA version and whether they fit (see
:mod:`miner.host.cudacompat`), each configured model with its runner and whether that runner
can be imported, and the ``capabilities`` object the daemon would send. Without ``--config``
and without the default config file it prints the hardware part only. It never creates the
receipt key. torch is imported only when it is installed (checked through package metadata
first), and then only to ask whether CUDA is available and how many devices it sees.

With ``AITBC_MINER_FAKE_NVML=FILE`` the GPUs come from that simulated host, and the first line
printed (on stderr with ``--json``) says so.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from miner import __version__
from miner.daemon.capabilities import build_capabilities
from miner.host.cudacompat import TorchBuild, fit_line, installed_torch_version, torch_build, torch_index_for
from miner.host.gpuhealth import CHECKS, DEFAULT_CRITICAL_XIDS, health_now
from miner.host.nvml import Nvml
from miner.wire.errors import ConfigError, StateError
from runners.base import GpuInfo

GIB_PER_MIB = 1 / 1024


def _key_id(state_dir: Path) -> tuple[str | None, str]:
    from miner.daemon.keyfile import KEY_FILE_NAME, load_key
    from miner.wire.receipts import key_id

    path = state_dir / KEY_FILE_NAME
    if not path.exists():
        return None, f"no receipt key yet at {path} (created on first run, or by `aitbc-miner keygen`)"
    try:
        return key_id(load_key(path).verify_key), f"receipt key {path}"
    except (ConfigError, StateError) as exc:
        return None, f"receipt key unusable: {exc}"


def torch_report(gpu_enabled: bool, driver_version: str | None, driver_cuda: str | None) -> dict[str, Any]:
    """torch's build and whether it fits the driver, as ``probe`` reports it (the ``torch`` key).

    Imports torch only when it is installed. ``fits``: True / False / None (nothing to judge);
    ``index``/``index_url``: the PyTorch build to install for this driver.
    """
    version = installed_torch_version()
    build = torch_build() if version is not None else TorchBuild(None, None, False, 0, None)
    if gpu_enabled:
        fits, line = fit_line(build, driver_version, driver_cuda)
    else:
        what = f"torch {build.version}" if build.version else "torch: not installed"
        fits, line = None, f"{what}; GPUs disabled by gpus.enabled = false: models run on the CPU"
    tag, url = torch_index_for(driver_cuda if gpu_enabled else None)
    return {**dataclasses.asdict(build), "fits": fits, "line": line, "index": tag, "index_url": url}


def gather(config: Path | None, nvml: Any = None) -> dict[str, Any]:
    """Everything ``probe`` reports, as a JSON-ready dict (``--json`` prints it as is)."""
    from miner.daemon.settings import DEFAULT_CONFIG, load_settings

    settings = None
    if config is not None or DEFAULT_CONFIG.exists():
        settings = load_settings(config)
    gpus: list[GpuInfo] = []
    health: list[dict[str, Any]] = []
    if settings is None or settings.gpus.enabled:
        held = Nvml(nvml)
        try:
            gpus = held.start(settings.gpus.devices if settings else ())
            if gpus and held.available:
                checks = settings.gpus if settings else None
                health = health_now(
                    held.module,
                    gpus,
                    drain_on=checks.drain_on if checks else CHECKS,
                    critical_xids=checks.critical_xids if checks else DEFAULT_CRITICAL_XIDS,
                )
        finally:
            held.close()
    report: dict[str, Any] = {
        "version": __version__,
        "config": str(settings.config_path) if settings and settings.config_path else None,
        "gpu_enabled": settings.gpus.enabled if settings else True,
        "driver_version": next((g.driver_version for g in gpus if g.driver_version), None),
        "cuda": next((g.cuda_version for g in gpus if g.cuda_version), None),
        "gpus": [dataclasses.asdict(g) for g in gpus],
        "gpu_health": health,
        "models": [],
        "capabilities": None,
    }
    report["torch"] = torch_report(report["gpu_enabled"], report["driver_version"], report["cuda"])
    from runners import runner_status

    # Every runner, built-in or installed plugin, with whether it can be imported here.
    status = report["runners"] = runner_status()
    if settings is None:
        return report
    runners: dict[str, list[str]] = {}
    for spec in settings.models:
        state = status.get(spec.runner, f"unknown runner {spec.runner!r}; known: {', '.join(sorted(status))}")
        report["models"].append({"name": spec.name, "runner": spec.runner, "runner_status": state})
        if state == "available":
            runners.setdefault(spec.runner, []).append(spec.name)
    key_id, key_note = _key_id(settings.state_dir)
    report.update(
        miner_id=settings.miner_id,
        coordinator=settings.coordinator.url,
        concurrency=settings.concurrency,  # None: the runners' batch room and GPU memory decide
        receipt_key=key_note,
        capabilities=build_capabilities(
            gpus=gpus,
            models=[name for names in runners.values() for name in names],
            price=settings.price,
            region=settings.region,
            key_id=key_id,
            runners=runners,
        ),
    )
    return report


def _health_line(entry: dict[str, Any]) -> str:
    if entry["state"] == "drained":
        return f"  GPU {entry['index']} health: WOULD NOT TAKE JOBS: {entry['reason']}"
    return f"  GPU {entry['index']} health: ok (ECC, pending pages, throttling, PCIe link)"


def _gpu_line(g: dict[str, Any]) -> str:
    parts = [f"GPU {g['index']}: {g['name']}", g["uuid"], f"{g['memory_total_mb'] * GIB_PER_MIB:.1f} GiB"]
    if g["memory_free_mb"] is not None:
        parts[-1] += f" ({g['memory_free_mb'] * GIB_PER_MIB:.1f} GiB free)"
    if g["compute_capability"]:
        parts.append(f"compute {g['compute_capability']}")
    for key, unit in (("utilization_pct", "% busy"), ("temperature_c", " C"), ("power_w", " W")):
        if g[key] is not None:
            parts.append(f"{g[key]:.0f}{unit}")
    return "  ".join(parts)


def render_text(report: dict[str, Any]) -> str:
    lines = [report["simulated_host"]] if report.get("simulated_host") else []
    lines.append(f"aitbc-miner {report['version']}")
    if not report["gpu_enabled"]:
        lines.append("GPUs: disabled by gpus.enabled = false (CPU mode)")
    elif report["gpus"]:
        lines.append(f"NVIDIA driver {report['driver_version'] or 'unknown'}, CUDA {report['cuda'] or 'unknown'}")
        lines.extend(_gpu_line(g) for g in report["gpus"])
        lines.extend(_health_line(h) for h in report.get("gpu_health", ()))
    else:
        lines.append("GPUs: none found (CPU mode)")
    lines.append(report["torch"]["line"])
    lines.append("runners:")
    lines.extend(f"  {name}: {state}" for name, state in sorted(report["runners"].items()))
    if report["config"] is None and report["capabilities"] is None:
        lines.append("config: none (pass --config PATH to see models and the capabilities to register)")
        return "\n".join(lines)
    lines.append(f"config: {report['config'] or '(environment only)'}")
    inflight = (
        f"at most {report['concurrency']} job(s) in flight"
        if report["concurrency"]
        else "jobs in flight as batch room and GPU memory allow"
    )
    lines.append(f"miner {report['miner_id']} -> {report['coordinator']}, {inflight}")
    lines.append("models:")
    for m in report["models"]:
        lines.append(f"  {m['name']}: runner {m['runner']} ({m['runner_status']})")
    lines.append(report["receipt_key"])
    lines.append("capabilities to register (models appear once their runner has loaded them):")
    lines.append(json.dumps(report["capabilities"], indent=2, sort_keys=True))
    lines.append(f"before going live: aitbc-miner check --config {report['config'] or 'FILE'} (would it serve?)")
    return "\n".join(lines)


def probe_command(args: Any, nvml: Any = None) -> int:
    """Print the probe report; 0, or a ConfigError for the CLI to print (exit 2).

    Log lines (such as the no-driver warning) go to stderr so ``--json`` stays parseable.
    Without ``nvml``, ``AITBC_MINER_FAKE_NVML`` may name a simulated GPU host: its warning line
    is printed first (to stderr with ``--json``, and kept in the report as ``simulated_host``).
    """
    import sys

    from miner.host.fakenvml import nvml_from_env
    from miner.ops.logs import configure_logging

    configure_logging("info", "auto", stream=sys.stderr)
    warning = None
    if nvml is None:
        nvml, warning = nvml_from_env()
    as_json = getattr(args, "json", False)
    if warning and as_json:
        print(warning, file=sys.stderr)
    report = gather(getattr(args, "config", None), nvml)
    report["simulated_host"] = warning
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(render_text(report))
    return 0
