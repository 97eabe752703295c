"""A miner's outcome for a job: ``/result`` (with its signed receipt) and ``/fail``.

Rules of the local coordinator (reference-quirks mode relaxes the first three):

* only the miner holding a RUNNING job may finish it (409 otherwise);
* a result or failure for a cancelled (or expired) job is answered 409 and not stored,
  which also tells the miner to stop listing it in ``cancelled_jobs``;
* the same outcome sent twice (same ``receipt_id``, or same body) is answered 200 again;
  a different one for a finished job is 409;
* a receipt must verify against the ``capabilities.receipt_key`` the miner registered
  and name this job and this miner (422 otherwise); it is stored and served as signed;
* every stored result gets a receipt the coordinator signs with its own key
  (:mod:`coordinator.signing`), also for a miner that signs nothing; it is stored after
  the miner's and answered in ``/result``'s ``receipt``;
* ``SHUTDOWN`` failures requeue the job while its TTL allows.
"""

from __future__ import annotations

import hashlib
from typing import Any

from nacl.signing import SigningKey

from coordinator.dispatch import Dispatcher
from coordinator.errors import ApiError, not_found
from coordinator.signing import SIGNER, build_coordinator_receipt
from coordinator.store import JobRow, MinerRow, dumps
from miner.wire.receipts import ReceiptVerificationError, canonical_json, sign_receipt, verify_receipt

RETRYABLE_CODES = frozenset({"SHUTDOWN"})
ENDED_BY_CLIENT = ("CANCELLED", "CANCELED", "EXPIRED")


def _fingerprint(kind: str, body: dict[str, Any]) -> str:
    receipt = (body.get("result") or {}).get("receipt") if kind == "result" else None
    if isinstance(receipt, dict) and isinstance(receipt.get("receipt_id"), str):
        return f"result:receipt:{receipt['receipt_id']}"
    return f"{kind}:{hashlib.sha256(canonical_json(body)).hexdigest()}"


def _check_holder(d: Dispatcher, job: JobRow, miner_id: str, fingerprint: str) -> bool:
    """True when this is a repeat of the outcome already stored (answer 200 again)."""
    if job.outcome_miner_id == miner_id and job.outcome_key == fingerprint:
        return True
    if not d.behaviour.strict_outcomes:
        return False
    if job.state in ENDED_BY_CLIENT:
        if job.cancel_pending and job.assigned_miner_id == miner_id:
            with d.store.transaction() as conn:
                d.store.update_job(conn, job.job_id, cancel_pending=0)
        why = "cancelled by its client" if job.state != "EXPIRED" else "expired (its TTL passed)"
        raise ApiError(409, f"job {job.job_id} was {why}; the outcome is not stored")
    if job.state != "RUNNING":
        raise ApiError(409, f"job {job.job_id} is already {job.state} with a different outcome")
    if job.assigned_miner_id != miner_id:
        raise ApiError(409, f"job {job.job_id} is not held by miner {miner_id}")
    return False


def _verify(job_id: str, miner: MinerRow, receipt: dict[str, Any]) -> None:
    if miner.receipt_key is None:
        raise ApiError(
            422,
            f"result.receipt: miner {miner.miner_id} registered no capabilities.receipt_key "
            '({"alg": "Ed25519", "key_id": ...}); register it to send signed receipts',
        )
    try:
        verify_receipt(receipt, miner.receipt_key)
    except ReceiptVerificationError as exc:
        raise ApiError(422, f"result.receipt: does not verify against the registered receipt_key: {exc}") from exc
    if receipt.get("job_id") != job_id:
        raise ApiError(422, f"result.receipt.job_id: names job {receipt.get('job_id')!r}, not {job_id!r}")
    for field in ("miner_id", "provider"):
        if field in receipt and receipt[field] != miner.miner_id:
            raise ApiError(422, f"result.receipt.{field}: names miner {receipt[field]!r}, not {miner.miner_id!r}")
    if "miner_id" not in receipt and "provider" not in receipt:
        raise ApiError(422, "result.receipt.miner_id: missing; the receipt must name the miner")


def _coordinator_receipt(d: Dispatcher, job: JobRow, miner: MinerRow, result: dict[str, Any],
                         metrics: dict[str, Any], miner_receipt: dict[str, Any] | None, now: float,
                         key: SigningKey) -> dict[str, Any]:
    payment = d.store.payment_for(job.job_id)
    ledger = ({"payment_id": payment.payment_id, "amount": payment.amount, "currency": payment.currency}
              if payment is not None else None)
    started_at = job.started_at if job.state == "RUNNING" and job.assigned_miner_id == miner.miner_id else None
    body = build_coordinator_receipt(
        job_id=job.job_id, miner_id=miner.miner_id, client=job.owner, payload=job.payload,
        constraints=job.constraints, result=result, metrics=metrics, started_at=started_at if started_at else now,
        completed_at=now, unit_price=miner.capabilities.get("price"), miner_receipt=miner_receipt, payment=ledger,
    )
    return sign_receipt(body, key)


def submit_result(d: Dispatcher, miner_id: str, job_id: str, body: dict[str, Any], key: SigningKey,
                  require_receipt: bool = False) -> dict[str, Any] | None:
    """Store a miner's result and sign the coordinator's receipt with ``key``; returns that receipt.

    See the module docstring for the rules; a repeat of the stored outcome returns the
    receipt signed the first time.
    """
    miner = d.miner(miner_id)
    job = d.store.get_job(job_id)
    if job is None:
        raise not_found(job_id)
    fingerprint = _fingerprint("result", body)
    if _check_holder(d, job, miner_id, fingerprint):
        signed = d.store.receipts(job_id, signer=SIGNER)
        return signed[-1] if signed else None
    result = dict(body["result"])
    receipt = result.pop("receipt", None)
    if receipt is not None:
        _verify(job_id, miner, receipt)
    elif require_receipt:
        raise ApiError(422, "result.receipt: required; sign a receipt with the registered receipt_key")
    now = d.clock()
    was_running_here = job.state == "RUNNING" and job.assigned_miner_id == miner_id
    metrics = body.get("metrics") or {}
    own_receipt = _coordinator_receipt(d, job, miner, result, metrics, receipt, now, key)
    with d.store.transaction() as conn:
        d.store.update_job(
            conn, job_id, state="COMPLETED", assigned_miner_id=miner_id, result=result,
            metrics=metrics, completed_at=now, updated_at=now, error=None, error_code=None,
            outcome_miner_id=miner_id, outcome_key=fingerprint, cancel_pending=0,
        )
        if receipt is not None:
            d.store.add_receipt(conn, job_id, dumps(receipt), now)
        d.store.add_receipt(conn, job_id, dumps(own_receipt), now, signer=SIGNER)
        d.store.set_payment_status(conn, job_id, "released", now)
        if d.behaviour.heartbeat_sets_inflight:
            conn.execute("UPDATE miners SET inflight = MAX(inflight - 1, 0) WHERE miner_id = ?", (miner_id,))
    d.publish(job_id, "COMPLETED", now)
    if was_running_here:
        d.offer(None)
    return own_receipt


def submit_failure(d: Dispatcher, miner_id: str, job_id: str, body: dict[str, Any]) -> str:
    """Record a miner's failure; returns the job's new state (QUEUED when retried)."""
    d.miner(miner_id)
    job = d.store.get_job(job_id)
    if job is None:
        raise not_found(job_id)
    fingerprint = _fingerprint("fail", {k: body.get(k) for k in ("error_code", "error_message")})
    if _check_holder(d, job, miner_id, fingerprint):
        return job.state
    now = d.clock()
    code, message = body["error_code"], body["error_message"]
    retry = d.behaviour.strict_outcomes and code in RETRYABLE_CODES and now < job.expires_at
    with d.store.transaction() as conn:
        if retry:
            d.requeue(conn, job, now)
            d.store.update_job(conn, job_id, outcome_miner_id=miner_id, outcome_key=fingerprint)
        else:
            d.store.update_job(
                conn, job_id, state="FAILED", error=message, error_code=code[:64], completed_at=now,
                updated_at=now, outcome_miner_id=miner_id, outcome_key=fingerprint, cancel_pending=0,
            )
            d.store.set_payment_status(conn, job_id, "refunded", now)
            # With a counted in-flight number (reference mode) /fail leaves the slot taken until
            # a heartbeat says otherwise; the local mode counts RUNNING jobs, so it is freed here.
            if d.behaviour.heartbeat_sets_inflight and d.behaviour.fail_frees_slot:
                conn.execute("UPDATE miners SET inflight = MAX(inflight - 1, 0) WHERE miner_id = ?", (miner_id,))
    if retry:
        d.after_requeue([job], now)
        return "QUEUED"
    d.publish(job_id, "FAILED", now)
    d.offer(None)
    return "FAILED"
