"""Receipts: canonical JSON, Ed25519 signing and verification, and the miner's key file.

The format is shared with the coordinator (docs/protocol.md, "Signature format"):

* the message is the receipt without ``signature``, every ``None`` dropped recursively
  (list items too), dumped with sorted keys, compact separators and ``ensure_ascii=True``,
  encoded UTF-8;
* ``signature = {"alg": "Ed25519", "key_id": b64url(public key), "sig": b64url(signature)}``
  with URL-safe base64 and no padding.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Sequence
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from miner.wire.errors import ReceiptVerificationError
from miner.wire.protocol import utc_iso

ALG = "Ed25519"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def drop_nones(obj: Any) -> Any:
    """Return ``obj`` with every ``None`` removed from dicts and lists, recursively."""
    if isinstance(obj, dict):
        return {k: drop_nones(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [drop_nones(v) for v in obj if v is not None]
    return obj


def canonical_json(obj: Any) -> bytes:
    """The canonical bytes of ``obj``: nulls dropped, sorted keys, compact, ASCII-escaped."""
    return json.dumps(drop_nones(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode(
        "utf-8"
    )


def sha256_hex(data: str | bytes) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def key_id(verify_key: VerifyKey) -> str:
    """The public ``key_id``: URL-safe base64 of the 32-byte public key, no padding."""
    return b64url(bytes(verify_key))


def sign_receipt(receipt: dict[str, Any], signing_key: SigningKey) -> dict[str, Any]:
    """Return a copy of ``receipt`` with its ``signature`` added.

    ``None`` values are removed from the returned receipt too, so it verifies exactly as
    sent and as served.
    """
    body: dict[str, Any] = drop_nones({k: v for k, v in receipt.items() if k != "signature"})
    signed = signing_key.sign(canonical_json(body))
    body["signature"] = {"alg": ALG, "key_id": key_id(signing_key.verify_key), "sig": b64url(signed.signature)}
    return body


def verify_receipt(receipt: dict[str, Any], public_key: str | bytes | VerifyKey | None = None) -> VerifyKey:
    """Verify ``receipt`` and return the key that signed it.

    ``public_key`` (a ``key_id`` string, 32 raw bytes or a ``VerifyKey``) pins the expected
    signer; without it the receipt's own ``key_id`` is used, which proves integrity but not
    identity. Raises :class:`ReceiptVerificationError` with the reason.
    """
    if not isinstance(receipt, dict):
        raise ReceiptVerificationError("a receipt must be a JSON object")
    sig = receipt.get("signature")
    if not isinstance(sig, dict):
        raise ReceiptVerificationError("the receipt has no signature object")
    if sig.get("alg") != ALG:
        raise ReceiptVerificationError(f"unsupported signature alg {sig.get('alg')!r}; expected {ALG}")
    try:
        embedded = VerifyKey(b64url_decode(str(sig.get("key_id", ""))))
        raw_sig = b64url_decode(str(sig.get("sig", "")))
    except (ValueError, TypeError) as exc:
        raise ReceiptVerificationError(f"malformed signature field: {exc}") from exc
    if public_key is None:
        key = embedded
    elif isinstance(public_key, VerifyKey):
        key = public_key
    else:
        try:
            key = VerifyKey(b64url_decode(public_key) if isinstance(public_key, str) else public_key)
        except (ValueError, TypeError) as exc:
            raise ReceiptVerificationError(f"malformed public key: {exc}") from exc
    if bytes(key) != bytes(embedded):
        raise ReceiptVerificationError("the receipt's key_id is not the expected signer's key")
    body = {k: v for k, v in receipt.items() if k != "signature"}
    try:
        key.verify(canonical_json(body), raw_sig)
    except (BadSignatureError, ValueError) as exc:
        raise ReceiptVerificationError("the signature does not match the receipt's contents") from exc
    return key


def prompt_sha256(prompt: str | None, messages: list[Any] | None) -> str:
    """SHA-256 of the prompt string, or of the canonical JSON of chat ``messages``."""
    if prompt is not None:
        return sha256_hex(prompt)
    return sha256_hex(canonical_json(messages or []))


def build_miner_receipt(
    *,
    job_id: str,
    miner_id: str,
    model: str,
    prompt_digest: str,
    output: str,
    started_at: float,
    completed_at: float,
    gpu_seconds: float,
    gpu_uuid: str | None,
    runner: str,
    gpu_uuids: Sequence[str] = (),
    model_revision: str | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    rerun: dict[str, Any] | None = None,
    energy_j: float | None = None,
    energy_method: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The miner's receipt before signing (docs/protocol.md, "The miner's receipt").

    ``rerun`` holds what a spot-check needs to run the job again and nothing secret
    (:func:`rerun_fields`); ``energy_j`` is this job's share of its GPUs' energy and
    ``energy_method`` how it was measured (``counter``, ``power_samples``, ``none``).
    """
    tokens = {"prompt": prompt_tokens, "completion": completion_tokens}
    receipt: dict[str, Any] = {
        "version": "1.0",
        "receipt_id": secrets.token_hex(16),
        "job_id": job_id,
        "miner_id": miner_id,
        "provider": miner_id,
        "model": model,
        "model_revision": model_revision,
        "prompt_sha256": prompt_digest,
        "output_sha256": sha256_hex(output),
        "units": round(max(gpu_seconds, 0.0), 6),
        "unit_type": "gpu_seconds",
        "started_at": int(started_at),
        "completed_at": int(completed_at),
        "timestamp": utc_iso(completed_at),
        "gpu_uuid": gpu_uuid or "cpu",
        "gpu_uuids": list(gpu_uuids) if len(gpu_uuids) > 1 else None,
        "runner": runner,
        "tokens": {k: v for k, v in tokens.items() if v is not None} or None,
        "energy_j": round(energy_j, 6) if energy_j is not None else None,
        "energy_method": energy_method,
        "nonce": secrets.token_hex(16),
    }
    if rerun:
        receipt.update(rerun)
    if extra:
        receipt.update(extra)
    cleaned: dict[str, Any] = drop_nones(receipt)
    return cleaned


def params_sha256(params: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a job's parsed generation parameters."""
    return sha256_hex(canonical_json(params))


def rerun_fields(
    *,
    runner_version: str | None,
    dtype: str | None,
    device: str,
    params: dict[str, Any],
    seed: int | None,
    sampling: str,
) -> dict[str, Any]:
    """The receipt fields a spot-check re-run needs: ``runner_version``, ``dtype``,
    ``device_kind`` (``cpu``, ``cuda``, ... from the device name), ``params_sha256`` (of the
    parsed parameters, see :func:`params_sha256`), ``seed`` and ``sampling`` (``greedy``,
    ``seeded`` or ``unseeded``: only the first two are reproducible)."""
    fields: dict[str, Any] = drop_nones(
        {
            "runner_version": runner_version,
            "dtype": dtype,
            "device_kind": device.split(":", 1)[0] or None,
            "params_sha256": params_sha256(params),
            "seed": seed,
            "sampling": sampling,
        }
    )
    return fields
