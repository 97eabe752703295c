"""The published client API: jobs, results, cancellation, payments, receipts, websocket.

Also the job list the reference service has (``GET /v1/jobs``). docs/protocol.md
describes every call.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse

from coordinator.auth import bearer_token, client_auth, key_owner, known_client_key
from coordinator.errors import ApiError
from coordinator.models import (
    JobCreate,
    JobList,
    JobResultView,
    JobState,
    JobView,
    PaymentStatus,
    PaymentView,
    ReceiptView,
    error_responses,
)
from coordinator.state import config_of, dispatcher_of
from coordinator.store import JobRow, Store
from miner.wire.protocol import utc_iso

router = APIRouter(prefix="/v1/jobs", tags=["client"])

FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "CANCELED", "EXPIRED"})
# A state filter of GET /v1/jobs (any case) -> the stored states it selects.
STATE_FILTERS: dict[str, tuple[str, ...]] = {
    "QUEUED": ("QUEUED",), "RUNNING": ("RUNNING",), "COMPLETED": ("COMPLETED",), "FAILED": ("FAILED",),
    "CANCELLED": ("CANCELLED", "CANCELED"), "CANCELED": ("CANCELLED", "CANCELED"), "EXPIRED": ("EXPIRED",),
}
StateFilter = Literal["QUEUED", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "CANCELED", "EXPIRED",
                      "queued", "running", "completed", "failed", "cancelled", "canceled", "expired"]
STATE_QUERY = Query(None, description="only jobs in this state (CANCELLED and CANCELED alike)")
STATUS_QUERY = Query(None, description="the same filter under the reference service's name")
JobId = Path(..., min_length=1, max_length=128, description="the job id from POST /v1/jobs")


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return error_responses(401, 404, 422, 429, *codes)


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def _opt_dt(ts: float | None) -> datetime | None:
    return None if ts is None else _dt(ts)


def job_view(store: Store, job: JobRow) -> JobView:
    payment = store.payment_for(job.job_id) if job.payment_id else None
    return JobView(
        job_id=job.job_id,
        state=JobState(job.state),
        assigned_miner_id=job.assigned_miner_id,
        requested_at=_dt(job.requested_at),
        expires_at=_dt(job.expires_at),
        error=job.error,
        payment_id=job.payment_id,
        payment_status=PaymentStatus(payment.status) if payment else None,
        updated_at=_dt(job.updated_at),
        started_at=_opt_dt(job.started_at),
        completed_at=_opt_dt(job.completed_at),
    )


@router.post("", status_code=201, response_model=JobView, responses=_errors(400, 413))
async def submit_job(body: JobCreate, request: Request, owner: str = Depends(client_auth("submit"))) -> JobView:
    """Submit a job; it is QUEUED until a matching miner claims it."""
    dispatcher = dispatcher_of(request)
    constraints = body.constraints.model_dump(exclude_none=True) if body.constraints else {}
    amount = body.payment_amount or None  # 0 means no payment, as at the reference service
    job = dispatcher.submit(owner, body.payload, constraints, body.ttl_seconds, amount, body.payment_currency)
    return job_view(dispatcher.store, job)


@router.get("", response_model=JobList, responses=_errors())
async def list_jobs(
    request: Request,
    limit: int = Query(20, ge=1, le=100, description="page size (at most 100)"),
    offset: int = Query(0, ge=0, le=10_000_000, description="jobs to skip, newest first"),
    state: StateFilter | None = STATE_QUERY,
    status: StateFilter | None = STATUS_QUERY,
    owner: str = Depends(client_auth("status")),
) -> JobList:
    """The calling client's jobs, newest first: ``{items, total, limit, offset}``."""
    wanted = state if state is not None else status
    states = STATE_FILTERS[wanted.upper()] if wanted else ()
    store = dispatcher_of(request).store
    rows, total = store.list_jobs(owner, states, limit, offset)
    return JobList(items=[job_view(store, job) for job in rows], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobView, responses=_errors())
async def get_job(request: Request, job_id: str = JobId, owner: str = Depends(client_auth("status"))) -> JobView:
    """The job's state, assignment, timestamps and payment status."""
    dispatcher = dispatcher_of(request)
    return job_view(dispatcher.store, dispatcher.job_for(owner, job_id))


@router.get("/{job_id}/result", response_model=JobResultView, responses=_errors(409, 425))
async def get_job_result(request: Request, job_id: str = JobId,
                         owner: str = Depends(client_auth("result"))) -> JSONResponse:
    """The output and the receipts as signed; 425 while QUEUED or RUNNING.

    ``receipt`` is the miner's receipt (the coordinator's when the miner signed none);
    ``coordinator_receipt`` is the coordinator's own.
    """
    dispatcher = dispatcher_of(request)
    job = dispatcher.job_for(owner, job_id)
    if job.state in ("QUEUED", "RUNNING"):
        raise ApiError(425, "job not ready")
    if job.state != "COMPLETED" or job.result is None:
        raise ApiError(409, f"job {job_id} is {job.state} ({job.error or 'no error given'}); it has no result")
    result = dict(job.result)
    output = result.get("output")
    result["output"] = output if isinstance(output, str) else None
    if not isinstance(result.get("metadata"), dict):
        result["metadata"] = {}
    miner_receipts = dispatcher.store.receipts(job_id, signer="miner")
    own = dispatcher.store.receipts(job_id, signer="coordinator")
    coordinator_receipt = own[-1] if own else None
    receipt = miner_receipts[-1] if miner_receipts else coordinator_receipt
    return JSONResponse({"result": result, "receipt": receipt, "coordinator_receipt": coordinator_receipt})


@router.post("/{job_id}/cancel", response_model=JobView, responses=_errors(409))
async def cancel_job(request: Request, job_id: str = JobId, owner: str = Depends(client_auth("status"))) -> JobView:
    """Cancel a QUEUED or RUNNING job; the miner holding it learns of it at its next heartbeat."""
    dispatcher = dispatcher_of(request)
    return job_view(dispatcher.store, dispatcher.cancel(owner, job_id))


@router.get("/{job_id}/payment", response_model=PaymentView, responses=_errors())
async def get_payment(request: Request, job_id: str = JobId,
                      owner: str = Depends(client_auth("status"))) -> PaymentView:
    """The job's entry in the SIMULATED payments ledger (escrowed, released or refunded)."""
    dispatcher = dispatcher_of(request)
    dispatcher.job_for(owner, job_id)
    payment = dispatcher.store.payment_for(job_id)
    if payment is None:
        raise ApiError(404, f"job {job_id} has no payment; submit it with payment_amount to escrow one")
    return PaymentView(
        payment_id=payment.payment_id, job_id=payment.job_id, amount=payment.amount, currency=payment.currency,
        status=PaymentStatus(payment.status), created_at=_dt(payment.created_at), updated_at=_dt(payment.updated_at),
    )


@router.get("/{job_id}/receipt", response_model=ReceiptView, responses=_errors())
async def get_receipt(request: Request, job_id: str = JobId,
                      owner: str = Depends(client_auth("status"))) -> JSONResponse:
    """The latest signed receipt, exactly as its signer signed it (the coordinator's, once it signed one)."""
    dispatcher = dispatcher_of(request)
    dispatcher.job_for(owner, job_id)
    receipts = dispatcher.store.receipts(job_id)
    if not receipts:
        raise ApiError(404, f"job {job_id} has no receipt yet")
    return JSONResponse(receipts[-1])


@router.get("/{job_id}/receipts", response_model=list[ReceiptView], responses=_errors())
async def get_receipts(request: Request, job_id: str = JobId,
                       owner: str = Depends(client_auth("status"))) -> JSONResponse:
    """Every signed receipt of the job, oldest first: the miner's, then the coordinator's
    (``signer: "coordinator"``, no ``miner_id``); empty until the job completes."""
    dispatcher = dispatcher_of(request)
    dispatcher.job_for(owner, job_id)
    return JSONResponse(dispatcher.store.receipts(job_id))


@router.websocket("/{job_id}/ws")
async def job_events(websocket: WebSocket, job_id: str) -> None:
    """Push ``{job_id, state, timestamp}`` on connect and on every state change.

    The socket is closed (code 1000) after a final state. Auth: ``X-Api-Key`` header,
    ``Authorization: Bearer`` or ``api_key`` query parameter; an unknown key or job is
    refused at the handshake (HTTP 403).
    """
    config = config_of(websocket)
    dispatcher = dispatcher_of(websocket)
    candidates = (websocket.headers.get("x-api-key"), bearer_token(websocket.headers.get("authorization")),
                  websocket.query_params.get("api_key"))
    api_key = known_client_key(candidates, config.client_keys)
    if api_key is None:
        await websocket.close(code=1008, reason="Invalid API key")
        return
    job = dispatcher.store.get_job(job_id)
    if job is None or job.owner != key_owner(api_key):
        await websocket.close(code=1008, reason=f"job not found: {job_id}")
        return
    queue = dispatcher.subscribe(job_id)
    try:
        await websocket.accept()
        job = dispatcher.store.get_job(job_id) or job
        await websocket.send_json({"job_id": job_id, "state": job.state, "timestamp": utc_iso(job.updated_at)})
        if job.state in FINAL_STATES:
            await websocket.close(code=1000)
            return
        receiver = asyncio.create_task(_drain(websocket))
        try:
            while True:
                getter = asyncio.create_task(queue.get())
                done, _ = await asyncio.wait({getter, receiver}, return_when=asyncio.FIRST_COMPLETED)
                if receiver in done:
                    getter.cancel()
                    return
                event = getter.result()
                await websocket.send_json(event)
                if event["state"] in FINAL_STATES:
                    await websocket.close(code=1000)
                    return
        finally:
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect):
                await receiver
    except WebSocketDisconnect:
        return
    finally:
        dispatcher.unsubscribe(job_id, queue)


async def _drain(websocket: WebSocket) -> None:
    """Read (and ignore) client frames until it disconnects."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
