"""The miner daemon: ``serve()`` = startup → loops in one TaskGroup → shutdown.

Startup: load (or create) the receipt key, probe the GPUs, start the runners, deliver
what the outbox still holds (before registering: registering tells the coordinator that
this miner's unfinished jobs are lost), register, then ``READY=1``.

Loops, all owned by one :class:`asyncio.TaskGroup`: one claim loop per slot, the
heartbeat (on a timer and right after every job ends), the outbox flusher, the systemd
watchdog and, with ``--exit-when-idle``, the idle watch.

Shutdown (first SIGTERM/SIGINT, ``--max-jobs`` reached, or idle): stop claiming, keep
heartbeating, ``STOPPING=1``, let in-flight jobs finish within ``drain_grace_s``, then
cancel the rest and fail them ``SHUTDOWN`` through the outbox, deliver what is left
(bounded), close runners and the HTTP client. A second signal forces the exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import traceback
from collections import Counter
from typing import Any, Callable, Mapping, Sequence

import httpx
import structlog

from miner import __version__
from miner.daemon.claiming import Claimer, SlotPacing
from miner.daemon.client import AssignedJob, CoordinatorClient
from miner.outbox.delivery import Deliverer
from miner.wire.errors import (
    ConfigError,
    ErrorCode,
)
from miner.daemon.jobs import JobExecutor, JobRun, Outcome, fail_body
from miner.ops.logs import job_context, register_secret
from miner.ops.health import HealthState
from miner.ops.metrics import MinerMetrics
from miner.ops.server import MetricsServer
from miner.ops.notify import Notifier
from miner.outbox.store import Outbox, OutboxEntry
from miner.daemon.keyfile import KEY_FILE_NAME, load_or_create_key
from miner.wire.receipts import key_id
from miner.daemon.runtime import Runtime, start_runtime
from miner.daemon.session import Session
from miner.daemon.settings import MinerSettings
from miner.daemon.signals import capture_signals
from runners.base import GpuInfo

log = structlog.get_logger("miner.daemon.agent")

# After drain_grace_s, cancelled jobs get this long to stop before their tasks are abandoned.
CANCEL_GRACE_S = 5.0
FLUSH_ON_EXIT_S = 10.0


class Agent:
    """The miner daemon (see the module docstring).

    Everything that touches the outside world can be passed in: ``transport`` or
    ``http_client`` (httpx), ``nvml`` (the pynvml module or a fake), ``gpus`` (skip the
    probe), ``runner_classes`` (runner name → class, instead of the registry), ``notifier``,
    ``metrics``, ``clock`` (wall seconds). ``max_jobs`` / ``exit_when_idle`` make it exit
    by itself. :meth:`serve` returns the exit code: 0 clean, 1 forced or after a device
    error (the job is failed ``DEVICE_ERROR``, the rest drain); it raises
    :class:`ConfigError` (exit 2) or another :class:`MinerError` (exit 1) from start-up.
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
        self.stopping = False  # no more claims
        self.inflight: dict[str, JobRun] = {}
        self.jobs_reserved = 0  # polls in progress that may return a job (for --max-jobs)
        self.jobs_claimed = 0
        self.jobs_ended = 0
        self.outcomes: Counter[str] = Counter()
        self.key_id: str | None = None
        self.runtime: Runtime | None = None
        self.client: CoordinatorClient | None = None
        self.outbox = Outbox(settings.state_dir)
        self.deliverer: Deliverer | None = None
        self.executor: JobExecutor | None = None
        self.metrics_server: MetricsServer | None = None
        self.session = Session(self)
        self._claim_state = asyncio.Event()  # pulsed when claiming may have become possible
        self._poll_tasks: set[asyncio.Task[Any]] = set()
        self._last_activity = time.monotonic()
        self._main_task: asyncio.Task[Any] | None = None

    # -- public control -----------------------------------------------------------------

    def request_exit(self, reason: str) -> None:
        """Ask for a graceful exit (idempotent)."""
        if not self.should_exit.is_set():
            log.info("shutting down", reason=reason)
            self.exit_reason = reason
            self.should_exit.set()

    def handle_signal(self, signum: int) -> None:
        if self.should_exit.is_set():
            log.warning("second signal: forcing exit", signal=signum)
            self.force_exit = True
            if self._main_task is not None:
                self._main_task.cancel()
            return
        self.request_exit(f"signal {signum}")

    # -- serve --------------------------------------------------------------------------

    async def serve(self) -> int:
        self._main_task = asyncio.current_task()
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
                self._main_task.uncancel()
                return 1
            finally:
                await self._close()

    async def startup(self) -> None:
        s = self.settings
        api_key = s.api_key()
        register_secret(api_key)
        key = await asyncio.to_thread(load_or_create_key, s.state_dir / KEY_FILE_NAME)
        self.key_id = key_id(key.verify_key)
        self.runtime = await start_runtime(
            s, nvml=self._nvml, gpus=self._gpus_override, runner_classes=self._runner_classes, metrics=self.metrics
        )
        await asyncio.to_thread(self.outbox.open)
        self.client = CoordinatorClient(
            s.coordinator.url,
            api_key=api_key,
            miner_id=s.miner_id,
            timeout_s=s.coordinator.timeout_s,
            ca_file=s.coordinator.ca_file,
            transport=self._transport,
            client=self._http_client,
            observe=lambda endpoint, seconds, error: self.metrics.observe_request(
                endpoint=endpoint, seconds=seconds, error=error
            ),
        )
        self.deliverer = Deliverer(
            self.outbox,
            self.client,
            on_disk_change=self._disk_changed,
            on_depth=self.metrics.set_outbox_depth,
            on_not_registered=self.session.lost,
            disk_probe_s=self._disk_probe_s,
        )
        self.session.refresh_capabilities()
        self.executor = JobExecutor(
            miner_id=s.miner_id,
            signing_key=key,
            runners_by_model=self.runtime.runners_by_model,
            capabilities=lambda: self.session.capabilities,
            region=s.region,
            clock=self._clock,
        )
        if s.metrics.enabled:
            self.metrics_server = MetricsServer(s.metrics.listen, self.metrics, self.health)
            await self.metrics_server.start()
        log.info(
            "miner starting",
            miner_id=s.miner_id,
            version=__version__,
            coordinator=s.coordinator.url,
            key_id=self.key_id,
            gpus=len(self.runtime.gpus),
            models=self.session.capabilities["models"],
            concurrency=self.slots,
        )
        await self.session.register()
        if self.session.registered:
            models = ", ".join(self.session.capabilities["models"]) or "no model ready yet"
            self.notifier.ready(status=f"registered; serving {models}")

    @property
    def capabilities(self) -> dict[str, Any]:
        """The capabilities registered (or to register): ``models`` are the models ready now."""
        return self.session.capabilities

    @property
    def slots(self) -> int:
        return self.settings.effective_concurrency(len(self.runtime.gpus) if self.runtime else 0)

    async def _run_loops(self) -> None:
        assert self.deliverer is not None and self.client is not None
        claimer = Claimer(
            self.client,
            long_poll_s=self.settings.coordinator.long_poll_s,
            poll_interval_s=self.settings.coordinator.poll_interval_s,
            idle_backoff_max_s=self.settings.coordinator.idle_backoff_max_s,
            max_polls_per_minute=self.settings.coordinator.max_polls_per_minute,
            slots=self.slots,
            on_not_registered=self.session.lost,
        )
        self._last_activity = time.monotonic()  # start-up time is not idle time
        async with asyncio.TaskGroup() as tg:
            background = [
                tg.create_task(self.session.run(), name="heartbeat"),
                tg.create_task(self.deliverer.run(), name="outbox-flusher"),
                tg.create_task(self._watchdog_loop(), name="watchdog"),
                tg.create_task(self._idle_loop(), name="idle-watch"),
            ]
            slots = [
                tg.create_task(self._slot_loop(claimer, SlotPacing(i)), name=f"slot-{i}") for i in range(self.slots)
            ]
            self.deliverer.wake.set()
            await self.should_exit.wait()
            await self._drain(slots)
            for task in background:
                task.cancel()

    # -- claiming and running jobs -----------------------------------------------------

    def _may_claim(self) -> bool:
        if (
            self.stopping
            or self.should_exit.is_set()
            or not self.session.registered
            or not self.outbox.healthy
            or not self.session.capabilities.get("models")
        ):
            return False
        return self.max_jobs is None or self.jobs_claimed + self.jobs_reserved < self.max_jobs

    def pulse_claims(self) -> None:
        self._claim_state.set()
        self._claim_state.clear()

    async def _slot_loop(self, claimer: Claimer, pacing: SlotPacing) -> None:
        while not self.stopping:
            if self.max_jobs is not None and self.jobs_claimed >= self.max_jobs:
                return
            if not self._may_claim():
                await self._claim_state.wait()
                continue
            self.jobs_reserved += 1
            poll = asyncio.create_task(claimer.claim(pacing), name=f"poll-{pacing.index}")
            self._poll_tasks.add(poll)
            try:
                await asyncio.wait([poll])
            finally:
                self._poll_tasks.discard(poll)
                self.jobs_reserved -= 1
                if not poll.done():
                    poll.cancel()
            if poll.cancelled():
                if self.stopping:
                    return
                continue  # claiming paused (state folder trouble): wait until it may resume
            self.pulse_claims()
            try:
                assigned = poll.result()
                if assigned is not None:
                    self.jobs_claimed += 1
                    await self._handle(assigned)
            except Exception as exc:  # a bug here must not take the other loops down
                log.error(
                    "unexpected error in a claim slot; carrying on",
                    error_type=type(exc).__name__,
                    traceback="".join(traceback.format_tb(exc.__traceback__, limit=-3)),
                )
                await asyncio.sleep(1.0)

    async def _handle(self, assigned: AssignedJob) -> None:
        run = JobRun(assigned)
        with job_context(assigned.job_id, run.model):
            self._last_activity = time.monotonic()
            known = await asyncio.to_thread(self.outbox.state, assigned.job_id)
            if known is not None:
                self.jobs_claimed -= 1  # not a new job: it does not count against --max-jobs
                await self._offered_again(assigned.job_id, known)
                return
            self.inflight[assigned.job_id] = run
            self.metrics.set_inflight(len(self.inflight))
            self.metrics.job_started(model=self._metric_model(run))
            log.info("job claimed", slots_busy=len(self.inflight))
            try:
                if self.stopping:
                    outcome = shutdown_outcome()
                else:
                    assert self.executor is not None
                    outcome = await self.executor.execute(run)
            finally:
                self.inflight.pop(assigned.job_id, None)
                self.metrics.set_inflight(len(self.inflight))
            await self._finish(run, outcome)
        if self.max_jobs is not None and self.jobs_ended >= self.max_jobs:
            self.request_exit(f"--max-jobs {self.max_jobs} reached")

    def _metric_model(self, run: JobRun) -> str:
        """The model label for metrics: a configured model, else "other" (labels stay bounded)."""
        configured = self.runtime.runners_by_model if self.runtime is not None else {}
        return run.model if run.model in configured else "other"

    async def _offered_again(self, job_id: str, known: str) -> None:
        """A job this miner already handled is offered again: never run it twice.

        The outcome this miner still has (pending, or once rejected) is submitted again; a
        job whose outcome was already acknowledged is failed at once, so it does not sit
        RUNNING until its TTL.
        """
        assert self.deliverer is not None
        entry = None
        if known == "pending":
            entry = self.outbox.get(job_id)
        elif known == "rejected":
            entry = await asyncio.to_thread(self.outbox.revive, job_id)
        if entry is None:
            message = "this miner already delivered an outcome for this job; it is not run twice"
            entry = OutboxEntry(job_id, "fail", fail_body(ErrorCode.INTERNAL_ERROR, message))
            await self.deliverer.store(entry)
        log.warning("job offered again; sending the outcome this miner has instead of running it", known=known)
        await self.deliverer.deliver_now(entry)
        self.session.now.set()

    async def _finish(self, run: JobRun, outcome: Outcome) -> None:
        assert self.deliverer is not None
        run.finished = True
        self.outcomes[outcome.outcome_label] += 1
        log.info(
            "job finished",
            outcome=outcome.outcome_label,
            code=outcome.code,
            message=outcome.message or None,
            duration_ms=round(outcome.duration_s * 1000, 1),
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
            tokens_per_s=outcome.tokens_per_s,
        )
        self.metrics.job_finished(
            model=self._metric_model(run),
            outcome=outcome.outcome_label,
            error_code=outcome.code,
            duration_s=outcome.duration_s,
            completion_tokens=outcome.completion_tokens,
        )
        if outcome.kind == "dropped":
            log.info("job cancelled by the coordinator; nothing is submitted for it")
        elif outcome.body is not None:
            entry = OutboxEntry(run.job_id, outcome.kind, outcome.body)
            await self.deliverer.store(entry)
            await self.deliverer.deliver_now(entry)
        self.jobs_ended += 1
        self._last_activity = time.monotonic()
        if outcome.fatal:
            self.fatal = True
            self.request_exit(f"device error: {outcome.message}")
        self.session.now.set()
        self._status()

    # -- watchdog, idle, disk -------------------------------------------------------------

    async def _watchdog_loop(self) -> None:
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        stale_after = 3 * self.settings.coordinator.heartbeat_interval_s + self.settings.coordinator.timeout_s
        while True:
            # Re-registering retries for as long as the coordinator is away; that is not a hang.
            if self.session.registering or time.monotonic() - self.session.tick < stale_after:
                self.notifier.watchdog()
            else:
                log.error("heartbeat loop stalled; withholding the systemd watchdog ping")
            await asyncio.sleep(interval)

    async def _idle_loop(self) -> None:
        if self.exit_when_idle is None:
            return
        while True:
            idle = time.monotonic() - self._last_activity
            if not self.inflight and not len(self.outbox) and idle >= self.exit_when_idle:
                self.request_exit(f"idle for {self.exit_when_idle:g}s")
                return
            await asyncio.sleep(max(0.05, self.exit_when_idle - idle))

    async def probe_state_dir(self) -> None:
        """Check that the state folder can take an outcome (every heartbeat); stop claiming if not."""
        was = self.outbox.healthy
        healthy = await asyncio.to_thread(self.outbox.recover)
        if healthy != was:
            self._disk_changed(healthy, self.outbox.reason)

    def _disk_changed(self, healthy: bool, reason: str) -> None:
        self.health.disk_ok = healthy
        self.health.disk_reason = reason
        if healthy:
            self.pulse_claims()
        else:
            for poll in list(self._poll_tasks):  # a job claimed now could not be made durable
                poll.cancel()
        self._status()

    def _status(self) -> None:
        done = ", ".join(f"{n} {label}" for label, n in sorted(self.outcomes.items())) or "no jobs yet"
        disk = "" if self.outbox.healthy else f"; NOT CLAIMING: {self.outbox.reason}"
        self.notifier.status(f"{len(self.inflight)} in flight; {done}; outbox {len(self.outbox)}{disk}")

    # -- shutdown -----------------------------------------------------------------------

    async def _drain(self, slots: list[asyncio.Task[Any]]) -> None:
        self.stopping = True
        self.health.draining = True
        self.notifier.stopping(status=f"draining {len(self.inflight)} job(s)")
        for poll in list(self._poll_tasks):
            poll.cancel()
        self.pulse_claims()
        grace = self.settings.drain_grace_s
        if self.inflight:
            log.info("waiting for in-flight jobs", jobs=len(self.inflight), grace_s=grace)
        _, pending = await asyncio.wait(slots, timeout=grace) if slots else (set(), set())
        if pending:
            await self._cancel_leftovers(pending)
        if self.deliverer is not None and len(self.outbox):
            await self.deliverer.flush_until_empty(deadline=time.monotonic() + FLUSH_ON_EXIT_S)
        if len(self.outbox):
            log.warning(
                "exiting with undelivered outcomes; they are delivered at the next start", pending=len(self.outbox)
            )
        if self.session.registered:
            # A last heartbeat with the true (zero) in-flight count, so the coordinator's count is right.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.coordinator.timeout_s):
                    await self.session.final()

    async def _cancel_leftovers(self, slots: set[asyncio.Task[Any]]) -> None:
        """Stop the jobs still running after the grace period; each is failed SHUTDOWN."""
        leftover = list(self.inflight.values())
        log.warning("drain grace over; cancelling in-flight jobs", jobs=len(leftover))
        for run in leftover:
            run.cancel(shutdown=True)
        _, stuck = await asyncio.wait(slots, timeout=CANCEL_GRACE_S)
        for task in stuck:  # the runner ignored the cancel flag: abandon its task
            task.cancel()
        if stuck:
            await asyncio.wait(stuck)
        for run in leftover:
            if not run.finished:
                await self._finish(run, shutdown_outcome())

    async def _close(self) -> None:
        if self.runtime is not None:
            await self.runtime.aclose()
        if self.client is not None:
            await self.client.aclose()
        elif self._http_client is not None:
            await self._http_client.aclose()
        if self.metrics_server is not None:
            await self.metrics_server.aclose()
        if self.key_id is not None and self.runtime is not None:
            log.info("miner stopped", reason=self.exit_reason or None, jobs=dict(self.outcomes))


def shutdown_outcome() -> Outcome:
    """The outcome of a job this miner gives back because it is shutting down."""
    message = "the miner is shutting down; the job can be reassigned"
    return Outcome("fail", fail_body(ErrorCode.SHUTDOWN, message), ErrorCode.SHUTDOWN, message)


def run_from_cli(args: argparse.Namespace) -> int:
    """``aitbc-miner run``: load settings, configure logs, serve until told to stop."""
    from miner.ops.logs import configure_logging
    from miner.daemon.settings import load_settings

    settings = load_settings(args.config)
    configure_logging(settings.log.level, settings.log.format)
    if args.max_jobs is not None and args.max_jobs < 1:
        raise ConfigError("--max-jobs must be at least 1")
    agent = Agent(settings, max_jobs=args.max_jobs, exit_when_idle=args.exit_when_idle)
    try:
        return asyncio.run(agent.serve())
    except KeyboardInterrupt:  # a signal before the handlers were installed
        print("interrupted", file=sys.stderr)
        return 130
