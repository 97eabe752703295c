"""The miner's session with the coordinator: registration and heartbeats.

:meth:`Session.run` is one task of the daemon's TaskGroup: it registers (delivering the
outbox first, since registering tells the coordinator that this miner's unfinished jobs
are lost; ``held_jobs`` names the ones it still holds), retrying forever with jittered
backoff while saying why in ``/healthz`` and ``STATUS=``, then heartbeats.

Heartbeats go out on a timer and right after every job ends, with the true in-flight
count: the reference coordinator overwrites its count with the value sent and does not
free a slot on ``/fail``, so a heartbeat right after a job ends is what lets it hand out
the next job. Bursts of job ends are coalesced so heartbeats stay under its 100 a minute.
The answer's ``cancelled_jobs`` stop those jobs; a 404 makes the miner register again; a
change in the set of ready models re-registers with the new capabilities.

The session gets every collaborator explicitly and reports through callbacks; it holds
no reference to the daemon that made it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from miner import __version__
from miner.daemon.client import CoordinatorClient
from miner.daemon.delivery import Deliverer
from miner.daemon.pacing import Backoff, retry
from miner.ops.health import HealthState
from miner.ops.metrics import MinerMetrics
from miner.wire.errors import AuthenticationFailed, CoordinatorError, CoordinatorRejected, NotRegistered, RateLimited

log = structlog.get_logger("miner.daemon.session")

HEARTBEATS_PER_MINUTE = 80
FINAL_ATTEMPTS = 3


@dataclass
class SessionHooks:
    """What the session asks of, and tells, the rest of the daemon.

    ``capabilities()`` builds the capabilities from the models ready now; ``held_jobs()``
    and ``inflight()`` describe the jobs held; ``metadata()`` gives the heartbeat's
    extra fields (GPU readings, draining, outbox depth); ``before_heartbeat()`` runs
    before each heartbeat (the state-folder probe); ``on_registered()`` after each
    successful registration; ``on_unregistered(reason)`` while it is not registered;
    ``on_cancelled(job_id)`` for each job the coordinator cancelled.
    """

    capabilities: Callable[[], dict[str, Any]]
    held_jobs: Callable[[], list[str]]
    inflight: Callable[[], int]
    metadata: Callable[[], Awaitable[dict[str, Any]]]
    before_heartbeat: Callable[[], Awaitable[None]]
    on_registered: Callable[[], None]
    on_unregistered: Callable[[str], None]
    on_cancelled: Callable[[str], None]


class Session:
    """Registration and the heartbeat loop (see the module docstring).

    :attr:`capabilities` is what was (or will be) registered; :attr:`registered` is true
    while the coordinator knows this miner. Set :attr:`now` to send a heartbeat as soon
    as the rate allows; :attr:`tick` is the ``time.monotonic()`` of the heartbeat loop's
    last turn (the systemd watchdog checks it).
    """

    def __init__(
        self,
        client: CoordinatorClient,
        deliverer: Deliverer,
        hooks: SessionHooks,
        *,
        concurrency: int,
        region: str | None,
        heartbeat_interval_s: float,
        health: HealthState,
        metrics: MinerMetrics,
        should_stop: asyncio.Event,
    ) -> None:
        self.client = client
        self.deliverer = deliverer
        self.hooks = hooks
        self.concurrency = concurrency
        self.region = region
        self.heartbeat_interval_s = heartbeat_interval_s
        self.health = health
        self.metrics = metrics
        self.should_stop = should_stop
        self.capabilities: dict[str, Any] = hooks.capabilities()
        self.registered = False
        self.registering = False
        self.must_register = False  # another call was told "miner not registered"
        self.now = asyncio.Event()
        self.tick = time.monotonic()

    def refresh_capabilities(self) -> bool:
        """Rebuild the capabilities from the models ready now; True when the set of models changed."""
        fresh = self.hooks.capabilities()
        changed = fresh.get("models") != self.capabilities.get("models")
        self.capabilities = fresh
        return changed

    def lost(self) -> None:
        """A call was answered "miner not registered": stop claiming and register again soon."""
        if self.registered:
            log.warning("miner_unknown_to_coordinator")
        self._set_unregistered("miner_unknown_to_coordinator")
        self.must_register = True
        self.now.set()

    def _set_unregistered(self, reason: str) -> None:
        self.registered = False
        self.health.registered = False
        self.health.registration_error = reason
        self.hooks.on_unregistered(reason)

    async def register(self) -> None:
        """Deliver the outbox, then register; retried until it works or an exit is asked for."""
        self._set_unregistered(self.health.registration_error or "registering")
        self.registering = True
        try:
            await self.deliverer.flush_until_empty(should_stop=self.should_stop.is_set)
            await self._register_until_done()
        finally:
            self.registering = False

    async def _register_until_done(self) -> None:
        backoff = Backoff(0.5, 30.0)
        while not self.should_stop.is_set():
            self.tick = time.monotonic()
            try:
                await self.client.register(self.capabilities, self.concurrency, self.region, self.hooks.held_jobs())
            except RateLimited as exc:
                delay = exc.retry_after
                self._set_unregistered(f"registration rate limited; retrying in {delay:.0f}s")
            except CoordinatorError as exc:
                delay = backoff.next_delay()
                level = log.error if isinstance(exc, (AuthenticationFailed, CoordinatorRejected)) else log.warning
                level("registration_failed", error=str(exc), retry_in_s=round(delay, 2))
                self._set_unregistered(f"registration failed ({exc}); retrying in {delay:.0f}s")
            else:
                self.registered = True
                self.must_register = False
                self.health.registered = True
                self.health.registration_error = ""
                self.hooks.on_registered()
                self.deliverer.wake.set()  # outcomes the coordinator refused while it did not know us
                log.info("registered", models=self.capabilities["models"])
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.should_stop.wait()

    async def run(self) -> None:
        """Register, then heartbeat until cancelled."""
        await self.register()
        min_gap = 60.0 / HEARTBEATS_PER_MINUTE
        last = 0.0
        self.now.set()  # the first heartbeat goes out at once after registering
        while True:
            self.tick = time.monotonic()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat_interval_s):
                    await self.now.wait()
            gap = time.monotonic() - last
            if gap < min_gap:
                await asyncio.sleep(min_gap - gap)  # coalesce bursts of job ends
            self.now.clear()
            last = time.monotonic()
            try:
                await self.hooks.before_heartbeat()
                await self.once()
            except Exception as exc:  # a bug must not stop the heartbeat for good
                log.error("heartbeat_error", error_type=type(exc).__name__, exc_info=True)

    async def _metadata(self) -> dict[str, Any]:
        metadata: dict[str, Any] = {"software": {"name": "aitbc-miner", "version": __version__}}
        metadata.update(await self.hooks.metadata())
        metadata["jobs"] = self.hooks.held_jobs()  # the coordinator requeues a RUNNING job not listed here
        return metadata

    async def final(self) -> None:
        """The last heartbeat before exit (true in-flight count, a few bounded tries); never raises."""
        metadata = await self._metadata()
        try:
            await retry(
                lambda: self.client.heartbeat(self.hooks.inflight(), "ONLINE", metadata),
                what="final heartbeat",
                attempts=FINAL_ATTEMPTS,
                backoff=Backoff(0.2, 1.0),
                max_retry_after_s=1.0,
            )
        except CoordinatorError as exc:
            log.warning("final_heartbeat_failed", error=str(exc))

    async def once(self) -> None:
        """Send one heartbeat; act on its answer. Never raises a coordinator error."""
        if self.must_register:
            await self.register()
            return
        metadata = await self._metadata()
        try:
            answer = await self.client.heartbeat(self.hooks.inflight(), "ONLINE", metadata)
        except NotRegistered:
            log.warning("miner_unknown_to_coordinator")
            await self.register()
            return
        except CoordinatorError as exc:
            log.warning("heartbeat_failed", error=str(exc))
            return
        self.health.last_heartbeat = time.time()
        self.metrics.heartbeat_ok(self.health.last_heartbeat)
        if self.refresh_capabilities():
            log.info("ready_models_changed", models=self.capabilities["models"])
            await self.register()
        for job_id in answer["cancelled_jobs"]:
            self.hooks.on_cancelled(job_id)
