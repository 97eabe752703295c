"""A miner id is bound to the miner API key that first registered it (not in reference-quirks mode)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
from nacl.signing import SigningKey

from coordinator.store import Store
from miner.wire.receipts import key_id
from tests.coordinator.helpers import ScriptedMiner, capabilities
from tests.servers import run_coordinator

KEY_A, KEY_B = "miner-key-alice-0001", "miner-key-mallory-02"


def _register(url: str, api_key: str, miner_id: str, signer: SigningKey) -> httpx.Response:
    return httpx.post(f"{url}/v1/miners/register", json={"capabilities": capabilities(signer)},
                      headers={"X-Api-Key": api_key, "X-Miner-ID": miner_id})


def _stored_receipt_key(db: Path, miner_id: str) -> str | None:
    store = Store(db)
    try:
        miner = store.get_miner(miner_id)
    finally:
        store.close()
    return miner.receipt_key if miner else None


def test_another_key_cannot_take_over_a_registered_miner_id(tmp_path: Path) -> None:
    """After key A registers rig-01, key B gets 403 on register and every miner call; the receipt key stays A's."""
    db = tmp_path / "c.db"
    honest, intruder = SigningKey.generate(), SigningKey.generate()
    with run_coordinator(db, miner_key=KEY_A, rate_limits=None) as coordinator:
        assert _register(coordinator.url, KEY_A, "rig-01", honest).status_code == 200
    with run_coordinator(db, miner_key=KEY_B, rate_limits=None) as coordinator:  # same file: the binding persists
        refused = _register(coordinator.url, KEY_B, "rig-01", intruder)
        assert refused.status_code == 403
        detail = refused.json()["detail"]
        assert "X-Miner-ID" in detail and "'rig-01'" in detail and "another miner API key" in detail
        headers = {"X-Api-Key": KEY_B, "X-Miner-ID": "rig-01"}
        for path, body in [("/v1/miners/heartbeat", {}), ("/v1/miners/poll", {}),
                           ("/v1/miners/job-1/result", {"result": {"output": "x"}}),
                           ("/v1/miners/job-1/fail", {"error_code": "RUNNER_ERROR", "error_message": "x"})]:
            answer = httpx.post(coordinator.url + path, json=body, headers=headers)
            assert answer.status_code == 403, (path, answer.text)
        assert _register(coordinator.url, KEY_B, "rig-02", intruder).status_code == 200  # a fresh id is fine
    assert _stored_receipt_key(db, "rig-01") == key_id(honest.verify_key)
    with run_coordinator(db, miner_key=KEY_A, rate_limits=None) as coordinator:
        assert _register(coordinator.url, KEY_A, "rig-01", honest).status_code == 200  # the owner re-registers


def test_a_refused_takeover_leaves_the_owner_registered(tmp_path: Path) -> None:
    """After another key is refused rig-01, the owner's heartbeat still answers ok without registering again."""
    db = tmp_path / "c.db"
    with run_coordinator(db, miner_key=KEY_A, rate_limits=None) as coordinator, \
            ScriptedMiner(coordinator, "rig-01") as miner:
        miner.register()
    with run_coordinator(db, miner_key=KEY_B, rate_limits=None) as coordinator:
        assert _register(coordinator.url, KEY_B, "rig-01", SigningKey.generate()).status_code == 403
    with run_coordinator(db, miner_key=KEY_A, rate_limits=None) as coordinator:
        heartbeat = httpx.post(f"{coordinator.url}/v1/miners/heartbeat", json={},
                               headers={"X-Api-Key": KEY_A, "X-Miner-ID": "rig-01"})
        assert heartbeat.status_code == 200 and heartbeat.json()["status"] == "ok"
        # Without X-Miner-ID the key itself names the miner: always its own binding.
        bare = httpx.post(f"{coordinator.url}/v1/miners/register", json={"capabilities": {}},
                          headers={"X-Api-Key": KEY_A})
        assert bare.status_code == 200


def test_reference_quirks_do_not_bind(tmp_path: Path) -> None:
    """With quirks=reference any miner key may register under any id and replace its receipt key, as upstream."""
    db = tmp_path / "ref.db"
    first, second = SigningKey.generate(), SigningKey.generate()
    with run_coordinator(db, miner_key=KEY_A, rate_limits=None, quirks="reference") as coordinator:
        assert _register(coordinator.url, KEY_A, "rig-01", first).status_code == 200
    with run_coordinator(db, miner_key=KEY_B, rate_limits=None, quirks="reference") as coordinator:
        assert _register(coordinator.url, KEY_B, "rig-01", second).status_code == 200
        heartbeat = httpx.post(f"{coordinator.url}/v1/miners/heartbeat", json={},
                               headers={"X-Api-Key": KEY_B, "X-Miner-ID": "rig-01"})
        assert heartbeat.status_code == 200
    assert _stored_receipt_key(db, "rig-01") == key_id(second.verify_key)


def test_a_file_from_before_the_binding_is_upgraded(tmp_path: Path) -> None:
    """A coordinator file whose miners table lacks the key column opens, and its miners bind on their next register."""
    db = tmp_path / "old.db"
    old = sqlite3.connect(db)
    old.execute(
        "CREATE TABLE miners (miner_id TEXT PRIMARY KEY, capabilities TEXT NOT NULL, concurrency INTEGER NOT NULL, "
        "region TEXT, status TEXT NOT NULL, inflight INTEGER NOT NULL DEFAULT 0, last_seen REAL NOT NULL, "
        "registered_at REAL NOT NULL, session_token TEXT NOT NULL, receipt_key TEXT)"
    )
    old.execute("INSERT INTO miners VALUES ('rig-01', '{}', 1, NULL, 'ONLINE', 0, 0, 0, 'token', NULL)")
    old.commit()
    old.close()
    signer = SigningKey.generate()
    with run_coordinator(db, miner_key=KEY_A, rate_limits=None) as coordinator:
        assert _register(coordinator.url, KEY_A, "rig-01", signer).status_code == 200
    with run_coordinator(db, miner_key=KEY_B, rate_limits=None) as coordinator:
        assert _register(coordinator.url, KEY_B, "rig-01", SigningKey.generate()).status_code == 403
