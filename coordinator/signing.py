"""The coordinator's own receipt: its Ed25519 key on disk and the receipt it signs at ``/result``.

The key is a 32-byte seed kept beside the database (``<db file>.receipt-key``), created once
with mode 0600 (written to a fresh temporary file opened ``O_EXCL``, fsynced, renamed into
place) and refused when group or others may read it. Its public ``key_id`` is printed at
start and served at ``GET /v1/receipts/key``.

The receipt uses the envelope and canonical form of :mod:`miner.wire.receipts`, so the
verifier that checks a miner's receipt checks this one too. It carries the reference
service's fields (``version, receipt_id, job_id, provider, client, status, units,
unit_type, unit_price, price, started_at, completed_at, metadata {job_payload,
job_constraints, result, metrics}``) plus ``signer: "coordinator"`` and ``timestamp``; it
names no ``miner_id``, which is how a client tells it from the miner's receipt
(docs/protocol.md, "Receipts").
"""

from __future__ import annotations

import math
import os
import secrets
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from miner.wire.protocol import utc_iso
from miner.wire.receipts import key_id

KEY_SUFFIX = ".receipt-key"
SEED_BYTES = 32
SIGNER = "coordinator"


class ReceiptKeyError(Exception):
    """The coordinator's receipt key file cannot be used; the message names the file and the fix."""


def receipt_key_path(db_path: Path) -> Path:
    """Where the key of the coordinator using ``db_path`` lives: beside it, ``<name>.receipt-key``."""
    return db_path.with_name(db_path.name + KEY_SUFFIX)


def load_or_create_receipt_key(path: Path) -> SigningKey:
    """The key at ``path``, created (mode 0600) when absent; :class:`ReceiptKeyError` when unusable."""
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_key(path, SigningKey.generate())
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ReceiptKeyError(f"coordinator receipt key {path} has mode {mode:o}; run `chmod 600 {path}`")
        seed = path.read_bytes()
    except OSError as exc:
        raise ReceiptKeyError(
            f"coordinator receipt key {path}: {exc.strerror or exc}; check the database folder's permissions"
        ) from exc
    if len(seed) != SEED_BYTES:
        raise ReceiptKeyError(
            f"coordinator receipt key {path} holds {len(seed)} bytes, not a {SEED_BYTES}-byte Ed25519 seed; "
            "move it away to create a new key (receipts signed with the old one stop verifying)"
        )
    return SigningKey(seed)


def _write_key(path: Path, key: SigningKey) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, bytes(key))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def public_key_info(key: SigningKey) -> dict[str, str]:
    """``{"alg", "key_id", "signer"}``: what ``GET /v1/receipts/key`` serves."""
    return {"alg": "Ed25519", "key_id": key_id(key.verify_key), "signer": SIGNER}


def _finite_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


def gpu_seconds(metrics: dict[str, Any], miner_receipt: dict[str, Any] | None, started_at: float | None,
                completed_at: float) -> float:
    """Billed units: ``metrics.duration_ms / 1000`` as the reference does, else the miner receipt's
    ``units``, else the time between assignment and result."""
    duration_ms = _finite_number(metrics.get("duration_ms"))
    if duration_ms is not None:
        return round(duration_ms / 1000, 6)
    units = _finite_number((miner_receipt or {}).get("units"))
    if units is not None:
        return round(units, 6)
    return round(max(completed_at - (started_at or completed_at), 0.0), 6)


def build_coordinator_receipt(
    *,
    job_id: str,
    miner_id: str,
    client: str,
    payload: dict[str, Any],
    constraints: dict[str, Any],
    result: dict[str, Any],
    metrics: dict[str, Any],
    started_at: float | None,
    completed_at: float,
    unit_price: Any = None,
    miner_receipt: dict[str, Any] | None = None,
    payment: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The coordinator's receipt for a completed job, before signing (no ``None`` survives signing).

    ``result`` is the miner's result without its receipt; ``miner_receipt`` (when the miner
    signed one) is referenced by ``miner_receipt_id`` and its ``key_id``; ``payment`` adds
    the simulated ledger entry (``payment_id``, ``amount``, ``currency``).
    """
    units = gpu_seconds(metrics, miner_receipt, started_at, completed_at)
    price_per_unit = _finite_number(unit_price) or 0.0
    miner_signature = (miner_receipt or {}).get("signature")
    receipt: dict[str, Any] = {
        "version": "1.0",
        "receipt_id": secrets.token_hex(16),
        "signer": SIGNER,
        "job_id": job_id,
        "provider": miner_id,
        "client": client,
        "status": "COMPLETED",
        "units": units,
        "unit_type": "gpu_seconds",
        "unit_price": price_per_unit,
        "price": round(units * price_per_unit, 9),
        "started_at": int(started_at if started_at is not None else completed_at),
        "completed_at": int(completed_at),
        "timestamp": utc_iso(completed_at),
        "miner_receipt_id": (miner_receipt or {}).get("receipt_id"),
        "miner_key_id": miner_signature.get("key_id") if isinstance(miner_signature, dict) else None,
        "payment": payment,
        "metadata": {"job_payload": payload, "job_constraints": constraints, "result": result,
                     "metrics": metrics},
    }
    return receipt

