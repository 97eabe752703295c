"""The coordinator's own receipt key and receipts; ``aitbc-miner verify-receipt`` accepts them; the health check."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import httpx
import pytest
from nacl.signing import SigningKey

from coordinator.client import Client
from coordinator.signing import ReceiptKeyError, load_or_create_receipt_key, receipt_key_path
from miner.cli.main import build_parser
from miner.wire.receipts import key_id, sign_receipt, verify_receipt
from tests.coordinator.helpers import ScriptedMiner
from tests.servers import RunningCoordinator, run_coordinator

PAYLOAD = {"model": "tiny", "prompt": "hello"}


def test_key_is_created_once_beside_the_database_private_and_served(tmp_path: Path) -> None:
    """The key file appears beside the db with mode 0600, is served at /v1/receipts/key and survives a restart."""
    db = tmp_path / "coord.db"
    with run_coordinator(db, rate_limits=None) as coord:
        path = receipt_key_path(db)
        assert path == tmp_path / "coord.db.receipt-key"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        served = httpx.get(f"{coord.url}/v1/receipts/key", timeout=5).json()  # no key needed
        seed = path.read_bytes()
        assert served == {"alg": "Ed25519", "key_id": key_id(SigningKey(seed).verify_key), "signer": "coordinator"}
        coord.stop()
        coord.start()
        assert httpx.get(f"{coord.url}/v1/receipts/key", timeout=5).json() == served
    assert path.read_bytes() == seed


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    """A key readable by group or others, or of the wrong size, is refused with the file and the fix named."""
    path = tmp_path / "c.db.receipt-key"
    load_or_create_receipt_key(path)
    path.chmod(0o644)
    with pytest.raises(ReceiptKeyError, match="chmod 600"):
        load_or_create_receipt_key(path)
    path.chmod(0o600)
    path.write_bytes(b"short")
    with pytest.raises(ReceiptKeyError, match="32-byte"):
        load_or_create_receipt_key(path)


def _job_done_by_a_signing_miner(coord: RunningCoordinator, client: Client) -> tuple[str, ScriptedMiner]:
    job_id = client.submit_job(PAYLOAD)["job_id"]
    miner = ScriptedMiner(coord)
    miner.register()
    miner.claim()
    assert miner.result(job_id, "out").status_code == 200
    return job_id, miner


def _verify_cli(path: Path, *extra: str) -> int:
    args = build_parser().parse_args(["verify-receipt", str(path), *extra])
    code: int = args.func(args)
    return code


def test_verify_receipt_accepts_the_coordinators_and_the_miners(coordinator: RunningCoordinator,
                                                                coordinator_client: Client, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """One verifier for both: a coordinator receipt, a result answer and the /receipts list all verify."""
    job_id, miner = _job_done_by_a_signing_miner(coordinator, coordinator_client)
    miner.close()
    coordinator_key = coordinator_client.get_receipt_key()["key_id"]
    miner_key = key_id(miner.key.verify_key)
    answer = coordinator_client.get_job_result(job_id)
    own, listing = tmp_path / "own.json", tmp_path / "list.json"
    own.write_text(json.dumps(answer["coordinator_receipt"]), encoding="utf-8")
    listing.write_text(json.dumps(coordinator_client.get_receipts(job_id)), encoding="utf-8")
    result = tmp_path / "result.json"
    result.write_text(json.dumps(answer), encoding="utf-8")
    capsys.readouterr()
    assert _verify_cli(own, "--public-key", coordinator_key) == 0
    assert "from the coordinator" in capsys.readouterr().out
    assert _verify_cli(own, "--public-key", miner_key) == 1
    assert _verify_cli(listing) == 0
    out = capsys.readouterr().out
    assert "from the miner" in out and "from the coordinator" in out
    assert _verify_cli(listing, "--public-key", miner_key) == 0
    assert _verify_cli(result, "--public-key", coordinator_key) == 0
    assert _verify_cli(listing, "--public-key", key_id(SigningKey.generate().verify_key)) == 1
    forged = dict(answer["coordinator_receipt"], price=0)
    own.write_text(json.dumps(forged), encoding="utf-8")
    assert _verify_cli(own) == 1


def test_coordinator_receipt_verifies_like_a_miner_receipt() -> None:
    """The same envelope: sign_receipt/verify_receipt of miner.wire work on a coordinator-shaped receipt."""
    key = SigningKey(b"\x22" * 32)
    signed = sign_receipt({"version": "1.0", "signer": "coordinator", "job_id": "j", "provider": "m",
                           "metadata": {"result": {"output": "é", "x": None}}}, key)
    assert signed["metadata"]["result"] == {"output": "é"}  # nulls dropped before signing
    verify_receipt(signed, key_id(key.verify_key))


def test_health_is_503_when_the_database_cannot_be_read(tmp_path: Path) -> None:
    """A database overwritten under the running coordinator: /health answers 503 with db "unavailable"."""
    with run_coordinator(tmp_path / "c.db", rate_limits=None) as coord:
        assert httpx.get(f"{coord.url}/health", timeout=5).status_code == 200
        for name in ("c.db", "c.db-wal", "c.db-shm"):
            path = tmp_path / name
            if path.exists():
                with path.open("r+b") as file:
                    file.write(b"\x00garbage" * 512)
        response = httpx.get(f"{coord.url}/health", timeout=5)
        assert response.status_code == 503
        assert response.json()["db"] == "unavailable" and response.json()["status"] == "unavailable"
