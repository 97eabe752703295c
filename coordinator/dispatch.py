"""Matching jobs to miners: FIFO queue, long-poll waiters, leases and TTL expiry.

The :class:`Dispatcher` owns every state change of a job; each one is written to the
store in one short transaction and then published to the job's websocket subscribers.
All of it runs on the event loop, so a claim is atomic without further locking.

* A poll first claims the oldest QUEUED job this miner matches; with none, it waits as
  a *waiter* (up to ``max_wait_seconds``, capped). A job that becomes QUEUED is handed
  straight to the first waiting miner it matches, so the poll answers within
  milliseconds of the submit.
* A miner's lease is renewed by every authenticated call; a miner silent for longer than
  ``lease_seconds`` loses its RUNNING jobs back to the queue (sweeper task).
* A job whose TTL passes before it completes becomes EXPIRED (sweeper task).

Matching uses :func:`miner.wire.protocol.parse_constraints` and
:func:`miner.wire.protocol.unmet_constraint`, so the miner's own admission check agrees,
and (unless the behaviour is the reference service's) the job's model: a job whose
``payload.model`` is a string goes only to a miner whose ``capabilities.models`` lists it
(``constraints.models`` is checked by the constraints). A job no connected miner serves
stays QUEUED until a miner registers its model, or its TTL passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from coordinator.errors import MINER_NOT_REGISTERED, ApiError, not_found
from coordinator.quirks import Behaviour
from coordinator.store import JobRow, MinerRow, PaymentRow, Store, dumps
from miner.wire.protocol import ConstraintError, Constraints, parse_constraints, unmet_constraint, utc_iso

ACTIVE = ("QUEUED", "RUNNING")
MAX_SWEEP_DELAY_S = 1.0


def job_model(payload: dict[str, Any]) -> str | None:
    """The model a job asks for: ``payload.model`` when it is a non-empty string."""
    model = payload.get("model")
    return model if isinstance(model, str) and model else None


def serves_model(capabilities: dict[str, Any], model: str) -> bool:
    """True when the miner registered ``model`` in ``capabilities.models``."""
    models = capabilities.get("models")
    return isinstance(models, list) and model in models


@functools.lru_cache(maxsize=1024)
def _parsed_constraints(text: str) -> Constraints | None:
    """Parsed constraints of a stored job (many jobs share the same text)."""
    try:
        return parse_constraints(json.loads(text))
    except (ConstraintError, ValueError):
        return None


@dataclass(eq=False)
class _Waiter:
    miner_id: str
    future: asyncio.Future[JobRow]


class Dispatcher:
    """Job lifecycle and matching over a :class:`Store` (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        behaviour: Behaviour,
        *,
        lease_seconds: float = 60.0,
        max_poll_wait: float = 30.0,
        unheld_grace_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.behaviour = behaviour
        self.lease_seconds = lease_seconds
        # A job assigned this long ago that the miner's heartbeat does not list never reached it
        # (the poll answer was lost); the grace covers a heartbeat crossing the answer in flight.
        self.unheld_grace_s = unheld_grace_s
        self.max_poll_wait = max_poll_wait
        self.clock = clock
        self._waiters: list[_Waiter] = []
        self._subscribers: dict[str, set[asyncio.Queue[dict[str, Any]]]] = {}
        self._wake = asyncio.Event()
        self._next_sweep_at = 0.0
        self.should_exit = False

    # -- events -------------------------------------------------------------------------

    def subscribe(self, job_id: str) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._subscribers.setdefault(job_id, set()).add(queue)
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue[dict[str, Any]]) -> None:
        subscribers = self._subscribers.get(job_id)
        if subscribers is not None:
            subscribers.discard(queue)
            if not subscribers:
                del self._subscribers[job_id]

    def publish(self, job_id: str, state: str, ts: float) -> None:
        for queue in self._subscribers.get(job_id, ()):
            queue.put_nowait({"job_id": job_id, "state": state, "timestamp": utc_iso(ts)})

    # -- client side --------------------------------------------------------------------

    def job_for(self, owner: str, job_id: str) -> JobRow:
        """The job, if ``owner`` submitted it; 404 otherwise (other clients' jobs stay hidden)."""
        job = self.store.get_job(job_id)
        if job is None or job.owner != owner:
            raise not_found(job_id)
        return job

    def submit(self, owner: str, payload: dict[str, Any], constraints: dict[str, Any], ttl_seconds: int,
               payment_amount: float | None, payment_currency: str) -> JobRow:
        try:
            parse_constraints(constraints)
        except ConstraintError as exc:
            raise ApiError(422, f"body.{exc}") from exc
        now = self.clock()
        job_id = secrets.token_hex(16)
        payment_id = f"pay-{secrets.token_hex(12)}" if payment_amount is not None else None
        with self.store.transaction() as conn:
            self.store.insert_job(
                conn, job_id=job_id, owner=owner, payload=payload, constraints=constraints,
                ttl_seconds=ttl_seconds, state="QUEUED", requested_at=now, expires_at=now + ttl_seconds,
                updated_at=now, payment_id=payment_id, model=job_model(payload),
            )
            if payment_id is not None and payment_amount is not None:
                self.store.add_payment(conn, PaymentRow(payment_id, job_id, payment_amount, payment_currency,
                                                        "escrowed", now, now))
        job = self.store.get_job(job_id)
        assert job is not None
        self.publish(job_id, "QUEUED", now)
        self._deadline_at(job.expires_at)
        self.offer([(job_id, dumps(constraints), job.model)])
        return self.store.get_job(job_id) or job

    def cancel(self, owner: str, job_id: str) -> JobRow:
        job = self.job_for(owner, job_id)
        cancelled = self.behaviour.cancelled_state
        if job.state == cancelled:
            return job
        if job.state not in ACTIVE:
            raise ApiError(409, f"job {job_id} is {job.state}; only QUEUED or RUNNING jobs can be cancelled")
        now = self.clock()
        keep_assignment = self.behaviour.report_cancelled
        with self.store.transaction() as conn:
            self.store.update_job(
                conn, job_id, state=cancelled, error="Cancelled by user", updated_at=now, completed_at=now,
                assigned_miner_id=job.assigned_miner_id if keep_assignment else None,
                cancel_pending=int(job.state == "RUNNING" and keep_assignment),
            )
            self.store.set_payment_status(conn, job_id, "refunded", now)
        self.publish(job_id, cancelled, now)
        if job.state == "RUNNING":
            self.offer(None)
        return self.store.get_job(job_id) or job

    # -- miner side ---------------------------------------------------------------------

    def miner(self, miner_id: str) -> MinerRow:
        """The registered miner, its lease renewed; 404 ``miner not registered`` otherwise."""
        miner = self.store.get_miner(miner_id)
        if miner is None:
            raise ApiError(404, MINER_NOT_REGISTERED)
        self.store.touch_miner(miner_id, self.clock())
        return miner

    def check_key(self, miner_id: str, key_hash: str) -> None:
        """403 when ``miner_id`` is bound to another miner API key than the one hashed as ``key_hash``."""
        if not self.behaviour.bind_miner_keys:
            return
        miner = self.store.get_miner(miner_id)
        if miner is not None and miner.key_hash is not None and not hmac.compare_digest(miner.key_hash, key_hash):
            raise ApiError(403, f"X-Miner-ID: miner id {miner_id!r} is registered with another miner API key; "
                                "send the key it registered with, or use another miner id")

    def register(self, miner_id: str, capabilities: dict[str, Any], concurrency: int, region: str | None,
                 receipt_key: str | None, held_jobs: Iterable[str] = (), key_hash: str | None = None) -> str:
        """Register (or re-register) a miner; its RUNNING jobs not in ``held_jobs`` are requeued.

        A restarted miner holds nothing, so all its RUNNING jobs go back to the queue at
        once; a miner that re-registers to update its capabilities keeps what it runs.
        The id stays bound to the key (``key_hash``) that first registered it: another key
        is refused 403 (unless the behaviour does not bind keys).
        """
        if key_hash is not None:
            self.check_key(miner_id, key_hash)  # again here: no await between this check and the write
        now = self.clock()
        token = secrets.token_hex(16)
        held = set(held_jobs)
        running = self.store.running_jobs(miner_id)
        requeued = [job for job in running if job.job_id not in held]
        with self.store.transaction() as conn:
            self.store.upsert_miner(conn, MinerRow(miner_id, capabilities, concurrency, region, "ONLINE", 0, now,
                                                   now, token, receipt_key, key_hash))
            for job in requeued:
                self.requeue(conn, job, now)
            stale = [row[0] for row in conn.execute(
                "SELECT job_id FROM jobs WHERE assigned_miner_id = ? AND cancel_pending = 1", (miner_id,))]
            conn.executemany("UPDATE jobs SET cancel_pending = 0 WHERE job_id = ?",
                             [(job_id,) for job_id in stale if job_id not in held])
        self.after_requeue(requeued, now)
        if self.behaviour.dispatch_by_model:
            self.offer(None)  # a waiting poll of this miner may now match a job for a model it added
        return token

    def heartbeat(self, miner_id: str, inflight: int | None, status: str | None,
                  held_jobs: list[str] | None = None) -> list[str] | None:
        """Renew the lease; the ids of this miner's cancelled jobs (``None`` in reference mode).

        ``held_jobs`` (the heartbeat's ``metadata.jobs``, when the miner sends it) lets the
        coordinator requeue a job whose poll answer never reached the miner.
        """
        miner = self.miner(miner_id)
        if held_jobs is not None and not self.behaviour.heartbeat_sets_inflight:
            self._requeue_unheld(miner_id, set(held_jobs))
        values: dict[str, Any] = {}
        if status is not None:
            values["status"] = status[:32]
        if self.behaviour.heartbeat_sets_inflight and inflight is not None:
            values["inflight"] = inflight
        if values:
            with self.store.transaction() as conn:
                self.store.update_miner(conn, miner.miner_id, **values)
        if not self.behaviour.report_cancelled:
            return None
        return self.store.cancel_notices(miner_id, self.behaviour.cancelled_state)

    def _requeue_unheld(self, miner_id: str, held: set[str]) -> None:
        now = self.clock()
        lost = [job for job in self.store.running_jobs(miner_id)
                if job.job_id not in held and job.started_at is not None
                and job.started_at < now - self.unheld_grace_s]
        if not lost:
            return
        with self.store.transaction() as conn:
            for job in lost:
                self.requeue(conn, job, now)
        self.after_requeue(lost, now)

    def _has_slot(self, miner: MinerRow) -> bool:
        if self.behaviour.heartbeat_sets_inflight:
            return miner.inflight < miner.concurrency
        return self.store.running_count(miner.miner_id) < miner.concurrency

    def _matches(self, constraints_text: str, model: str | None, miner: MinerRow) -> bool:
        if self.behaviour.dispatch_by_model and model is not None and not serves_model(miner.capabilities, model):
            return False
        constraints = _parsed_constraints(constraints_text)
        return constraints is not None and unmet_constraint(constraints, miner.capabilities, miner.region) is None

    def _assign(self, job_id: str, miner: MinerRow) -> JobRow | None:
        now = self.clock()
        with self.store.transaction() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET state = 'RUNNING', assigned_miner_id = ?, started_at = ?, updated_at = ?, "
                "attempts = attempts + 1 WHERE job_id = ? AND state = 'QUEUED'",
                (miner.miner_id, now, now, job_id),
            )
            if cursor.rowcount != 1:
                return None
            if self.behaviour.heartbeat_sets_inflight:
                conn.execute("UPDATE miners SET inflight = inflight + 1 WHERE miner_id = ?", (miner.miner_id,))
        self.publish(job_id, "RUNNING", now)
        self._deadline_at(now + self.lease_seconds)
        return self.store.get_job(job_id)

    def claim_next(self, miner_id: str) -> JobRow | None:
        """Claim the oldest QUEUED job this miner matches, if it has a free slot."""
        miner = self.store.get_miner(miner_id)
        if miner is None or not self._has_slot(miner):
            return None
        for job_id, constraints_text, model in self.store.queued_constraints():
            if self._matches(constraints_text, model, miner):
                return self._assign(job_id, miner)
        return None

    async def poll(self, miner_id: str, max_wait_seconds: float,
                   disconnected: Callable[[], Awaitable[Any]] | None = None) -> JobRow | None:
        """Claim a job, waiting up to ``max_wait_seconds`` (capped) for one when long-polling.

        ``disconnected`` returns when the miner hangs up; the wait then ends without a job,
        so no job is handed to a poll nobody will read.
        """
        self.miner(miner_id)
        job = self.claim_next(miner_id)
        wait = min(max_wait_seconds, self.max_poll_wait)
        if job is not None or not self.behaviour.long_poll or wait <= 0 or self.should_exit:
            return job
        waiter = _Waiter(miner_id, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        watcher = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        try:
            await asyncio.wait({waiter.future, *([watcher] if watcher else [])}, timeout=wait,
                               return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.requeue_unsent(waiter.future.result())
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            if watcher is not None:
                watcher.cancel()
        if waiter.future.done() and not waiter.future.cancelled():
            if watcher is not None and watcher.done() and not watcher.cancelled():
                self.requeue_unsent(waiter.future.result())  # handed over just as the miner left
                return None
            return waiter.future.result()
        waiter.future.cancel()
        return None

    def offer(self, queued: list[tuple[str, str, str | None]] | None) -> None:
        """Hand QUEUED jobs, as ``(job_id, constraints JSON, model)`` (every QUEUED job if ``None``),
        to matching waiters, first job first, first waiter first."""
        if not self._waiters:
            return
        if queued is None:
            queued = self.store.queued_constraints()
        miners: dict[str, MinerRow | None] = {}
        has_slot: dict[str, bool] = {}
        for job_id, constraints_text, model in queued:
            live = [w for w in self._waiters if not w.future.done()]
            if not live:
                return
            for waiter in live:
                if waiter.miner_id not in miners:
                    miner = miners[waiter.miner_id] = self.store.get_miner(waiter.miner_id)
                    has_slot[waiter.miner_id] = miner is not None and self._has_slot(miner)
                miner = miners[waiter.miner_id]
                if miner is None or not has_slot[waiter.miner_id] or not self._matches(constraints_text, model, miner):
                    continue
                claimed = self._assign(job_id, miner)
                if claimed is not None:
                    self._waiters.remove(waiter)
                    waiter.future.set_result(claimed)
                    miners[waiter.miner_id] = self.store.get_miner(waiter.miner_id)
                    has_slot[waiter.miner_id] = self._has_slot(miners[waiter.miner_id] or miner)
                break

    def release_waiters(self) -> None:
        """Answer every waiting poll with "no job" (shutdown)."""
        self.should_exit = True
        self._wake.set()
        for waiter in self._waiters:
            if not waiter.future.done():
                waiter.future.cancel()

    def requeue_unsent(self, job: JobRow) -> None:
        """A claimed job whose poll answer never went out goes back to the queue."""
        now = self.clock()
        with self.store.transaction() as conn:
            current = self.store.get_job(job.job_id)
            if current is None or current.state != "RUNNING" or current.assigned_miner_id != job.assigned_miner_id:
                return
            self.requeue(conn, current, now)
        self.after_requeue([job], now)

    # -- requeue, leases and expiry -------------------------------------------------------

    def requeue(self, conn: Any, job: JobRow, now: float) -> None:
        self.store.update_job(conn, job.job_id, state="QUEUED", assigned_miner_id=None, started_at=None,
                              updated_at=now)
        if self.behaviour.heartbeat_sets_inflight and job.assigned_miner_id:
            conn.execute("UPDATE miners SET inflight = MAX(inflight - 1, 0) WHERE miner_id = ?",
                         (job.assigned_miner_id,))

    def after_requeue(self, jobs: list[JobRow], now: float) -> None:
        for job in jobs:
            self.publish(job.job_id, "QUEUED", now)
        if jobs:
            self.offer(None)

    def sweep(self) -> float:
        """Expire jobs past their TTL and requeue the jobs of miners past their lease.

        Returns the delay until the next deadline (capped at :data:`MAX_SWEEP_DELAY_S`).
        """
        now = self.clock()
        expired = self.store.due_to_expire(now)
        if expired:
            with self.store.transaction() as conn:
                for job in expired:
                    ttl = job.ttl_seconds
                    self.store.update_job(
                        conn, job.job_id, state="EXPIRED", updated_at=now, completed_at=now,
                        error=f"TTL of {ttl} s passed before the job completed",
                        cancel_pending=int(job.state == "RUNNING" and self.behaviour.report_cancelled),
                    )
                    self.store.set_payment_status(conn, job.job_id, "refunded", now)
            for job in expired:
                self.publish(job.job_id, "EXPIRED", now)
        lapsed: list[JobRow] = []
        for miner_id in self.store.stale_miners_with_jobs(now - self.lease_seconds):
            lapsed.extend(self.store.running_jobs(miner_id))
        if lapsed:
            with self.store.transaction() as conn:
                for job in lapsed:
                    self.requeue(conn, job, now)
            self.after_requeue(lapsed, now)
        deadlines = [d for d in (self.store.next_expiry(), self._next_lease_deadline()) if d is not None]
        return min([MAX_SWEEP_DELAY_S, *[max(d - now, 0.005) for d in deadlines]])

    def _next_lease_deadline(self) -> float | None:
        oldest = self.store.oldest_lease_with_jobs()
        return None if oldest is None else oldest + self.lease_seconds

    def _deadline_at(self, when: float) -> None:
        if when < self._next_sweep_at:
            self._wake.set()

    async def run_sweeper(self) -> None:
        """Sweep at each deadline, woken early when a new, earlier deadline appears."""
        while not self.should_exit:
            delay = self.sweep()
            self._next_sweep_at = self.clock() + delay
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
