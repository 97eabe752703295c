"""The miner's session with the coordinator: capabilities, registration, heartbeats.

Registration delivers the outbox first (registering tells the coordinator that this
miner's unfinished jobs are lost; ``held_jobs`` names the ones it still holds) and is
retried with jittered backoff until it works or an exit is asked for.

Heartbeats go out on a timer and right after every job ends, with the true in-flight
count: the reference coordinator overwrites its count with the value sent and does not
free a slot on ``/fail``, so a heartbeat right after a job ends is what lets it hand out
the next job. Bursts of job ends are coalesced so heartbeats stay under its 100 a minute.
The answer's ``cancelled_jobs`` stop those jobs; a 404 makes the miner register again; a
change in the set of ready models re-registers with the new capabilities.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

import structlog

from miner import __version__
from miner.daemon.capabilities import build_capabilities
from miner.wire.errors import AuthenticationFailed, CoordinatorError, CoordinatorRejected, NotRegistered, RateLimited
from miner.ops.logs import job_context
from miner.daemon.pacing import Backoff, retry

if TYPE_CHECKING:
    from miner.daemon.agent import Agent

log = structlog.get_logger("miner.daemon.session")

HEARTBEATS_PER_MINUTE = 80
FINAL_ATTEMPTS = 3


class Session:
    """Registration and the heartbeat loop of one :class:`~miner.daemon.agent.Agent`.

    :attr:`capabilities` is what was (or will be) registered; :attr:`registered` is true
    while the coordinator knows this miner. Set :attr:`now` to send a heartbeat as soon
    as the rate allows; :attr:`tick` is the ``time.monotonic()`` of the heartbeat loop's
    last turn (the systemd watchdog checks it).
    """

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.capabilities: dict[str, Any] = {}
        self.registered = False
        self.registering = False
        self.must_register = False  # another call was told "miner not registered"
        self.now = asyncio.Event()
        self.tick = time.monotonic()

    def refresh_capabilities(self) -> bool:
        """Rebuild the capabilities from the models ready now; True when the set changed."""
        agent = self.agent
        assert agent.runtime is not None
        ready = agent.runtime.ready_models()
        changed = not self.capabilities or ready != self.capabilities.get("models")
        if changed:
            self.capabilities = build_capabilities(
                gpus=agent.runtime.gpus,
                models=ready,
                price=agent.settings.price,
                region=agent.settings.region,
                key_id=agent.key_id,
                runners=agent.runtime.models_by_runner(ready),
            )
            agent.metrics.set_loaded_models(ready)
        return changed

    def lost(self) -> None:
        """A call was answered "miner not registered": stop claiming and register again soon."""
        if self.registered:
            log.warning("the coordinator does not know this miner; registering again")
        self.registered = False
        self.agent.health.registered = False
        self.must_register = True
        self.now.set()

    def held_jobs(self) -> list[str]:
        """Jobs this miner still holds: running, or with an outcome not yet delivered."""
        agent = self.agent
        return sorted(set(agent.inflight) | {e.job_id for e in agent.outbox.pending()})

    async def register(self) -> None:
        """Deliver the outbox, then register; retried until it works or an exit is asked for."""
        agent = self.agent
        assert agent.client is not None and agent.deliverer is not None
        self.registered = False
        agent.health.registered = False
        self.registering = True
        try:
            if len(agent.outbox):
                await agent.deliverer.flush_until_empty(should_stop=agent.should_exit.is_set)
            await self._register_until_done()
        finally:
            self.registering = False

    async def _register_until_done(self) -> None:
        agent = self.agent
        assert agent.client is not None
        backoff = Backoff(0.5, 30.0)
        while not agent.should_exit.is_set():
            try:
                await agent.client.register(self.capabilities, agent.slots, agent.settings.region, self.held_jobs())
            except RateLimited as exc:
                delay = exc.retry_after
            except CoordinatorError as exc:
                delay = backoff.next_delay()
                level = log.error if isinstance(exc, (AuthenticationFailed, CoordinatorRejected)) else log.warning
                level("registration failed; retrying", error=str(exc), retry_in_s=round(delay, 2))
            else:
                self.registered = True
                self.must_register = False
                agent.health.registered = True
                agent.pulse_claims()
                if agent.deliverer is not None:
                    agent.deliverer.wake.set()  # outcomes the coordinator refused while it did not know us
                log.info("registered with the coordinator", models=self.capabilities["models"])
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await agent.should_exit.wait()

    async def run(self) -> None:
        interval = self.agent.settings.coordinator.heartbeat_interval_s
        min_gap = 60.0 / HEARTBEATS_PER_MINUTE
        last = 0.0
        self.now.set()  # the first heartbeat goes out at once after registering
        while True:
            self.tick = time.monotonic()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self.now.wait()
            gap = time.monotonic() - last
            if gap < min_gap:
                await asyncio.sleep(min_gap - gap)  # coalesce bursts of job ends
            self.now.clear()
            last = time.monotonic()
            try:
                await self.agent.probe_state_dir()
                await self.once()
            except Exception as exc:  # a bug must not stop the heartbeat for good
                log.error(
                    "unexpected error in the heartbeat; carrying on", error_type=type(exc).__name__, exc_info=True
                )

    async def _metadata(self) -> dict[str, Any]:
        agent = self.agent
        assert agent.runtime is not None
        gpu_stats = await agent.runtime.gpu_stats()
        if agent.runtime.gpus:
            agent.metrics.set_gpu_stats(agent.runtime.gpus)
        return {
            "software": {"name": "aitbc-miner", "version": __version__},
            "draining": agent.stopping,
            "outbox_pending": len(agent.outbox),
            "jobs": self.held_jobs(),  # the coordinator requeues a RUNNING job not listed here
            "gpus": gpu_stats,
        }

    async def final(self) -> None:
        """The last heartbeat before exit (true in-flight count, a few bounded tries); never raises."""
        agent = self.agent
        assert agent.client is not None
        client, metadata = agent.client, await self._metadata()
        try:
            await retry(
                lambda: client.heartbeat(len(agent.inflight), "ONLINE", metadata),
                what="final heartbeat",
                attempts=FINAL_ATTEMPTS,
                backoff=Backoff(0.2, 1.0),
                max_retry_after_s=1.0,
            )
        except CoordinatorError as exc:
            log.warning("final heartbeat not delivered", error=str(exc))

    async def once(self) -> None:
        """Send one heartbeat; act on its answer. Never raises a coordinator error."""
        agent = self.agent
        assert agent.client is not None
        if self.must_register:
            await self.register()
            return
        metadata = await self._metadata()
        try:
            answer = await agent.client.heartbeat(len(agent.inflight), "ONLINE", metadata)
        except NotRegistered:
            log.warning("the coordinator does not know this miner; registering again")
            await self.register()
            return
        except CoordinatorError as exc:
            log.warning("heartbeat failed", error=str(exc))
            return
        agent.health.last_heartbeat = time.time()
        agent.metrics.heartbeat_ok(agent.health.last_heartbeat)
        if self.refresh_capabilities():
            log.info("the set of ready models changed; registering again", models=self.capabilities["models"])
            await self.register()
        for job_id in answer["cancelled_jobs"]:
            run = agent.inflight.get(job_id)
            if run is not None and not run.cancelled_by_coordinator:
                with job_context(job_id, run.model):
                    log.info("the coordinator cancelled this job; stopping it")
                run.cancel()
