"""SQLite persistence for the local coordinator (standard library ``sqlite3``, WAL mode).

One connection, guarded by a lock, used from the event loop with short transactions
(each is a handful of indexed statements, well under a millisecond). Everything the
coordinator knows lives here, so a restart on the same file loses nothing: jobs,
results, receipts exactly as signed (the miner's and the coordinator's own), the simulated payments ledger and
miner registrations (so a result replayed after a restart still verifies), each with the
hash of the miner API key that first registered its id.

Times are unix seconds (``REAL``); JSON columns hold the text as stored.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    payload TEXT NOT NULL,
    constraints TEXT NOT NULL,
    ttl_seconds INTEGER NOT NULL,
    state TEXT NOT NULL,
    assigned_miner_id TEXT,
    requested_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    error TEXT,
    error_code TEXT,
    payment_id TEXT,
    result TEXT,
    metrics TEXT,
    outcome_miner_id TEXT,
    outcome_key TEXT,
    cancel_pending INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    model TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
CREATE INDEX IF NOT EXISTS jobs_by_miner ON jobs (assigned_miner_id, state);
CREATE TABLE IF NOT EXISTS receipts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at REAL NOT NULL,
    signer TEXT NOT NULL DEFAULT 'miner'
);
CREATE INDEX IF NOT EXISTS receipts_by_job ON receipts (job_id, id);
CREATE TABLE IF NOT EXISTS payments (
    payment_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL UNIQUE,
    amount REAL NOT NULL,
    currency TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS miners (
    miner_id TEXT PRIMARY KEY,
    capabilities TEXT NOT NULL,
    concurrency INTEGER NOT NULL,
    region TEXT,
    status TEXT NOT NULL,
    inflight INTEGER NOT NULL DEFAULT 0,
    last_seen REAL NOT NULL,
    registered_at REAL NOT NULL,
    session_token TEXT NOT NULL,
    receipt_key TEXT,
    key_hash TEXT
);
"""

# Columns added after the first release: (table, column, type), added to older files at open.
MIGRATIONS = (
    ("miners", "key_hash", "TEXT"),
    ("jobs", "model", "TEXT"),
    ("receipts", "signer", "TEXT NOT NULL DEFAULT 'miner'"),
)

JOB_COLUMNS = (
    "seq, job_id, owner, payload, constraints, ttl_seconds, state, assigned_miner_id, requested_at, "
    "expires_at, updated_at, started_at, completed_at, error, error_code, payment_id, result, metrics, "
    "outcome_miner_id, outcome_key, cancel_pending, attempts, model"
)


def dumps(value: Any) -> str:
    """JSON text for a column (ASCII-escaped, so any Python string stores safely)."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class JobRow:
    """One row of ``jobs``; JSON columns are decoded."""

    seq: int
    job_id: str
    owner: str
    payload: dict[str, Any]
    constraints: dict[str, Any]
    ttl_seconds: int
    state: str
    assigned_miner_id: str | None
    requested_at: float
    expires_at: float
    updated_at: float
    started_at: float | None
    completed_at: float | None
    error: str | None
    error_code: str | None
    payment_id: str | None
    result: dict[str, Any] | None
    metrics: dict[str, Any] | None
    outcome_miner_id: str | None
    outcome_key: str | None
    cancel_pending: bool
    attempts: int
    model: str | None = None  # payload.model when it is a string: what dispatch by model matches

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> JobRow:
        data = dict(row)
        for name in ("payload", "constraints", "result", "metrics"):
            if data[name] is not None:
                data[name] = json.loads(data[name])
        data["cancel_pending"] = bool(data["cancel_pending"])
        return cls(**data)


@dataclass(frozen=True)
class MinerRow:
    """One row of ``miners``; ``capabilities`` is decoded."""

    miner_id: str
    capabilities: dict[str, Any]
    concurrency: int
    region: str | None
    status: str
    inflight: int
    last_seen: float
    registered_at: float
    session_token: str
    receipt_key: str | None
    key_hash: str | None = None  # the miner API key the id is bound to (hashed); None: not bound yet

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> MinerRow:
        data = dict(row)
        data["capabilities"] = json.loads(data["capabilities"])
        return cls(**data)


@dataclass(frozen=True)
class PaymentRow:
    """One entry of the simulated payments ledger."""

    payment_id: str
    job_id: str
    amount: float
    currency: str
    status: str
    created_at: float
    updated_at: float


class Store:
    """The coordinator's SQLite file. Call :meth:`close` when done."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a committed transaction survives a process crash; only a
        # power loss can drop the last few.
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=5000")
        self._conn.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        for table, column, kind in MIGRATIONS:
            present = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                if (table, column) == ("jobs", "model"):  # jobs queued before dispatch by model
                    self._conn.execute("UPDATE jobs SET model = json_extract(payload, '$.model') "
                                       "WHERE json_type(payload, '$.model') = 'text'")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on error)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _one(self, sql: str, args: tuple[Any, ...]) -> sqlite3.Row | None:
        with self._lock:
            return self._conn.execute(sql, args).fetchone()

    def _all(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    # -- jobs -------------------------------------------------------------------------

    def get_job(self, job_id: str) -> JobRow | None:
        row = self._one(f"SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,))
        return JobRow.from_row(row) if row else None

    def insert_job(self, conn: sqlite3.Connection, **values: Any) -> None:
        for name in ("payload", "constraints"):
            values[name] = dumps(values[name])
        names = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        conn.execute(f"INSERT INTO jobs ({names}) VALUES ({marks})", tuple(values.values()))

    @staticmethod
    def update_job(conn: sqlite3.Connection, job_id: str, **values: Any) -> None:
        for name in ("result", "metrics"):
            if name in values and values[name] is not None:
                values[name] = dumps(values[name])
        sets = ", ".join(f"{name} = ?" for name in values)
        conn.execute(f"UPDATE jobs SET {sets} WHERE job_id = ?", (*values.values(), job_id))

    def queued_constraints(self) -> list[tuple[str, str, str | None]]:
        """``(job_id, constraints JSON text, model)`` of every QUEUED job, first in first out."""
        rows = self._all("SELECT job_id, constraints, model FROM jobs WHERE state = 'QUEUED' ORDER BY seq")
        return [(r[0], r[1], r[2]) for r in rows]

    def list_jobs(self, owner: str, states: tuple[str, ...], limit: int, offset: int) -> tuple[list[JobRow], int]:
        """``owner``'s jobs, newest first (``states`` empty: every state), and how many there are in all."""
        where, args = "owner = ?", [owner]
        if states:
            where += f" AND state IN ({', '.join('?' for _ in states)})"
            args.extend(states)
        total = self._one(f"SELECT COUNT(*) FROM jobs WHERE {where}", tuple(args))
        rows = self._all(f"SELECT {JOB_COLUMNS} FROM jobs WHERE {where} ORDER BY seq DESC LIMIT ? OFFSET ?",
                         (*args, limit, offset))
        return [JobRow.from_row(r) for r in rows], int(total[0]) if total else 0

    def readable(self) -> bool:
        """True when the database answers a read (the health check)."""
        try:
            self._one("SELECT COUNT(*) FROM sqlite_master", ())
            self._one("SELECT seq FROM jobs ORDER BY seq DESC LIMIT 1", ())
        except sqlite3.Error:
            return False
        return True

    def running_count(self, miner_id: str) -> int:
        row = self._one("SELECT COUNT(*) FROM jobs WHERE assigned_miner_id = ? AND state = 'RUNNING'", (miner_id,))
        return int(row[0]) if row else 0

    def running_jobs(self, miner_id: str | None = None) -> list[JobRow]:
        if miner_id is None:
            rows = self._all(f"SELECT {JOB_COLUMNS} FROM jobs WHERE state = 'RUNNING' ORDER BY seq")
        else:
            rows = self._all(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE state = 'RUNNING' AND assigned_miner_id = ? ORDER BY seq",
                (miner_id,),
            )
        return [JobRow.from_row(r) for r in rows]

    def due_to_expire(self, now: float) -> list[JobRow]:
        rows = self._all(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ('QUEUED', 'RUNNING') AND expires_at <= ? ORDER BY seq",
            (now,),
        )
        return [JobRow.from_row(r) for r in rows]

    def next_expiry(self) -> float | None:
        row = self._one("SELECT MIN(expires_at) FROM jobs WHERE state IN ('QUEUED', 'RUNNING')", ())
        return None if row is None or row[0] is None else float(row[0])

    def cancel_notices(self, miner_id: str, cancelled_state: str) -> list[str]:
        rows = self._all(
            "SELECT job_id FROM jobs WHERE assigned_miner_id = ? AND state IN (?, 'EXPIRED') AND cancel_pending = 1 "
            "ORDER BY seq",
            (miner_id, cancelled_state),
        )
        return [r[0] for r in rows]

    # -- receipts and payments ----------------------------------------------------------

    @staticmethod
    def add_receipt(conn: sqlite3.Connection, job_id: str, body_text: str, now: float, signer: str = "miner") -> None:
        """Store a receipt exactly as signed; ``signer`` is ``"miner"`` or ``"coordinator"``."""
        conn.execute("INSERT INTO receipts (job_id, body, created_at, signer) VALUES (?, ?, ?, ?)",
                     (job_id, body_text, now, signer))

    def receipts(self, job_id: str, signer: str | None = None) -> list[dict[str, Any]]:
        """The job's receipts, oldest first; only ``signer``'s when given."""
        if signer is None:
            rows = self._all("SELECT body FROM receipts WHERE job_id = ? ORDER BY id", (job_id,))
        else:
            rows = self._all("SELECT body FROM receipts WHERE job_id = ? AND signer = ? ORDER BY id",
                             (job_id, signer))
        return [json.loads(r[0]) for r in rows]

    @staticmethod
    def add_payment(conn: sqlite3.Connection, payment: PaymentRow) -> None:
        conn.execute(
            "INSERT INTO payments (payment_id, job_id, amount, currency, status, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (payment.payment_id, payment.job_id, payment.amount, payment.currency, payment.status,
             payment.created_at, payment.updated_at),
        )

    @staticmethod
    def set_payment_status(conn: sqlite3.Connection, job_id: str, status: str, now: float) -> None:
        conn.execute(
            "UPDATE payments SET status = ?, updated_at = ? WHERE job_id = ? AND status = 'escrowed'",
            (status, now, job_id),
        )

    def payment_for(self, job_id: str) -> PaymentRow | None:
        row = self._one("SELECT * FROM payments WHERE job_id = ?", (job_id,))
        return PaymentRow(**dict(row)) if row else None

    # -- miners -------------------------------------------------------------------------

    def get_miner(self, miner_id: str) -> MinerRow | None:
        row = self._one("SELECT * FROM miners WHERE miner_id = ?", (miner_id,))
        return MinerRow.from_row(row) if row else None

    @staticmethod
    def upsert_miner(conn: sqlite3.Connection, miner: MinerRow) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO miners (miner_id, capabilities, concurrency, region, status, inflight, "
            "last_seen, registered_at, session_token, receipt_key, key_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (miner.miner_id, dumps(miner.capabilities), miner.concurrency, miner.region, miner.status,
             miner.inflight, miner.last_seen, miner.registered_at, miner.session_token, miner.receipt_key,
             miner.key_hash),
        )

    @staticmethod
    def update_miner(conn: sqlite3.Connection, miner_id: str, **values: Any) -> None:
        sets = ", ".join(f"{name} = ?" for name in values)
        conn.execute(f"UPDATE miners SET {sets} WHERE miner_id = ?", (*values.values(), miner_id))

    def touch_miner(self, miner_id: str, now: float) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE miners SET last_seen = ? WHERE miner_id = ?", (now, miner_id))

    def stale_miners_with_jobs(self, deadline: float) -> list[str]:
        """Miners last seen before ``deadline`` that still hold RUNNING jobs."""
        rows = self._all(
            "SELECT DISTINCT m.miner_id FROM miners m JOIN jobs j ON j.assigned_miner_id = m.miner_id "
            "WHERE j.state = 'RUNNING' AND m.last_seen < ?",
            (deadline,),
        )
        return [r[0] for r in rows]

    def oldest_lease_with_jobs(self) -> float | None:
        row = self._one(
            "SELECT MIN(m.last_seen) FROM miners m JOIN jobs j ON j.assigned_miner_id = m.miner_id "
            "WHERE j.state = 'RUNNING'",
            (),
        )
        return None if row is None or row[0] is None else float(row[0])
