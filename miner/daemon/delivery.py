"""Delivery: from the outbox to the coordinator, until each outcome is acknowledged.

:class:`Deliverer` stores an outcome (``await Outbox.put``: the outbox's writer thread does
the disk work), submits it, and acknowledges or rejects it by the answer:

* 2xx → acknowledged: removed from the outbox;
* any other 4xx but 401/403/429 (``job not found``, ``409`` already settled, ``422``)
  → the coordinator will never take it: moved to ``outbox/rejected/`` and logged;
* unavailable, 429, 401/403 → kept and retried by :meth:`Deliverer.run` with backoff
  (``Retry-After`` for 429);
* 404 "miner not registered" → kept; ``on_not_registered`` asks for a new registration,
  after which delivery resumes.

One outcome is never submitted by two tasks at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from miner.daemon.client import CoordinatorClient
from miner.daemon.pacing import Backoff
from miner.outbox.store import Outbox, OutboxEntry
from miner.wire.errors import (
    AuthenticationFailed,
    CoordinatorError,
    CoordinatorRejected,
    ErrorCode,
    NotRegistered,
    RateLimited,
    StateError,
)

log = structlog.get_logger("miner.daemon.delivery")

AUTH_RETRY_S = 30.0
DISK_PROBE_S = 5.0


def hands_back(entry: OutboxEntry) -> bool:
    """True for an outcome that returns the job to the queue (``SHUTDOWN``): it may come back."""
    return entry.kind == "fail" and entry.body.get("error_code") == ErrorCode.SHUTDOWN


class Deliverer:
    """Moves outcomes from the outbox to the coordinator (see the module docstring).

    ``on_disk_change(healthy, reason)`` is called when the state folder stops or starts
    accepting writes, so the daemon can stop or resume claiming; ``on_not_registered()``
    when the coordinator answers that it does not know this miner.
    """

    def __init__(
        self,
        outbox: Outbox,
        client: CoordinatorClient,
        *,
        on_disk_change: Callable[[bool, str], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
        on_not_registered: Callable[[], None] | None = None,
        disk_probe_s: float = DISK_PROBE_S,
        backoff: Backoff | None = None,
    ) -> None:
        self.outbox = outbox
        self.client = client
        self.wake = asyncio.Event()
        self._busy: set[str] = set()
        self._on_disk_change = on_disk_change
        self._on_depth = on_depth
        self._on_not_registered = on_not_registered
        self._disk_probe_s = disk_probe_s
        self._backoff = backoff or Backoff(0.5, 10.0)
        self.delivered = 0
        self.rejected = 0

    def _depth_changed(self) -> None:
        if self._on_depth is not None:
            self._on_depth(len(self.outbox))

    async def store(self, entry: OutboxEntry) -> bool:
        """Persist ``entry`` before submitting it. False when only kept in memory (disk trouble).

        An entry that cannot be encoded raises ``ValueError``/``TypeError`` for the caller
        (the job fails); the outbox is left as it was.
        """
        try:
            await self.outbox.put(entry)
        except StateError as exc:
            log.error("outcome_kept_in_memory", job_id=entry.job_id, error=str(exc))
            if self._on_disk_change is not None:
                self._on_disk_change(False, self.outbox.reason)
            self.wake.set()  # the flusher probes the disk
            return False
        finally:
            self._depth_changed()
        return True

    async def deliver(self, entry: OutboxEntry) -> bool:
        """Submit ``entry`` once. True when settled (acked or rejected), False if another task has it.

        Transient errors (:class:`CoordinatorError` other than a rejection) propagate.
        """
        if entry.job_id in self._busy:
            return False
        self._busy.add(entry.job_id)
        try:
            try:
                if entry.kind == "result":
                    await self.client.submit_result(entry.job_id, entry.body)
                else:
                    body = entry.body
                    await self.client.fail(
                        entry.job_id, str(body.get("error_code")), str(body.get("error_message")), body.get("metrics")
                    )
            except NotRegistered:
                if self._on_not_registered is not None:
                    self._on_not_registered()
                raise
            except CoordinatorRejected as exc:
                log.warning(
                    "outcome_rejected",
                    job_id=entry.job_id,
                    kind=entry.kind,
                    status=exc.status,
                    reason=str(exc),
                )
                await self.outbox.reject(entry.job_id, str(exc))
                self.rejected += 1
                return True
            await self.outbox.ack(entry.job_id, remember=not hands_back(entry))
            self.delivered += 1
            log.debug("outcome_acknowledged", job_id=entry.job_id, kind=entry.kind)
            return True
        finally:
            self._busy.discard(entry.job_id)
            self._depth_changed()

    async def deliver_now(self, entry: OutboxEntry) -> bool:
        """The fast path right after a job ends: one try; on failure the flusher takes over."""
        try:
            return await self.deliver(entry)
        except CoordinatorError as exc:
            log.warning(
                "outcome_delivery_deferred", job_id=entry.job_id, error=str(exc)
            )
            self.wake.set()
            return False

    async def flush(self) -> int:
        """Deliver every pending outcome in order; stop at the first transient error (raised).

        Returns how many remain (those another task is delivering right now).
        """
        for entry in self.outbox.pending():
            await self.deliver(entry)
        return len(self.outbox)

    async def flush_until_empty(
        self, *, should_stop: Callable[[], bool] = lambda: False, deadline: float | None = None
    ) -> bool:
        """Retry :meth:`flush` with backoff until the outbox is empty. True when it is.

        Gives up when ``should_stop()``, at the ``deadline`` (``time.monotonic()``), or at
        once when the coordinator does not know this miner (registering comes first then).
        """
        backoff = Backoff(0.25, 10.0)
        while True:
            delay = 0.0
            try:
                if await self.flush() == 0:
                    return True
                delay = 0.05  # another task holds an entry; look again shortly
            except NotRegistered:
                return False
            except RateLimited as exc:
                delay = exc.retry_after
            except AuthenticationFailed as exc:
                log.error("credentials_refused", error=str(exc))
                delay = AUTH_RETRY_S
            except CoordinatorError as exc:
                delay = backoff.next_delay()
                log.warning(
                    "outbox_delivery_failed",
                    error=str(exc),
                    pending=len(self.outbox),
                    retry_in_s=round(delay, 2),
                )
            if should_stop():
                return False
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                delay = min(delay, left)
            await asyncio.sleep(delay)

    async def run(self) -> None:
        """The flusher loop: wakes on :attr:`wake` or its retry timer; runs until cancelled."""
        delay: float | None = None
        while True:
            timeout = delay
            if not self.outbox.healthy:
                timeout = self._disk_probe_s if timeout is None else min(timeout, self._disk_probe_s)
            try:
                async with asyncio.timeout(timeout):
                    await self.wake.wait()
            except TimeoutError:
                pass
            self.wake.clear()
            if not self.outbox.healthy:
                await self._probe_disk()
            delay = await self._flush_once()

    async def _flush_once(self) -> float | None:
        """One flush; the seconds until the next try (``None``: wait to be woken)."""
        try:
            await self.flush()
        except NotRegistered:
            delay = None  # registering again wakes us
            log.warning("delivery_waiting_for_registration")
        except RateLimited as exc:
            delay = exc.retry_after
            log.warning("delivery_rate_limited", retry_in_s=round(delay, 1), pending=len(self.outbox))
        except AuthenticationFailed as exc:
            delay = AUTH_RETRY_S
            log.error("credentials_refused", error=str(exc), retry_in_s=delay)
        except CoordinatorError as exc:
            delay = self._backoff.next_delay()
            log.warning(
                "outbox_delivery_failed",
                error=str(exc),
                pending=len(self.outbox),
                retry_in_s=round(delay, 2),
            )
        except Exception as exc:  # a bug must not stop delivery for good
            delay = self._backoff.next_delay()
            log.error("outbox_delivery_unexpected_error", error_type=type(exc).__name__, exc_info=True)
        else:
            self._backoff.reset()
            # Entries still listed are being delivered inline; a failure there wakes us.
            delay = None
        return delay

    async def _probe_disk(self) -> None:
        try:
            healthy = await self.outbox.recover()
        except Exception as exc:  # a bug must not stop the flusher
            log.error("state_folder_probe_error", error_type=type(exc).__name__, exc_info=True)
            return
        if healthy and self._on_disk_change is not None:
            self._on_disk_change(True, "")
