"""The miner daemon's lifecycle: ``serve()`` = startup → one TaskGroup → shutdown.

Start-up, cheapest and most likely to be wrong first, so a mistake shows in a second,
not after a 13 GB model load: lock the state folder (one miner per folder), the receipt
key, the outbox, bind the metrics/health port, build the coordinator client (the CA
file), then start the runners (model loads), then the capability benchmark
(:mod:`miner.daemon.benchmark`: measured, or reused from its cache), then ``READY=1``. Registration is not part
of start-up: it runs inside the TaskGroup and retries forever, so a coordinator that is
down for a while never gets the service killed and its models reloaded.

The TaskGroup holds the session (register, then heartbeat), the outbox flusher, the
claim slots of the :class:`~miner.daemon.pipeline.JobPipeline`, the systemd watchdog,
the summary and idle lines (:mod:`miner.daemon.summary`), the GPU health checks
(:mod:`miner.host.gpuhealth`: a GPU in trouble takes no new job) and, with
``--exit-when-idle``, the idle watch.

Shutdown (first SIGTERM/SIGINT, ``--max-jobs`` reached, or idle): stop claiming, let the
polls already sent answer, keep heartbeating, ``STOPPING=1``, let in-flight jobs finish
within ``drain_grace_s``, then cancel the rest and fail them ``SHUTDOWN`` through the
outbox, deliver what is left (bounded), close runners, the outbox and the HTTP client. A
second signal forces the exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx
import structlog

from miner import __version__
from miner.daemon.benchmark import published, run_benchmarks
from miner.daemon.capabilities import build_capabilities
from miner.daemon.claiming import Claimer
from miner.daemon.client import CoordinatorClient
from miner.daemon.delivery import Deliverer
from miner.daemon.jobs import JobExecutor
from miner.daemon.keyfile import KEY_FILE_NAME, load_or_create_key
from miner.daemon.pipeline import JobPipeline
from miner.daemon.runtime import Runtime, start_runtime
from miner.daemon.session import Session, SessionHooks
from miner.daemon.settings import MAX_SLOTS, MinerSettings
from miner.daemon.signals import capture_signals
from miner.daemon.statelock import StateLock
from miner.daemon.summary import Activity, Reachability
from miner.host.gpuhealth import HealthChange
from miner.ops.health import HealthState
from miner.ops.logs import register_secret
from miner.ops.metrics import MinerMetrics
from miner.ops.notify import Notifier
from miner.ops.server import MetricsServer
from miner.outbox.store import Outbox
from miner.wire.errors import ConfigError
from miner.wire.receipts import key_id
from runners.base import GpuInfo

log = structlog.get_logger("miner.daemon.agent")

FLUSH_ON_EXIT_S = 10.0


class Agent:
    """The miner daemon (see the module docstring).

    Everything that touches the outside world can be passed in: ``transport`` or
    ``http_client`` (httpx), ``nvml`` (the pynvml module or a fake), ``gpus`` (skip the
    probe), ``runner_classes`` (runner name → class, instead of the registry), ``notifier``,
    ``metrics``, ``clock`` (wall seconds), ``fsync`` (the outbox's). ``max_jobs`` /
    ``exit_when_idle`` make it exit by itself. :meth:`serve` returns the exit code: 0
    clean, 1 forced or after a device error; it raises :class:`ConfigError` (exit 2) or
    another :class:`MinerError` (exit 1) from start-up.
    """

    def __init__(
        self,
        settings: MinerSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        http_client: httpx.AsyncClient | None = None,
        nvml: Any = None,
        gpus: Sequence[GpuInfo] | None = None,
        runner_classes: Mapping[str, type] | None = None,
        notifier: Notifier | None = None,
        metrics: MinerMetrics | None = None,
        health: HealthState | None = None,
        clock: Callable[[], float] = time.time,
        max_jobs: int | None = None,
        exit_when_idle: float | None = None,
        handle_signals: bool = True,
        disk_probe_s: float = 5.0,
        fsync: Callable[[int], None] | None = None,
    ) -> None:
        self.settings = settings
        self._transport = transport
        self._http_client = http_client
        self._nvml = nvml
        self._gpus_override = gpus
        self._runner_classes = runner_classes
        self.notifier = notifier or Notifier()
        self.metrics = metrics or MinerMetrics()
        self.health = health or HealthState(heartbeat_interval_s=settings.coordinator.heartbeat_interval_s)
        self._clock = clock
        self.max_jobs = max_jobs
        self.exit_when_idle = exit_when_idle
        self._handle_signals = handle_signals
        self._disk_probe_s = disk_probe_s

        self.should_exit = asyncio.Event()
        self.force_exit = False
        self.fatal = False  # a device error: exit non-zero so systemd restarts the process
        self.exit_reason = ""
        self.key_id: str | None = None
        self.benchmarks: list[dict[str, Any]] = []  # the signed capability benchmark records
        self.lock = StateLock(settings.state_dir)
        self.outbox = Outbox(settings.state_dir, fsync=fsync or os.fsync)
        self.runtime: Runtime | None = None
        self.client: CoordinatorClient | None = None
        self.deliverer: Deliverer | None = None
        self.session: Session | None = None
        self.pipeline: JobPipeline | None = None
        self.metrics_server: MetricsServer | None = None
        self._main_task: asyncio.Task[Any] | None = None
        self._slots: int | None = None
        self.activity: Activity | None = None
        self.reachability = Reachability()

    # -- what tests and tools read ------------------------------------------------------

    @property
    def capabilities(self) -> dict[str, Any]:
        """The capabilities registered (or to register): ``models`` are the models ready now."""
        return self.session.capabilities if self.session is not None else {}

    @property
    def inflight(self) -> dict[str, Any]:
        return self.pipeline.inflight if self.pipeline is not None else {}

    @property
    def outcomes(self) -> Counter[str]:
        return self.pipeline.outcomes if self.pipeline is not None else Counter()

    @property
    def jobs_ended(self) -> int:
        return self.pipeline.jobs_ended if self.pipeline is not None else 0

    @property
    def slots(self) -> int:
        """Claim loops: ``concurrency`` when set, else the most jobs the runners hold at once."""
        if self.settings.concurrency:
            return self.settings.concurrency
        if self._slots is None and self.runtime is not None and self.runtime.runners:
            self._slots = min(max(self.runtime.max_capacity(), 1), MAX_SLOTS)  # fixed for the run
        return self._slots or 1

    # -- control --------------------------------------------------------------------------

    def request_exit(self, reason: str, fatal: bool = False) -> None:
        """Ask for a graceful exit (idempotent); ``fatal`` makes the exit status 1."""
        self.fatal = self.fatal or fatal
        if not self.should_exit.is_set():
            log.info("shutting_down", reason=reason)
            self.exit_reason = reason
            self.should_exit.set()
            if self.pipeline is not None:
                self.pipeline.pulse()

    def handle_signal(self, signum: int) -> None:
        if self.should_exit.is_set():
            log.warning("second_signal_forcing_exit", signal=signum)
            self.force_exit = True
            if self._main_task is not None:
                self._main_task.cancel()
            return
        self.request_exit(f"signal {signum}")

    async def serve(self) -> int:
        self._main_task = main = asyncio.current_task()
        assert main is not None
        signals = capture_signals(self.handle_signal) if self._handle_signals else contextlib.nullcontext()
        with signals:
            try:
                await self.startup()
                if not self.should_exit.is_set():
                    await self._run_loops()
                return 1 if self.fatal else 0
            except asyncio.CancelledError:
                if not self.force_exit:
                    raise
                main.uncancel()
                return 1
            finally:
                await self._close()

    # -- start-up -------------------------------------------------------------------------

    async def startup(self) -> None:
        """The ordered start-up of the module docstring; each step fails with one line."""
        s = self.settings
        self.lock.acquire()
        api_key = s.api_key()
        for secret in s.secret_values():  # the coordinator key among them
            register_secret(secret)
        key = await asyncio.to_thread(load_or_create_key, s.state_dir / KEY_FILE_NAME)
        self.key_id = key_id(key.verify_key)
        await self.outbox.open()
        if s.metrics.enabled:
            await self._bind_metrics()
        self.client = CoordinatorClient(
            s.coordinator.url,
            api_key=api_key,
            miner_id=s.miner_id,
            timeout_s=s.coordinator.timeout_s,
            ca_file=s.coordinator.ca_file,
            transport=self._transport,
            client=self._http_client,
            observe=self._observe_request,
        )
        warning = s.insecure_transport_warning()
        if warning:
            log.warning("insecure_coordinator_transport", detail=warning)
        self.runtime = await start_runtime(
            s, nvml=self._nvml, gpus=self._gpus_override, runner_classes=self._runner_classes, metrics=self.metrics
        )
        if s.benchmark.enabled:  # before registering, so the first registration carries the records
            self.notifier.status("measuring the capability benchmark")
            self.benchmarks = (await run_benchmarks(self.runtime, s, key, stop=self.should_exit)).records
        self._assemble(key)
        self._health_changed([])  # GPUs already in trouble at start are reported now
        assert self.session is not None
        models = self.session.capabilities["models"]
        log.info(
            "miner_starting",
            miner_id=s.miner_id,
            version=__version__,
            coordinator=s.coordinator.url,
            key_id=self.key_id,
            gpus=len(self.runtime.gpus),
            models=models,
            concurrency=self.slots,
            room_now=self.runtime.capacity(),
        )
        self.notifier.ready(status=f"serving {', '.join(models) or 'no model ready yet'}; registering")

    async def _bind_metrics(self) -> None:
        listen = self.settings.metrics.listen
        self.metrics_server = MetricsServer(listen, self.metrics, self.health)
        try:
            await self.metrics_server.start()
        except OSError as exc:
            self.metrics_server = None
            raise ConfigError(
                f"metrics.listen: cannot listen on {listen}: {exc.strerror or exc}; "
                "free that port or set another metrics.listen (metrics.enabled = false turns the endpoint off)"
            ) from exc

    def _assemble(self, key: Any) -> None:
        """Build the deliverer, the executor, the session and the pipeline, and wire their callbacks."""
        s, runtime, client = self.settings, self.runtime, self.client
        assert runtime is not None and client is not None
        self.deliverer = Deliverer(
            self.outbox,
            client,
            on_disk_change=self._disk_changed,
            on_depth=self.metrics.set_outbox_depth,
            on_not_registered=lambda: self.session.lost() if self.session is not None else None,
            disk_probe_s=self._disk_probe_s,
        )
        executor = JobExecutor(
            miner_id=s.miner_id,
            signing_key=key,
            runners_by_model=runtime.runners_by_model,
            capabilities=lambda: self.capabilities,
            region=s.region,
            clock=self._clock,
            max_result_bytes=s.coordinator.max_result_bytes,
            read_energy=runtime.read_energy,
        )
        c = s.coordinator
        claimer = Claimer(
            client,
            long_poll_s=c.long_poll_s,
            poll_interval_s=c.poll_interval_s,
            idle_backoff_max_s=c.idle_backoff_max_s,
            max_polls_per_minute=c.max_polls_per_minute,
            slots=self.slots,
            on_not_registered=lambda: self.session.lost() if self.session is not None else None,
        )
        self.activity = Activity(
            price=s.price,
            region=s.region,
            models=lambda: list(self.capabilities.get("models", [])),
            answers=lambda: claimer.answers,
            idle_warning_s=s.log.idle_warning_s,
        )
        self.metrics.watch_activity(price=s.price, idle_for=self.activity.idle_for)
        self.pipeline = pipeline = JobPipeline(
            claimer=claimer,
            executor=executor,
            outbox=self.outbox,
            deliverer=self.deliverer,
            metrics=self.metrics,
            slots=self.slots,
            may_claim=self._may_claim,
            on_job_end=self._job_ended,
            on_exit=self.request_exit,
            configured_models=runtime.runners_by_model.keys(),
            capacity=runtime.capacity,
            max_jobs=self.max_jobs,
            poll_bound_s=c.long_poll_s + c.timeout_s,
            activity=self.activity,
        )
        hooks = SessionHooks(
            capabilities=self._capabilities_now,
            held_jobs=pipeline.held_jobs,
            inflight=lambda: len(pipeline.inflight),
            metadata=self._heartbeat_metadata,
            before_heartbeat=self._probe_state_dir,
            on_registered=self._registered,
            on_unregistered=self._unregistered,
            on_cancelled=pipeline.cancel,
        )
        self.session = Session(
            client,
            self.deliverer,
            hooks,
            concurrency=self.slots,
            region=s.region,
            heartbeat_interval_s=c.heartbeat_interval_s,
            health=self.health,
            metrics=self.metrics,
            should_stop=self.should_exit,
        )

    def _capabilities_now(self) -> dict[str, Any]:
        runtime = self.runtime
        assert runtime is not None
        ready = runtime.ready_models()
        self.metrics.set_loaded_models(ready)
        return build_capabilities(
            gpus=runtime.gpus,
            models=ready,
            price=self.settings.price,
            region=self.settings.region,
            key_id=self.key_id,
            runners=runtime.models_by_runner(ready),
            benchmarks=published(self.benchmarks, ready) if self.settings.benchmark.enabled else None,
        )

    # -- the loops ------------------------------------------------------------------------

    async def _run_loops(self) -> None:
        assert self.deliverer is not None and self.session is not None and self.pipeline is not None
        pipeline = self.pipeline
        pipeline.last_activity = time.monotonic()  # start-up time is not idle time
        async with asyncio.TaskGroup() as tg:
            background = [
                tg.create_task(self.session.run(), name="session"),
                tg.create_task(self.deliverer.run(), name="outbox-flusher"),
                tg.create_task(self._watchdog_loop(), name="watchdog"),
                tg.create_task(self._idle_loop(), name="idle-watch"),
                tg.create_task(self._summary_loop(), name="summary"),
                tg.create_task(self._health_loop(), name="gpu-health"),
            ]
            slots = [tg.create_task(pipeline.run_slot(i), name=f"slot-{i}") for i in range(self.slots)]
            self.deliverer.wake.set()
            await self.should_exit.wait()
            await self._drain(slots)
            for task in background:
                task.cancel()

    def _may_claim(self) -> bool:
        session = self.session
        return (
            not self.should_exit.is_set()
            and session is not None
            and session.registered
            and self.outbox.healthy
            and bool(session.capabilities.get("models"))
        )

    def _registered(self) -> None:
        assert self.pipeline is not None
        self.pipeline.pulse()
        self._status()

    def _unregistered(self, reason: str) -> None:
        self.notifier.status(f"not registered yet: {reason}")

    def _job_ended(self) -> None:
        if self.session is not None:
            self.session.now.set()
        self._status()

    async def _heartbeat_metadata(self) -> dict[str, Any]:
        assert self.runtime is not None
        gpu_stats = await self.runtime.gpu_stats()
        await self.runtime.read_energy()  # a power sample for GPUs without an energy counter
        if self.runtime.gpus:
            self.metrics.set_gpu_stats(self.runtime.gpus)
        metadata: dict[str, Any] = {
            "draining": bool(self.pipeline and self.pipeline.stopping),
            "outbox_pending": len(self.outbox),
            "gpus": gpu_stats,
        }
        if self.runtime.health is not None:
            metadata["gpu_health"] = self.runtime.health.report()
        return metadata

    async def _watchdog_loop(self) -> None:
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        c = self.settings.coordinator
        stale_after = 3 * c.heartbeat_interval_s + c.timeout_s
        while True:
            session = self.session
            # Registering retries for as long as the coordinator is away; that is not a hang.
            if session is not None and (session.registering or time.monotonic() - session.tick < stale_after):
                self.notifier.watchdog()
            else:
                log.error("heartbeat_loop_stalled")
            await asyncio.sleep(interval)

    async def _idle_loop(self) -> None:
        if self.exit_when_idle is None or self.pipeline is None:
            return
        while True:
            idle = time.monotonic() - self.pipeline.last_activity
            if not self.pipeline.inflight and not len(self.outbox) and idle >= self.exit_when_idle:
                self.request_exit(f"idle for {self.exit_when_idle:g}s")
                return
            await asyncio.sleep(max(0.05, self.exit_when_idle - idle))

    async def _summary_loop(self) -> None:
        """The ``miner_summary`` line every ``log.summary_interval_s``; ``miner_idle`` once per long idle spell."""
        activity, log_settings = self.activity, self.settings.log
        interval, idle_after = log_settings.summary_interval_s, log_settings.idle_warning_s
        periods = [p for p in (interval, idle_after) if p > 0]
        if activity is None or not periods:
            return
        step = min(max(min(periods) / 4, 0.05), 5.0)
        next_summary = time.monotonic() + interval
        while True:
            await asyncio.sleep(step)
            if interval > 0 and time.monotonic() >= next_summary:
                log.info("miner_summary", **activity.take_summary())
                next_summary = time.monotonic() + interval
            warning = activity.idle_warning()
            if warning is not None:
                log.warning("miner_idle", **warning)

    async def _health_loop(self) -> None:
        """Every ``gpus.health_poll_s``: read each GPU's health; drain a GPU in trouble, restore a recovered one."""
        runtime, poll_s = self.runtime, self.settings.gpus.health_poll_s
        if runtime is None or runtime.health is None or poll_s <= 0:
            return
        while True:
            await asyncio.sleep(poll_s)
            changes = await runtime.poll_health()
            if changes:
                self._health_changed(changes)

    def _health_changed(self, changes: Sequence[HealthChange]) -> None:
        """Log each change, publish the state (``/healthz``, ``/metrics``), heartbeat and re-check room now."""
        runtime = self.runtime
        if runtime is None or runtime.health is None:
            return
        monitor = runtime.health
        for change in changes:
            if change.drained:
                log.warning("gpu_drained", gpu=change.index, uuid=change.uuid, reason=change.reason)
            else:
                log.info("gpu_serving_again", gpu=change.index, uuid=change.uuid, after=change.reason)
        if not changes:
            for index, reason in sorted(monitor.drained().items()):
                log.warning("gpu_drained", gpu=index, uuid=monitor.gpus[index].uuid, reason=reason)
        self.health.gpus_total = len(monitor.gpus)
        self.health.gpus_drained = monitor.drained()
        self.metrics.set_gpu_health(runtime.gpus, monitor.report())
        if changes:
            if self.session is not None:
                self.session.now.set()  # the heartbeat carries the health; models may have changed
            if self.pipeline is not None:
                self.pipeline.pulse()
            self._status()

    def _observe_request(self, endpoint: str, seconds: float, error: str | None) -> None:
        self.metrics.observe_request(endpoint=endpoint, seconds=seconds, error=error)
        outage = self.reachability.observe(error)
        if outage is not None:
            down_s, failures = outage
            log.info("coordinator_reachable_again", after_s=round(down_s, 1), failed_requests=failures)

    async def _probe_state_dir(self) -> None:
        """Check that the state folder can take an outcome (every heartbeat); stop claiming if not."""
        was = self.outbox.healthy
        healthy = await self.outbox.recover()
        if healthy != was:
            self._disk_changed(healthy, self.outbox.reason)

    def _disk_changed(self, healthy: bool, reason: str) -> None:
        # Polls already sent are not cancelled: a job they bring is handed back (SHUTDOWN).
        self.health.disk_ok = healthy
        self.health.disk_reason = reason
        if healthy and self.pipeline is not None:
            self.pipeline.pulse()
        self._status()

    def _status(self) -> None:
        summary = self.pipeline.summary() if self.pipeline is not None else "starting"
        disk = "" if self.outbox.healthy else f"; NOT CLAIMING: {self.outbox.reason}"
        registered = "" if self.session is None or self.session.registered else "; not registered yet"
        self.notifier.status(f"{summary}; outbox {len(self.outbox)}{disk}{registered}")

    # -- shutdown -----------------------------------------------------------------------

    async def _drain(self, slots: list[asyncio.Task[Any]]) -> None:
        assert self.pipeline is not None and self.session is not None and self.deliverer is not None
        self.health.draining = True
        self.notifier.stopping(status=f"draining {len(self.pipeline.inflight)} job(s)")
        await self.pipeline.drain(slots, self.settings.drain_grace_s)
        if len(self.outbox):
            await self.deliverer.flush_until_empty(deadline=time.monotonic() + FLUSH_ON_EXIT_S)
        if len(self.outbox):
            log.warning("exiting_with_undelivered_outcomes", pending=len(self.outbox))
        if self.session.registered:
            # A last heartbeat with the true (zero) in-flight count, so the coordinator's count is right.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.coordinator.timeout_s):
                    await self.session.final()

    async def _close(self) -> None:
        if self.runtime is not None:
            await self.runtime.aclose()
        if self.client is not None:
            await self.client.aclose()
        elif self._http_client is not None:
            await self._http_client.aclose()
        if self.metrics_server is not None:
            await self.metrics_server.aclose()
        await self.outbox.aclose()
        if self.key_id is not None and self.runtime is not None:
            log.info("miner_stopped", reason=self.exit_reason or None, jobs=dict(self.outcomes))
        self.lock.release()
