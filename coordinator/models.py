"""Request and answer models of the local coordinator; they write its OpenAPI document.

Every request model rejects, naming the field, what would otherwise break later: numbers
that are not finite, strings holding unpaired surrogates (they cannot be encoded as
UTF-8), and nesting deeper than :data:`MAX_DEPTH`.
"""

from __future__ import annotations

import math
from datetime import datetime
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

MAX_DEPTH = 32



def _json_integer(value: Any) -> Any:
    """JSON Schema integers: 5 and 5.0, but not true or "5"."""
    if isinstance(value, (bool, str)):
        raise ValueError("Input should be a valid integer")
    return value


NO_BOOL_OR_STR = BeforeValidator(_json_integer)
NonNegative = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0)]
Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]


def _check_json(value: Any, path: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"{path}: contains an unpaired surrogate (\\ud800-\\udfff); send valid Unicode") from exc
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{path}: numbers must be finite (no NaN or Infinity)")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_json(key, f"{path} key", depth + 1)
            _check_json(item, f"{path}.{key}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json(item, f"{path}[{index}]", depth + 1)


class RequestModel(BaseModel):
    """Base of every request body: plain JSON only (see the module docstring)."""

    @model_validator(mode="before")
    @classmethod
    def _plain_json(cls, data: Any) -> Any:
        _check_json(data, "body", 0)
        return data


class ErrorDetail(BaseModel):
    """Every refusal: ``detail`` names the field or the rule and what to do."""

    detail: str


RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for refusals (429 documents its ``Retry-After`` header)."""
    answers: dict[int | str, dict[str, Any]] = {}
    for code in sorted(set(codes)):
        answers[code] = {"model": ErrorDetail, **({"headers": RETRY_AFTER} if code == 429 else {})}
    return answers


class JobState(str, Enum):  # noqa: UP042 - str+Enum keeps how these values format today
    """Job states as published; ``CANCELED`` only in reference-quirks mode."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"
    CANCELED = "CANCELED"


class PaymentStatus(str, Enum):  # noqa: UP042 - str+Enum keeps how these values format today
    """States of the simulated payments ledger."""

    escrowed = "escrowed"
    released = "released"
    refunded = "refunded"


class JobConstraints(BaseModel):
    """Constraints in either spelling: published (``gpu_type``, ``min_gpu_memory``) or
    reference (``gpu``, ``min_vram_gb``). Unknown keys are kept and ignored."""

    model_config = ConfigDict(extra="allow")

    gpu: str | None = Field(None, description="exact GPU name, e.g. 'NVIDIA GeForce RTX 3090'")
    gpu_type: str | None = Field(None, description="GPU type, matched after normalising, e.g. 'nvidia-rtx-3090'")
    min_vram_gb: NonNegative | None = Field(None, description="minimum GPU memory in GB")
    min_gpu_memory: NonNegative | None = Field(None, description="minimum GPU memory in GB (published spelling)")
    cuda: str | None = Field(None, description="CUDA version; must be a substring of the miner's")
    models: list[str] | None = Field(None, description="models the miner must serve")
    region: str | None = None
    max_price: NonNegative | None = Field(None, description="highest price per unit accepted")


class JobCreate(RequestModel):
    """``POST /v1/jobs`` body."""

    payload: dict[str, Any] = Field(description="the job for the miner, e.g. {model, prompt, parameters}")
    constraints: JobConstraints | None = None
    ttl_seconds: Annotated[int, Field(ge=1, le=86400), NO_BOOL_OR_STR] = 900
    payment_amount: Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0)] | None = Field(
        None, description="escrowed in the simulated ledger at submit; 0 (or absent) means no payment"
    )
    payment_currency: Annotated[str, Field(min_length=1, max_length=64)] = Field(
        "AITBC", description="any currency name, echoed by the simulated ledger")


class JobView(BaseModel):
    """A job as its client sees it."""

    job_id: str
    state: JobState
    assigned_miner_id: str | None
    requested_at: datetime
    expires_at: datetime
    error: str | None
    payment_id: str | None
    payment_status: PaymentStatus | None
    updated_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None


class JobList(BaseModel):
    """``GET /v1/jobs``: the caller's jobs, newest first (the reference service's shape)."""

    items: list[JobView]
    total: int = Field(description="how many jobs match the filter in all")
    limit: int
    offset: int


class ResultPart(BaseModel):
    output: str | None
    metadata: dict[str, Any]


class JobResultView(BaseModel):
    """``GET /v1/jobs/{id}/result``: the output and the receipts exactly as signed."""

    result: ResultPart
    receipt: dict[str, Any] | None = Field(
        description="the miner's signed receipt, unchanged; the coordinator's when the miner signed none")
    coordinator_receipt: dict[str, Any] | None = Field(
        None, description="the receipt the coordinator signed with its own key (GET /v1/receipts/key)")


class HealthView(BaseModel):
    """``GET /health``: no authentication; 503 with ``db: "unavailable"`` when the database cannot be read."""

    status: Literal["ok", "unavailable"]
    version: str
    db: Literal["ok", "unavailable"]


class ReceiptKeyView(BaseModel):
    """``GET /v1/receipts/key``: the public key the coordinator signs its receipts with."""

    alg: Literal["Ed25519"]
    key_id: str = Field(description="url-safe base64 of the 32-byte Ed25519 public key, no padding")
    signer: Literal["coordinator"]


class ReceiptSignature(BaseModel):
    alg: Literal["Ed25519"]
    key_id: str
    sig: str


class ReceiptView(BaseModel):
    """A signed receipt as served (documented fields; the receipt carries more)."""

    model_config = ConfigDict(extra="allow")

    job_id: str
    miner_id: str | None = None
    timestamp: str | None = None
    signature: ReceiptSignature


class PaymentView(BaseModel):
    """An entry of the SIMULATED payments ledger: no funds move anywhere."""

    payment_id: str
    job_id: str
    amount: float
    currency: str
    status: PaymentStatus
    created_at: datetime
    updated_at: datetime
    simulated: Literal[True] = True


# -- miner API ------------------------------------------------------------------------


class RegisterRequest(RequestModel):
    """``POST /v1/miners/register``. ``capabilities.receipt_key`` names the receipt signer."""

    capabilities: dict[str, Any]
    concurrency: Annotated[int, Field(ge=1, le=1024), NO_BOOL_OR_STR] = 1
    region: str | None = None
    held_jobs: list[str] | None = Field(
        None, max_length=4096,
        description="ids of RUNNING jobs this miner still holds; its other RUNNING jobs are requeued "
                    "(absent: a restarted miner, every RUNNING job of it is requeued)")


class RegisterAnswer(BaseModel):
    status: Literal["ok"]
    session_token: str


class HeartbeatRequest(RequestModel):
    """``POST /v1/miners/heartbeat``; every field optional, unknown ones ignored.

    ``inflight``, ``status`` and ``metadata`` are used, so their types are checked; the
    informational fields are unbounded (the reference miner sends ``network_latency_ms: -1.0``
    when it could not measure it).
    """

    model_config = ConfigDict(extra="allow")

    inflight: Annotated[int, Field(ge=0, le=1_000_000), NO_BOOL_OR_STR] | None = None
    status: str | None = None
    metadata: dict[str, Any] | None = None
    architecture: str | None = None
    edge_optimized: bool | None = None
    network_latency_ms: Finite | None = None


class HeartbeatAnswer(BaseModel):
    status: Literal["ok"]
    cancelled_jobs: list[str] | None = Field(
        None, description="ids of this miner's jobs cancelled by their clients: stop work on them"
    )


class PollRequest(RequestModel):
    max_wait_seconds: NonNegative = Field(0, description="hold an empty poll this long (capped by the server)")


class PollAnswer(BaseModel):
    job_id: str
    payload: dict[str, Any]
    constraints: dict[str, Any]
    expires_at: datetime | None = None


class MinerResult(BaseModel):
    """The ``result`` object a miner sends: output, metadata and its signed receipt."""

    model_config = ConfigDict(extra="allow")

    output: str | None = None
    metadata: dict[str, Any] | None = None
    receipt: dict[str, Any] | None = None


class ResultRequest(RequestModel):
    """``POST /v1/miners/{job_id}/result``."""

    result: MinerResult
    metrics: dict[str, Any] | None = None
    tee_attestation_id: str | None = None
    tee_quote: str | None = None


class ResultAnswer(BaseModel):
    status: Literal["ok"]
    receipt: dict[str, Any] | None = Field(
        None, description="the receipt the coordinator signed for this result with its own key")


class FailRequest(RequestModel):
    """``POST /v1/miners/{job_id}/fail``: both strings are required."""

    error_code: str
    error_message: str
    metrics: dict[str, Any] | None = None


class FailAnswer(BaseModel):
    status: Literal["ok"]
    state: JobState | None = Field(None, description="the job's state after the failure (QUEUED when retried)")
