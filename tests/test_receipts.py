"""Receipts: the canonical form and signature pinned to the test vector in docs/protocol.md."""

from __future__ import annotations

import os
import stat

import pytest
from nacl.signing import SigningKey

from miner.daemon.keyfile import load_or_create_key
from miner.wire.errors import ConfigError
from miner.wire.receipts import (
    ReceiptVerificationError,
    build_miner_receipt,
    canonical_json,
    key_id,
    prompt_sha256,
    sign_receipt,
    verify_receipt,
)

VECTOR = {
    "version": "1.0",
    "job_id": "job-123",
    "miner_id": "rig-01",
    "provider": "rig-01",
    "model": "llama2",
    "units": 1.25,
    "unit_type": "gpu_seconds",
    "started_at": 1795886000,
    "completed_at": 1795886001,
    "timestamp": "2026-11-28T17:13:21Z",
    "gpu_uuid": None,
    "tags": ["a", None, "é"],
    "nonce": "00ff",
}
VECTOR_MESSAGE = (
    b'{"completed_at":1795886001,"job_id":"job-123","miner_id":"rig-01","model":"llama2","nonce":"00ff",'
    b'"provider":"rig-01","started_at":1795886000,"tags":["a","\\u00e9"],"timestamp":"2026-11-28T17:13:21Z",'
    b'"unit_type":"gpu_seconds","units":1.25,"version":"1.0"}'
)
VECTOR_KEY_ID = "0EqyMnQrtKs6E2i9RhXk5tAiSrcaAWuvhSCjMsl3hzc"
VECTOR_SIG = "h1KO7dwFPubPSc9rTZYxYT0DWG4aZzjNJB2al1BqaJ71hSiN7s9IFtPzTzGGVUnefo-hWyJNoSEJo1MudK0DDw"


def test_canonical_form_matches_the_published_vector() -> None:
    """Nulls are dropped recursively, keys sorted, output compact and ASCII-escaped."""
    assert canonical_json(VECTOR) == VECTOR_MESSAGE


def test_signature_matches_the_published_vector_byte_for_byte() -> None:
    """Signing the vector with the 0x11 seed gives the published key_id and sig."""
    signed = sign_receipt(VECTOR, SigningKey(b"\x11" * 32))
    assert signed["signature"] == {"alg": "Ed25519", "key_id": VECTOR_KEY_ID, "sig": VECTOR_SIG}
    assert "gpu_uuid" not in signed
    verify_receipt(signed, VECTOR_KEY_ID)


def test_tampered_receipt_or_wrong_key_is_rejected() -> None:
    """Changing any signed field, or pinning another signer, fails verification."""
    signed = sign_receipt(VECTOR, SigningKey(b"\x11" * 32))
    with pytest.raises(ReceiptVerificationError, match="does not match"):
        verify_receipt({**signed, "units": 2.5})
    with pytest.raises(ReceiptVerificationError, match="expected signer"):
        verify_receipt(signed, key_id(SigningKey(b"\x22" * 32).verify_key))
    with pytest.raises(ReceiptVerificationError, match="no signature"):
        verify_receipt({k: v for k, v in signed.items() if k != "signature"})


def test_miner_receipt_has_every_published_field_and_no_null() -> None:
    """The miner's receipt carries job, miner, digests, units and times, and verifies as built."""
    receipt = build_miner_receipt(
        job_id="j1", miner_id="rig-01", model="llama2", prompt_digest=prompt_sha256("hi", None),
        output="out", started_at=1795886000.5, completed_at=1795886002.0, gpu_seconds=1.5,
        gpu_uuid=None, runner="fake", prompt_tokens=1, completion_tokens=None,
    )
    signed = sign_receipt(receipt, SigningKey(b"\x11" * 32))
    for field in ("job_id", "miner_id", "provider", "prompt_sha256", "output_sha256", "units", "timestamp", "nonce"):
        assert field in signed
    assert signed["gpu_uuid"] == "cpu" and signed["tokens"] == {"prompt": 1}
    assert signed["timestamp"].endswith("Z")
    assert None not in signed.values()
    verify_receipt(signed, VECTOR_KEY_ID)


def test_key_file_is_created_private_and_reloaded(tmp_path) -> None:
    """The key is created 0600 on first use and the same key is loaded afterwards."""
    path = tmp_path / "state" / "key"
    key = load_or_create_key(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert bytes(load_or_create_key(path)) == bytes(key)


def test_world_readable_key_file_is_refused(tmp_path) -> None:
    """A key file readable by others stops start-up with the chmod fix."""
    path = tmp_path / "key"
    load_or_create_key(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_or_create_key(path)
