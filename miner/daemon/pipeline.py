"""The path of a job: claim → admit → run → check + encode → sign → store → deliver.

:class:`JobPipeline` owns every piece of job state: the claim slots, the jobs in flight,
the counters. One claim loop runs per slot. A slot claims only while ``may_claim()`` says
so (registered, state folder healthy, a model ready), the pipeline is not stopping, and
``capacity()`` (what the runners could hold now: batch room and free GPU memory) exceeds the
jobs held plus the polls out; ``None`` from it means no limit beyond the slots.

A poll that has been sent is never cancelled: the coordinator may already have assigned
a job, and an answer lost on the wire leaves that job RUNNING until its TTL. A job that
arrives after claiming stopped (shutdown, or a state folder gone bad) is handed back at
once with ``SHUTDOWN``, through the outbox. Only the pacing wait before a poll is
cancelled when claiming stops.

Nothing a runner returns or raises can stop a slot: the executor turns every answer into
an outcome, and an outcome the outbox cannot encode fails that job ``RESULT_INVALID``.
The pipeline reports through callbacks (``on_job_end``, ``on_exit``) and holds no
reference to the object that made it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
from collections import Counter
from collections.abc import Callable, Collection
from typing import Any

import structlog

from miner.daemon.claiming import Claimer, SlotPacing
from miner.daemon.client import AssignedJob
from miner.daemon.delivery import Deliverer
from miner.daemon.jobs import JobExecutor, JobRun, Outcome, failed_outcome, shutdown_outcome
from miner.daemon.summary import Activity
from miner.ops.logs import job_context
from miner.ops.metrics import MinerMetrics
from miner.outbox.store import Outbox, OutboxEntry
from miner.wire.errors import ErrorCode

log = structlog.get_logger("miner.daemon.pipeline")

# After the drain grace, cancelled jobs get this long to stop before their tasks are abandoned.
CANCEL_GRACE_S = 5.0
# How often a slot waiting for room asks the runners again (their memory changes on its own).
ROOM_RECHECK_S = 0.25
DISK_TROUBLE_MESSAGE = "the miner's state folder cannot take outcomes right now; the job can be reassigned"
ALREADY_DELIVERED = "this miner already delivered an outcome for this job; it is not run twice"


class JobPipeline:
    """Claims, runs and delivers jobs for ``slots`` claim loops (see the module docstring).

    ``may_claim()`` is asked before every poll; call :meth:`pulse` when its answer may
    have changed. ``on_job_end()`` is called after every job (the session heartbeats
    right away); ``on_exit(reason, fatal)`` when ``max_jobs`` is reached or a device
    failed. ``configured_models`` bounds the ``model`` label of the job metrics.
    """

    def __init__(
        self,
        *,
        claimer: Claimer,
        executor: JobExecutor,
        outbox: Outbox,
        deliverer: Deliverer,
        metrics: MinerMetrics,
        slots: int,
        may_claim: Callable[[], bool],
        on_job_end: Callable[[], None],
        on_exit: Callable[[str, bool], None],
        configured_models: Collection[str] = (),
        capacity: Callable[[], int | None] = lambda: None,
        max_jobs: int | None = None,
        poll_bound_s: float = 30.0,
        activity: Activity | None = None,
    ) -> None:
        self.claimer = claimer
        self.executor = executor
        self.outbox = outbox
        self.deliverer = deliverer
        self.metrics = metrics
        self.slots = slots
        self._may_claim = may_claim
        self._on_job_end = on_job_end
        self._on_exit = on_exit
        self._configured = frozenset(configured_models)
        self._capacity = capacity
        self.max_jobs = max_jobs
        self.activity = activity
        self.poll_bound_s = poll_bound_s  # the longest a sent poll may take: long-poll + request timeout
        self.inflight: dict[str, JobRun] = {}
        self.outcomes: Counter[str] = Counter()
        self.jobs_claimed = 0
        self.jobs_reserved = 0  # polls in progress that may return a job (for --max-jobs)
        self.jobs_ended = 0
        self.stopping = False
        self.last_activity = time.monotonic()
        self._claim_state = asyncio.Event()
        self._stop = asyncio.Event()
        self._polls: set[asyncio.Task[Any]] = set()

    # -- what others may ask ------------------------------------------------------------

    def held_jobs(self) -> list[str]:
        """Jobs this miner holds: running, or with an outcome not yet delivered."""
        return sorted(set(self.inflight) | {e.job_id for e in self.outbox.pending()})

    def cancel(self, job_id: str) -> None:
        """The coordinator cancelled ``job_id``: stop it; nothing is submitted for it."""
        run = self.inflight.get(job_id)
        if run is not None and not run.cancelled_by_coordinator:
            with job_context(job_id, run.model):
                log.info("job_cancelled_by_coordinator")
            run.cancel()

    def pulse(self) -> None:
        """Claiming may have become possible (registered, disk back, exit asked...)."""
        self._claim_state.set()
        self._claim_state.clear()

    def summary(self) -> str:
        done = ", ".join(f"{n} {label}" for label, n in sorted(self.outcomes.items())) or "no jobs yet"
        return f"{len(self.inflight)} in flight; {done}"

    # -- the claim loops ---------------------------------------------------------------

    def _claiming_allowed(self) -> bool:
        if self.stopping or not self._may_claim():
            return False
        return self.max_jobs is None or self.jobs_claimed + self.jobs_reserved < self.max_jobs

    async def run_slot(self, index: int) -> None:
        """One claim loop; returns when the pipeline stops (or ``max_jobs`` is claimed)."""
        pacing = SlotPacing(index)
        while not self.stopping:
            if self.max_jobs is not None and self.jobs_claimed >= self.max_jobs:
                return
            if not self._claiming_allowed():
                await self._claim_state.wait()
                continue
            if not self._has_room():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._claim_state.wait(), ROOM_RECHECK_S)
                continue
            if not await self._wait_turn(pacing) or not self._has_room():
                continue
            self.jobs_reserved += 1  # no await since the room check: no other slot can take this room
            poll = asyncio.create_task(self.claimer.poll(pacing), name=f"poll-{index}")
            self._polls.add(poll)
            try:
                assigned = await asyncio.shield(poll)
            finally:
                self._polls.discard(poll)
                self.jobs_reserved -= 1
            self.pulse()
            if assigned is None:
                continue
            self.jobs_claimed += 1
            try:
                await self._handle(assigned)
            except Exception as exc:  # a bug here must not take the other loops down
                log.error(
                    "claim_slot_error",
                    error_type=type(exc).__name__,
                    traceback="".join(traceback.format_tb(exc.__traceback__, limit=-3)),
                )
                await asyncio.sleep(1.0)

    def _has_room(self) -> bool:
        """Whether the runners can take one more job now (jobs held and polls out counted)."""
        room = self._capacity()
        self.metrics.set_job_room(room)
        return room is None or len(self.inflight) + self.jobs_reserved < room

    async def _wait_turn(self, pacing: SlotPacing) -> bool:
        """The pacing wait before a poll, cut short when claiming stops. True: go ahead and poll."""
        turn = asyncio.create_task(self.claimer.wait_turn(pacing))
        stop = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait([turn, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not turn.done():
                turn.cancel()
        if turn.cancelled() or not turn.done():
            return False
        turn.result()
        return self._claiming_allowed()

    # -- one job -------------------------------------------------------------------------

    async def _handle(self, assigned: AssignedJob) -> None:
        run = JobRun(assigned)
        with job_context(assigned.job_id, run.model):
            self.last_activity = time.monotonic()
            known = self.outbox.state(assigned.job_id)
            if known is not None:
                self.jobs_claimed -= 1  # not a new job: it does not count against --max-jobs
                await self._offered_again(assigned.job_id, known)
                return
            self.inflight[assigned.job_id] = run
            self.metrics.set_inflight(len(self.inflight))
            self.metrics.job_started(model=self._metric_model(run))
            if self.activity is not None:
                self.activity.job_started()
            log.info("job_claimed", slots_busy=len(self.inflight))
            try:
                if self.stopping:
                    outcome = shutdown_outcome()
                elif not self.outbox.healthy:
                    outcome = shutdown_outcome(DISK_TROUBLE_MESSAGE)
                else:
                    outcome = await self.executor.execute(run)
            finally:
                self.inflight.pop(assigned.job_id, None)
                self.metrics.set_inflight(len(self.inflight))
            await self.finish(run, outcome)
        if self.max_jobs is not None and self.jobs_ended >= self.max_jobs:
            self._on_exit(f"--max-jobs {self.max_jobs} reached", False)

    def _metric_model(self, run: JobRun) -> str:
        """The model label for metrics: a configured model, else "other" (labels stay bounded)."""
        return run.model if run.model in self._configured else "other"

    async def _offered_again(self, job_id: str, known: str) -> None:
        """A job this miner already handled is offered again: never run it twice.

        The outcome this miner still has (pending, or once rejected) is submitted again; a
        job whose outcome was already acknowledged is failed at once, so it does not sit
        RUNNING until its TTL.
        """
        entry = None
        if known == "pending":
            entry = self.outbox.get(job_id)
        elif known == "rejected":
            entry = await self.outbox.revive(job_id)
        if entry is None:
            outcome = failed_outcome(ErrorCode.INTERNAL_ERROR, ALREADY_DELIVERED)
            assert outcome.body is not None
            entry = OutboxEntry(job_id, "fail", outcome.body)
            await self.deliverer.store(entry)
        log.warning("job_offered_again", known=known)
        await self.deliverer.deliver_now(entry)
        self._on_job_end()

    async def finish(self, run: JobRun, outcome: Outcome) -> None:
        """Record, store and deliver ``outcome``; never raises for the outcome's content."""
        run.finished = True
        entry = await self._store(run, outcome)
        if entry is not None and entry.kind != outcome.kind:
            outcome = failed_outcome(ErrorCode.RESULT_INVALID, entry.body["error_message"], outcome.duration_s)
        self.outcomes[outcome.outcome_label] += 1
        log.info(
            "job_finished",
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
            units=outcome.units,
            energy_j=outcome.energy_j,
        )
        if self.activity is not None:
            self.activity.job_ended(outcome.outcome_label, outcome.completion_tokens, outcome.units)
        if outcome.kind == "dropped":
            log.info("job_dropped", reason="cancelled by the coordinator; nothing is submitted")
        elif entry is not None:
            await self.deliverer.deliver_now(entry)
        self.jobs_ended += 1
        self.last_activity = time.monotonic()
        self.pulse()  # a slot waiting for room may claim again
        if outcome.fatal:
            self._on_exit(f"device error: {outcome.message}", True)
        self._on_job_end()

    async def _store(self, run: JobRun, outcome: Outcome) -> OutboxEntry | None:
        """Put the outcome into the outbox; one the outbox cannot encode becomes RESULT_INVALID."""
        if outcome.kind == "dropped" or outcome.body is None:
            return None
        entry = OutboxEntry(run.job_id, outcome.kind, outcome.body)
        try:
            await self.deliverer.store(entry)
        except (TypeError, ValueError) as exc:
            log.error("outcome_not_encodable", error_type=type(exc).__name__)
            failed = failed_outcome(
                ErrorCode.RESULT_INVALID, "the runner's answer cannot be encoded as JSON", outcome.duration_s
            )
            assert failed.body is not None
            entry = OutboxEntry(run.job_id, "fail", failed.body)
            await self.deliverer.store(entry)
        return entry

    # -- stopping ------------------------------------------------------------------------

    async def drain(self, slots: list[asyncio.Task[Any]], grace_s: float) -> None:
        """Stop claiming; let sent polls answer; let jobs finish within ``grace_s``; then cancel."""
        self.stopping = True
        self._stop.set()
        self.pulse()
        if self._polls:
            log.info("waiting_for_polls", polls=len(self._polls), bound_s=self.poll_bound_s)
            await asyncio.wait(list(self._polls), timeout=self.poll_bound_s)
        if self.inflight:
            log.info("waiting_for_jobs", jobs=len(self.inflight), grace_s=grace_s)
        _, pending = await asyncio.wait(slots, timeout=grace_s) if slots else (set(), set())
        if pending:
            await self._cancel_leftovers(pending)

    async def _cancel_leftovers(self, slots: set[asyncio.Task[Any]]) -> None:
        """Stop the jobs still running after the grace period; each is failed SHUTDOWN."""
        leftover = list(self.inflight.values())
        log.warning("drain_grace_over", jobs=len(leftover))
        for run in leftover:
            run.cancel(shutdown=True)
        _, stuck = await asyncio.wait(slots, timeout=CANCEL_GRACE_S)
        for task in stuck:  # the runner ignored the cancel flag: abandon its task
            task.cancel()
        if stuck:
            await asyncio.wait(stuck)
        for run in leftover:
            if not run.finished:
                await self.finish(run, shutdown_outcome())
