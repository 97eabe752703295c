"""The miner endpoints (docs/protocol.md, "Miner API"): register, heartbeat, poll, result, fail.

Bodies are accepted as the reference service accepts them: unknown fields ignored, every
optional field optional, informational fields unbounded; only the fields the coordinator
uses have their types and sizes checked.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Path, Request, Response, Security

from coordinator.auth import API_KEY, key_owner, miner_auth
from coordinator.errors import ApiError
from coordinator.models import (
    FailAnswer,
    FailRequest,
    HeartbeatAnswer,
    HeartbeatRequest,
    JobState,
    PollAnswer,
    PollRequest,
    RegisterAnswer,
    RegisterRequest,
    ResultAnswer,
    ResultRequest,
    error_responses,
)
from coordinator.outcomes import submit_failure, submit_result
from coordinator.state import config_of, dispatcher_of, signing_key_of
from miner.wire.receipts import ALG, b64url_decode

router = APIRouter(prefix="/v1/miners", tags=["miner"])

CONSTRAINT_FIELDS = ("gpu", "gpu_type", "min_vram_gb", "min_gpu_memory", "cuda", "models", "region", "max_price")
JobId = Path(..., min_length=1, max_length=128)


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return error_responses(400, 401, 403, 413, 422, 429, *codes)


def receipt_key_of(capabilities: dict[str, Any]) -> str | None:
    """The registered receipt signer's ``key_id``, validated; ``None`` when not given."""
    raw = capabilities.get("receipt_key")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ApiError(422, 'capabilities.receipt_key: must be an object {"alg": "Ed25519", "key_id": "..."}')
    if raw.get("alg") != ALG:
        raise ApiError(422, f"capabilities.receipt_key.alg: must be {ALG!r}")
    key_id = raw.get("key_id")
    try:
        valid = isinstance(key_id, str) and len(b64url_decode(key_id)) == 32
    except ValueError:
        valid = False
    if not valid or not isinstance(key_id, str):
        raise ApiError(422, "capabilities.receipt_key.key_id: must be the url-safe base64 of a 32-byte Ed25519 key")
    return key_id


@router.post("/register", response_model=RegisterAnswer, responses=_errors())
async def register(body: RegisterRequest, request: Request,
                   miner_id: str = Depends(miner_auth("register")),
                   api_key: str | None = Security(API_KEY)) -> RegisterAnswer:
    """Register (or re-register) a miner; its RUNNING jobs not in ``held_jobs`` are requeued.

    The miner id is bound to the API key that first registered it; another key gets 403.
    """
    key = receipt_key_of(body.capabilities)
    assert api_key is not None  # miner_auth refused a missing key
    token = dispatcher_of(request).register(miner_id, body.capabilities, body.concurrency, body.region, key,
                                            held_jobs=body.held_jobs or (), key_hash=key_owner(api_key))
    return RegisterAnswer(status="ok", session_token=token)


@router.post("/heartbeat", response_model=HeartbeatAnswer, response_model_exclude_none=True,
             responses=_errors(404))
async def heartbeat(request: Request, body: HeartbeatRequest | None = None,
                    miner_id: str = Depends(miner_auth("heartbeat"))) -> HeartbeatAnswer:
    """Renew the miner's lease; the answer lists its jobs cancelled by their clients."""
    body = body or HeartbeatRequest()
    held = (body.metadata or {}).get("jobs")
    held_jobs = held if isinstance(held, list) and all(isinstance(j, str) for j in held) else None
    cancelled = dispatcher_of(request).heartbeat(miner_id, body.inflight, body.status, held_jobs)
    return HeartbeatAnswer(status="ok", cancelled_jobs=cancelled)


@router.post("/poll", response_model=PollAnswer,
             responses={204: {"description": "no job for this miner"}, **_errors(404)})
async def poll(request: Request, body: PollRequest | None = None,
               miner_id: str = Depends(miner_auth("poll"))) -> Any:
    """Claim the oldest matching job, holding the request up to ``max_wait_seconds`` for one."""
    wait = body.max_wait_seconds if body else 0.0
    job = await dispatcher_of(request).poll(miner_id, wait, disconnected=lambda: _hang_up(request))
    if job is None:
        return Response(status_code=204)
    constraints = {name: None for name in CONSTRAINT_FIELDS}
    constraints.update(job.constraints)
    return PollAnswer(job_id=job.job_id, payload=job.payload, constraints=constraints,
                      expires_at=datetime.fromtimestamp(job.expires_at, tz=UTC))


async def _hang_up(request: Request) -> None:
    """Return when the client disconnects (the request body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post("/{job_id}/result", response_model=ResultAnswer, responses=_errors(404, 409))
async def result(body: ResultRequest, request: Request, job_id: str = JobId,
                 miner_id: str = Depends(miner_auth("result"))) -> ResultAnswer:
    """Complete a job with its output (and the miner's signed receipt, if it signs one).

    The answer's ``receipt`` is the coordinator's own, signed with its key (``GET /v1/receipts/key``).
    """
    config = config_of(request)
    receipt = submit_result(dispatcher_of(request), miner_id, job_id, body.model_dump(exclude_unset=True),
                            signing_key_of(request), require_receipt=config.require_receipts)
    return ResultAnswer(status="ok", receipt=receipt)


@router.post("/{job_id}/fail", response_model=FailAnswer, responses=_errors(404, 409))
async def fail(body: FailRequest, request: Request, job_id: str = JobId,
               miner_id: str = Depends(miner_auth("fail"))) -> FailAnswer:
    """Fail a job; ``SHUTDOWN`` requeues it while its TTL allows."""
    state = submit_failure(dispatcher_of(request), miner_id, job_id, body.model_dump())
    return FailAnswer(status="ok", state=JobState(state))
