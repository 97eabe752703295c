"""One job, from an assignment to its signed outcome: admission, run, check, receipt, body.

:class:`JobExecutor` never raises for a job's own problems: every path ends in an
:class:`Outcome` that is a ``result`` body (with the signed receipt), a ``fail`` body
(``error_code`` + a message safe to send), or ``dropped`` (the coordinator cancelled the
job, so nothing is submitted). Only task cancellation (a forced exit) propagates.

A runner's answer is checked against the :class:`~runners.base.RunResult` contract and the
result body is encoded once (:mod:`miner.daemon.encode`) before anything is signed or
stored: an answer that breaks the contract fails that job ``RESULT_INVALID``, a body over
``coordinator.max_result_bytes`` fails it ``RESULT_TOO_LARGE``.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
from nacl.signing import SigningKey

from miner.daemon import admission
from miner.daemon.client import AssignedJob
from miner.daemon.encode import DEFAULT_MAX_RESULT_BYTES, check_run_result, encode_body
from miner.host.energy import EnergyReading, job_energy
from miner.wire.errors import DeviceError, ErrorCode, JobError
from miner.wire.receipts import build_miner_receipt, prompt_sha256, rerun_fields, sign_receipt
from runners import runner_version
from runners.base import Job, Runner, RunResult
from runners.params import TextRequest, payload_model

log = structlog.get_logger("miner.daemon.jobs")

DEFAULT_JOB_CAP_S = 3600.0
# A runner gets this long past the deadline to notice it before the task is abandoned.
DEADLINE_SLACK_S = 5.0


@dataclass
class JobRun:
    """A claimed job while this miner holds it. Flags are set by the heartbeat and shutdown."""

    assigned: AssignedJob
    claimed_at: float = field(default_factory=time.monotonic)
    job: Job | None = None
    cancelled_by_coordinator: bool = False
    shutdown: bool = False
    finished: bool = False  # its outcome has been handed to the outbox (or dropped)

    @property
    def job_id(self) -> str:
        return self.assigned.job_id

    @property
    def model(self) -> str | None:
        return payload_model(self.assigned.payload)

    def cancel(self, *, shutdown: bool = False) -> None:
        """Ask the runner to stop: by the coordinator (drop) or for shutdown (fail SHUTDOWN)."""
        if shutdown:
            self.shutdown = True
        else:
            self.cancelled_by_coordinator = True
        if self.job is not None:
            self.job.cancel()


@dataclass
class Outcome:
    """How a job ended. ``kind`` says what to submit (``dropped``: nothing)."""

    kind: Literal["result", "fail", "dropped"]
    body: dict[str, Any] | None
    code: str | None = None
    message: str = ""
    duration_s: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tokens_per_s: float | None = None
    units: float | None = None
    energy_j: float | None = None  # this job's share of its GPUs' energy (None: not measured)
    fatal: bool = False  # the device is unusable: the daemon exits after this job (DEVICE_ERROR)

    @property
    def outcome_label(self) -> str:
        return {"result": "completed", "fail": "failed", "dropped": "cancelled"}[self.kind]


SHUTDOWN_MESSAGE = "the miner is shutting down; the job can be reassigned"


def fail_body(code: str, message: str, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``/fail`` body; both strings are required by the coordinator."""
    return {"error_code": str(code), "error_message": message or str(code), "metrics": metrics or {}}


def failed_outcome(code: str, message: str, duration_s: float = 0.0) -> Outcome:
    """A ``fail`` outcome: the one place a ``/fail`` body is built."""
    metrics = {"duration_ms": round(duration_s * 1000, 3)} if duration_s else None
    return Outcome("fail", fail_body(code, message, metrics), code, message, duration_s)


def shutdown_outcome(message: str = SHUTDOWN_MESSAGE) -> Outcome:
    """A job this miner gives back (``SHUTDOWN``): the coordinator queues it again at once."""
    return failed_outcome(ErrorCode.SHUTDOWN, message)


class JobExecutor:
    """Runs assigned jobs on the configured runners and builds their outcomes.

    ``capabilities`` returns the capabilities as registered (for admission; its
    ``models`` are the models ready now); ``runners_by_model`` maps every configured
    job-facing model name to its runner.
    """

    def __init__(
        self,
        *,
        miner_id: str,
        signing_key: SigningKey,
        runners_by_model: Mapping[str, Runner],
        capabilities: Callable[[], dict[str, Any]],
        region: str | None = None,
        clock: Callable[[], float] = time.time,
        default_cap_s: float = DEFAULT_JOB_CAP_S,
        max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
        read_energy: Callable[[], Awaitable[Mapping[str, EnergyReading]]] | None = None,
    ) -> None:
        self.miner_id = miner_id
        self._key = signing_key
        self._runners = runners_by_model
        self._capabilities = capabilities
        self._region = region
        self._clock = clock
        self._cap_s = default_cap_s
        self._max_result_bytes = max_result_bytes
        self._read_energy = read_energy

    def seconds_left(self, assigned: AssignedJob) -> float:
        """Time the job may take: until ``expires_at``, else ``ttl_seconds``, else the default cap."""
        if assigned.expires_at is not None:
            return assigned.expires_at.timestamp() - self._clock()
        if assigned.ttl_seconds is not None:
            return assigned.ttl_seconds
        return self._cap_s

    async def execute(self, run: JobRun) -> Outcome:
        started_wall = self._clock()
        started = time.monotonic()
        assigned = run.assigned
        try:
            if assigned.payload_error is not None:
                raise JobError(ErrorCode.INVALID_PAYLOAD, assigned.payload_error)
            capabilities = self._capabilities()
            request = admission.admit(
                assigned.payload,
                assigned.constraints,
                capabilities,
                capabilities.get("models") or (),
                self._region,
                configured_models=self._runners.keys(),
            )
            left = self.seconds_left(assigned)
            if left <= 0:
                raise JobError(ErrorCode.DEADLINE_EXCEEDED, "the job expired before it could start")
            job = Job(job_id=assigned.job_id, request=request, deadline=started + left)
            run.job = job
            if run.cancelled_by_coordinator or run.shutdown:
                job.cancel()
            runner = self._runners[request.model]
            energy_before = await self._energy()
            result = await self._run(runner, job, left)
            energy_after = await self._energy()
        except JobError as exc:
            return self._failed(run, exc.code, exc.message, started)
        except DeviceError as exc:
            log.error("device_unusable_exiting", error=str(exc))
            outcome = self._failed(run, ErrorCode.DEVICE_ERROR, f"the miner's device failed: {exc}", started)
            outcome.fatal = True
            return outcome
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a runner bug must fail the job, not the daemon
            # The exception's message may quote the prompt: log its type and where it was raised only.
            where = "".join(traceback.format_tb(exc.__traceback__, limit=-3))
            log.error("runner_unexpected_error", error_type=type(exc).__name__, traceback=where)
            return self._failed(run, ErrorCode.INTERNAL_ERROR, f"the runner raised {type(exc).__name__}", started)
        if run.cancelled_by_coordinator:
            return Outcome(
                "dropped", None, ErrorCode.CANCELLED, "cancelled by the coordinator", time.monotonic() - started
            )
        # A job that finished although shutdown asked it to stop is delivered as a result.
        try:
            uuids = result.gpu_uuids or ((result.gpu_uuid,) if result.gpu_uuid else ())
            energy = job_energy(energy_before, energy_after, uuids, result.gpu_seconds)
            return self._completed(runner, job, request, result, started, started_wall, energy)
        except JobError as exc:  # the answer could not become a result body
            return self._failed(run, exc.code, exc.message, started)

    async def _energy(self) -> Mapping[str, EnergyReading]:
        return await self._read_energy() if self._read_energy is not None else {}

    async def _run(self, runner: Runner, job: Job, left: float) -> RunResult:
        try:
            async with asyncio.timeout(left + DEADLINE_SLACK_S):
                result = await runner.run(job)
        except TimeoutError as exc:
            if job.expired():
                raise JobError(ErrorCode.DEADLINE_EXCEEDED, "the job passed its deadline (TTL) while running") from exc
            raise
        return check_run_result(result)

    def _failed(self, run: JobRun, code: str, message: str, started: float) -> Outcome:
        duration = time.monotonic() - started
        if run.cancelled_by_coordinator:
            return Outcome("dropped", None, ErrorCode.CANCELLED, "cancelled by the coordinator", duration)
        if run.shutdown and code in (ErrorCode.CANCELLED, ErrorCode.DEADLINE_EXCEEDED):
            code, message = ErrorCode.SHUTDOWN, SHUTDOWN_MESSAGE
        return failed_outcome(code, message, duration)

    def _completed(
        self,
        runner: Runner,
        job: Job,
        request: TextRequest,
        result: RunResult,
        started: float,
        started_wall: float,
        energy: tuple[float | None, str] = (None, "none"),
    ) -> Outcome:
        duration = time.monotonic() - started
        completed_wall = self._clock()
        units = result.gpu_seconds if result.gpu_seconds is not None else duration
        tokens_per_s = None
        if result.completion_tokens and duration > 0:
            tokens_per_s = round(result.completion_tokens / duration, 3)
        receipt = build_miner_receipt(
            job_id=job.job_id,
            miner_id=self.miner_id,
            model=request.model,
            prompt_digest=prompt_sha256(
                request.prompt, list(request.messages) if request.messages is not None else None
            ),
            output=result.output,
            started_at=started_wall,
            completed_at=completed_wall,
            gpu_seconds=units,
            gpu_uuid=result.gpu_uuid,
            gpu_uuids=tuple(result.gpu_uuids),
            runner=getattr(runner, "name", type(runner).__name__),
            model_revision=result.model_revision,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            rerun=rerun_fields(
                runner_version=runner_version(runner),
                dtype=result.dtype,
                device=result.device,
                params=request.params.canonical(),
                seed=request.params.seed,
                sampling=request.params.sampling,
            ),
            energy_j=energy[0],
            energy_method=energy[1],
        )
        signed = sign_receipt(receipt, self._key)
        duration_ms = round(duration * 1000, 3)
        metadata = {
            "model": request.model,
            "runner": receipt["runner"],
            "model_revision": result.model_revision,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "ttft_ms": result.ttft_ms,
            "tokens_per_s": tokens_per_s,
            "finish_reason": result.finish_reason,
            "device": result.device,
            "gpu_uuid": result.gpu_uuid,
            "gpu_uuids": list(result.gpu_uuids) or None,
            "duration_ms": duration_ms,
            "energy_j": receipt.get("energy_j"),
            "energy_method": receipt["energy_method"],
        }
        for key, value in result.extra.items():
            metadata.setdefault(key, value)
        metrics = {
            "duration_ms": duration_ms,
            "units": receipt["units"],
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "tokens_per_s": tokens_per_s,
            "ttft_ms": result.ttft_ms,
        }
        body = {
            "result": {
                "output": result.output,
                "metadata": {k: v for k, v in metadata.items() if v is not None},
                "receipt": signed,
            },
            "metrics": {k: v for k, v in metrics.items() if v is not None},
        }
        encode_body(body, limit=self._max_result_bytes)  # RESULT_INVALID / RESULT_TOO_LARGE
        return Outcome(
            "result",
            body,
            duration_s=duration,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            tokens_per_s=tokens_per_s,
            units=receipt["units"],
            energy_j=receipt.get("energy_j"),
        )
