"""The miner's devices and runners: GPUs probed through NVML, one runner per runner name.

:func:`start_runtime` probes the GPUs (unless a list is given), builds each runner named
in ``[[models]]`` with the models that name it, logs a line for each model it is about to
load, and awaits ``start()`` on each (a bad option raises ``ConfigError``; any other
unexpected exception becomes ``StartupError``). Every configured model stays mapped to
its runner; :meth:`Runtime.ready_models` says which of them may be advertised *now* (an
engine that is down at start, or restarts later, changes that set over time).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from miner.daemon.settings import MinerSettings
from miner.host.energy import EnergyMeter, EnergyReading
from miner.host.fakenvml import FileNvml, simulated_host_warning
from miner.host.gpuhealth import GpuHealthMonitor, HealthChange, XidWatcher, read_health
from miner.host.nvml import Nvml
from miner.ops.logs import safe_text
from miner.ops.metrics import MinerMetrics
from miner.wire.errors import MinerError, StartupError
from runners import load_runner_class
from runners.base import GpuInfo, ModelSpec, Runner, RunnerContext

log = structlog.get_logger("miner.daemon.runtime")

CLOSE_TIMEOUT_S = 30.0


@dataclass
class Runtime:
    """GPUs, started runners, and which runner serves which configured job-facing model."""

    gpus: list[GpuInfo]
    runners: dict[str, Runner] = field(default_factory=dict)
    runners_by_model: dict[str, Runner] = field(default_factory=dict)  # every configured model
    nvml: Nvml | None = None
    health: GpuHealthMonitor | None = None  # None: no GPU, or health checks off
    xids: XidWatcher | None = None
    energy: EnergyMeter | None = None  # None: no GPU

    async def read_energy(self) -> dict[str, EnergyReading]:
        """Every GPU's energy counter now (NVML off the loop); ``{}`` on the CPU or when NVML fails."""
        if self.energy is None or self.nvml is None or not self.nvml.available:
            return {}
        try:
            return await asyncio.to_thread(self.energy.read)
        except Exception as exc:  # energy is reported, never a reason to fail a job
            log.warning("gpu_energy_unreadable", error=str(exc))
            return {}

    def gpu_serving(self, uuid: str) -> bool:
        """Whether the GPU with ``uuid`` may take new jobs (the runners' ``RunnerContext.gpu_serving``)."""
        return self.health is None or self.health.serving(uuid)

    async def poll_health(self) -> list[HealthChange]:
        """Read every GPU's health (NVML off the loop) and return the GPUs that were drained or serve again."""
        if self.health is None or self.nvml is None or not self.nvml.available:
            return []
        module, gpus = self.nvml.module, list(self.gpus)
        try:
            readings = await asyncio.to_thread(read_health, module, gpus, self.xids)
        except Exception as exc:  # a flaky NVML must not stop the miner
            log.warning("gpu_health_unreadable", error=str(exc))
            return []
        return self.health.observe(readings, time.monotonic())

    def ready_models(self) -> list[str]:
        """Configured models their runner reports ready now (sorted); a broken runner counts as none."""
        ready: set[str] = set()
        for name, runner in self.runners.items():
            try:
                ready.update(runner.ready_models())
            except Exception as exc:  # a runner bug must not stop heartbeats
                log.warning(
                    "runner_ready_models_failed", runner=name, error=str(exc)
                )
        return sorted(m for m in ready if m in self.runners_by_model)

    def models_by_runner(self, models: Sequence[str] | None = None) -> dict[str, list[str]]:
        """Runner name -> its models (``models`` restricts to those, e.g. the ready ones)."""
        wanted = set(self.runners_by_model if models is None else models)
        out: dict[str, list[str]] = {}
        for model, runner in sorted(self.runners_by_model.items()):
            if model in wanted:
                out.setdefault(getattr(runner, "name", type(runner).__name__), []).append(model)
        return out

    def max_capacity(self) -> int:
        """The most jobs the runners hold at once: their ``max_capacity()``, one per GPU for the others."""
        total, plain = 0, False
        for runner in self.runners.values():
            limit = _ask(runner, "max_capacity")
            if limit is None:
                plain = True
            else:
                total += limit
        return total + (max(len(self.gpus), 1) if plain or not total else 0)

    def capacity(self) -> int | None:
        """Jobs the runners could hold now; ``None`` when one of them sets no limit of its own."""
        total = 0
        for runner in self.runners.values():
            room = _ask(runner, "capacity")
            if room is None:
                return None
            total += room
        return total

    async def gpu_stats(self) -> list[dict[str, Any]]:
        """Fresh per-GPU readings for the heartbeat (``[]`` in CPU mode); NVML off the loop."""
        if self.nvml is None or not self.nvml.available:
            return []
        try:
            stats = await asyncio.to_thread(self.nvml.read_stats)
        except Exception as exc:  # a flaky NVML must not stop heartbeats
            log.warning("gpu_stats_unreadable", error=str(exc))
            return []
        self.gpus = stats or self.gpus
        return [{k: v for k, v in dataclasses.asdict(g).items() if v is not None and k in _STAT_FIELDS} for g in stats]

    async def aclose(self) -> None:
        for name, runner in self.runners.items():
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await runner.aclose()
            except Exception as exc:
                log.warning("runner_close_failed", runner=name, error=f"{type(exc).__name__}: {exc}")
        self.runners.clear()
        if self.xids is not None:
            await asyncio.to_thread(self.xids.close)
        if self.nvml is not None:
            await asyncio.to_thread(self.nvml.close)


def _ask(runner: Runner, method: str) -> int | None:
    """``runner.<method>()`` as a count, or ``None`` when it has no such method, says None, or fails."""
    fn = getattr(runner, method, None)
    if fn is None:
        return None
    try:
        value = fn()
    except Exception as exc:  # a runner bug must not stop claiming
        log.warning("runner_capacity_failed", runner=getattr(runner, "name", "?"), error=str(exc))
        return None
    return max(int(value), 0) if isinstance(value, int) and not isinstance(value, bool) else None


_STAT_FIELDS = {"index", "uuid", "memory_total_mb", "memory_free_mb", "utilization_pct", "temperature_c", "power_w"}


async def _start(name: str, runner: Runner) -> None:
    """``runner.start()``; a plugin's unexpected exception becomes one line (exit 1), never a traceback."""
    try:
        await runner.start()
    except MinerError:
        raise
    except Exception as exc:
        raise StartupError(f"runner {name!r} failed to start ({type(exc).__name__}); see its documentation") from exc


def group_by_runner(models: Sequence[ModelSpec]) -> dict[str, list[ModelSpec]]:
    groups: dict[str, list[ModelSpec]] = {}
    for spec in models:
        groups.setdefault(spec.runner, []).append(spec)
    return groups


async def start_runtime(
    settings: MinerSettings,
    *,
    nvml: Any = None,
    gpus: Sequence[GpuInfo] | None = None,
    runner_classes: Mapping[str, type] | None = None,
    metrics: MinerMetrics | None = None,
) -> Runtime:
    """Probe, build and start everything; on failure, what was started is closed again."""
    runtime = Runtime(gpus=list(gpus) if gpus is not None else [])
    if gpus is None and settings.gpus.enabled:
        if nvml is None and settings.fake_nvml is not None:
            nvml = await asyncio.to_thread(FileNvml, settings.fake_nvml)
            log.warning("simulated_gpu_host", detail=simulated_host_warning(settings.fake_nvml))
        runtime.nvml = Nvml(nvml)
        runtime.gpus = await asyncio.to_thread(runtime.nvml.start, settings.gpus.devices)
        g = settings.gpus
        if runtime.gpus and runtime.nvml.available:
            runtime.energy = EnergyMeter(runtime.nvml.module, runtime.gpus)
        if runtime.gpus and runtime.nvml.available and g.health_poll_s > 0:
            runtime.health = GpuHealthMonitor(
                runtime.gpus, drain_on=g.drain_on, critical_xids=g.critical_xids, recover_after_s=g.recover_after_s
            )
            runtime.xids = await asyncio.to_thread(XidWatcher, runtime.nvml.module, runtime.gpus)
            await runtime.poll_health()  # a GPU already in trouble takes no job from the start
    try:
        free_vram = runtime.nvml.free_vram_probe() if runtime.nvml is not None else None
        context_gpus = tuple(runtime.gpus)
        for runner_name, specs in group_by_runner(settings.models).items():
            cls = (
                runner_classes[runner_name]
                if runner_classes and runner_name in runner_classes
                else load_runner_class(runner_name)
            )
            state_dir = settings.state_dir / "runners" / runner_name
            context = RunnerContext(
                gpus=context_gpus,
                state_dir=state_dir,
                free_vram_mb=free_vram,
                gpu_serving=runtime.gpu_serving if runtime.health is not None else None,
            )
            runner = cls(specs, context)
            started = time.monotonic()
            runtime.runners[runner_name] = runner
            for spec in specs:
                options = spec.options()
                log.info(
                    "model_loading",
                    model=spec.name,
                    runner=runner_name,
                    source=safe_text(str(options.get("path") or options.get("base_url") or "built-in")),
                    device=safe_text(str(options.get("device") or "auto")),
                    gpus=[g.index for g in context_gpus],
                )
            await _start(runner_name, runner)
            ready = set(runner.ready_models())
            for spec in specs:
                runtime.runners_by_model[spec.name] = runner
                if spec.name in ready:
                    if metrics is not None:
                        metrics.model_loaded(
                            model=spec.name, runner=runner_name, load_seconds=time.monotonic() - started
                        )
                else:
                    log.warning(
                        "model_not_ready_after_start",
                        model=spec.name,
                        runner=runner_name,
                    )
        if metrics is not None:
            metrics.set_loaded_models(runtime.ready_models())
            if runtime.gpus:
                metrics.set_gpu_stats(runtime.gpus)
    except BaseException:
        await runtime.aclose()
        raise
    return runtime
