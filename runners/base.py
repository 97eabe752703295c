"""The runner interface: what the daemon needs from anything that runs jobs.

A runner serves one or more configured models (``[[models]]`` entries naming it). Its life:

1. constructed with its model specs and a :class:`RunnerContext` (cheap, no I/O);
2. ``await start()``: validate options, load (or check) models, warm up. A bad option
   raises :class:`~miner.wire.errors.ConfigError` with one line naming the setting;
3. ``await run(job)`` any number of times, concurrently: returns a :class:`RunResult` or
   raises :class:`~miner.wire.errors.JobError`. It must not block the event loop: heavy work
   goes to a worker thread. It watches ``job.cancelled`` and ``job.expired()``;
4. ``ready_models()`` at any time says what may be advertised now;
5. ``await aclose()`` once.

Optional, for claiming that follows what the runner can take: ``capacity()`` (how many
jobs it could hold at once right now, those it holds included) and ``max_capacity()`` (the
most it ever holds); either may return ``None`` for "no limit of its own". A runner
without them gets one job per GPU (one on the CPU) unless the owner sets ``concurrency``.

The fake runner (:mod:`runners.fake`) is the smallest complete example.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict, ValidationError

from miner.wire.errors import ConfigError, ErrorCode, JobError
from runners.params import TextRequest


class ModelSpec(BaseModel):
    """One ``[[models]]`` entry: ``name`` (job-facing), ``runner``, and that runner's options."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    runner: str = "fake"

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


OptionsT = TypeVar("OptionsT", bound=BaseModel)


def parse_options(options_model: type[OptionsT], spec: ModelSpec) -> OptionsT:
    """Validate a model entry's runner options; a bad one becomes a one-line ConfigError."""
    try:
        return options_model.model_validate(spec.options())
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "options"
        raise ConfigError(
            f"models[name={spec.name!r}].{loc}: {err['msg']} (runner {spec.runner!r}); fix it in the [[models]] table"
        ) from exc


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML reports it. Memory in MiB; optional readings may be ``None``."""

    index: int
    uuid: str
    name: str
    memory_total_mb: int
    memory_free_mb: int | None = None
    driver_version: str | None = None
    cuda_version: str | None = None
    compute_capability: str | None = None
    utilization_pct: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    pci_bus_id: str | None = None  # "00000000:18:00.0": how torch's numbering is matched to NVML's


@dataclass
class RunnerContext:
    """What the daemon hands a runner: its GPUs, where it may keep files, and probes.

    ``gpu_serving(uuid)`` says whether a GPU may take new jobs now (``False`` while the
    daemon's health checks drain it: its running jobs finish, new ones go to other GPUs);
    ``None`` means every GPU serves. A runner with GPUs should ask it for every new job and
    in ``capacity()``.
    """

    gpus: Sequence[GpuInfo] = ()
    state_dir: Path | None = None
    free_vram_mb: Any = None  # callable(index) -> int | None, backed by NVML; None on CPU
    gpu_serving: Callable[[str], bool] | None = None

    def serving(self, uuids: Sequence[str]) -> bool:
        """Whether a copy on these GPUs (``()``: the CPU) may take a new job now."""
        return self.gpu_serving is None or all(self.gpu_serving(u) for u in uuids)


@dataclass
class Job:
    """A job handed to a runner. ``deadline`` is a ``time.monotonic()`` instant or ``None``."""

    job_id: str
    request: TextRequest
    deadline: float | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    pin_gpu: str | None = None  # run on the copy whose first GPU has this UUID (the miner's own benchmark)

    @property
    def model(self) -> str:
        return self.request.model

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def cancel(self) -> None:
        self.cancel_event.set()

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def should_stop(self) -> bool:
        """True once the job is cancelled or past its deadline (cheap; called per step)."""
        return self.cancel_event.is_set() or self.expired()

    def raise_if_stopped(self) -> None:
        """Raise the :func:`stop_error` of this job, if it must stop now."""
        error = stop_error(self)
        if error is not None:
            raise error


def stop_error(job: Job, closing: bool = False, during: str = "while running") -> JobError | None:
    """The error a job that must stop now ends with, or ``None`` when it may go on.

    ``closing`` (the runner is shutting down) wins over a cancel, a cancel over the
    deadline; ``during`` ends the deadline message (what the job was doing).
    """
    if closing:
        return JobError(ErrorCode.SHUTDOWN, "the miner is shutting down")
    if job.cancelled:
        return JobError(ErrorCode.CANCELLED, "the job was cancelled")
    if job.expired():
        return JobError(ErrorCode.DEADLINE_EXCEEDED, f"the job passed its deadline (TTL) {during}")
    return None


@dataclass
class RunResult:
    """A finished generation. ``finish_reason`` is ``stop`` (EOS or a stop sequence) or ``length``."""

    output: str
    finish_reason: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_ms: float | None = None
    model_revision: str | None = None
    device: str = "cpu"
    gpu_uuid: str | None = None
    gpu_uuids: tuple[str, ...] = ()  # every GPU the job used, when a model is sharded over several
    gpu_seconds: float | None = None  # device time used; the daemon uses wall time when None
    dtype: str | None = None  # the weights' dtype (e.g. float16), for the receipt: what a re-run must match
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Runner(Protocol):
    """The contract every runner meets (see the module docstring for the life cycle)."""

    name: ClassVar[str]

    def __init__(self, specs: Sequence[ModelSpec], context: RunnerContext) -> None: ...

    async def start(self) -> None: ...

    def ready_models(self) -> list[str]: ...

    async def run(self, job: Job) -> RunResult: ...

    async def aclose(self) -> None: ...
