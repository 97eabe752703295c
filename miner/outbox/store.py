"""The durable outbox: every job outcome is on disk before it is submitted.

Layout under ``state_dir``::

    outbox/<job_id>.json        one pending outcome (a result or a fail body)
    outbox/rejected/<id>.json   outcomes the coordinator will never accept (kept for people)
    outbox/acked.log            job ids recently acknowledged, one a line (bounded)

Writes are atomic: a temporary file is written and fsynced, renamed over the final name,
and the folder is fsynced. An acknowledgement is recorded in ``acked.log`` *before* the
entry is deleted, so a crash between the two still counts the job as delivered.
:meth:`Outbox.seen` is how the daemon refuses to run or submit a job twice.

When the state folder cannot be written (disk full, read-only), :meth:`Outbox.put` keeps
the outcome in memory so it can still be delivered, marks the outbox unhealthy and raises
:class:`~miner.wire.errors.StateError`; :meth:`Outbox.recover` writes the kept outcomes once
writes work again. All methods are thread-safe (the daemon calls them via
``asyncio.to_thread``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog

from miner.wire.errors import StateError

log = structlog.get_logger("miner.outbox.store")

FORMAT_VERSION = 1
ACKED_LIMIT = 4096
# Below this much free space in the state folder, no new job is claimed (its outcome may not fit).
MIN_FREE_BYTES = 1 << 20
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")

Kind = Literal["result", "fail"]


@dataclass
class OutboxEntry:
    """One job's signed outcome waiting for acknowledgement.

    ``kind`` is ``result`` (``body`` is the ``/result`` body) or ``fail`` (``body`` holds
    ``error_code``, ``error_message`` and ``metrics``). ``seq`` orders entries.
    """

    job_id: str
    kind: Kind
    body: dict[str, Any]
    created_at: float = field(default_factory=time.time)
    seq: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "job_id": self.job_id,
            "kind": self.kind,
            "body": self.body,
            "created_at": self.created_at,
            "seq": self.seq,
        }

    @classmethod
    def from_json(cls, data: Any) -> OutboxEntry:
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            raise ValueError("not an outbox entry of a known version")
        job_id, kind, body = data.get("job_id"), data.get("kind"), data.get("body")
        if not isinstance(job_id, str) or kind not in ("result", "fail") or not isinstance(body, dict):
            raise ValueError("outbox entry lacks job_id, kind or body")
        return cls(
            job_id=job_id,
            kind=kind,
            body=body,
            created_at=float(data.get("created_at", 0.0)),
            seq=int(data.get("seq", 0)),
        )


def file_name(job_id: str) -> str:
    """A safe, unique file name for a job id (ids with odd characters get a hash suffix)."""
    safe = _SAFE_NAME.sub("_", job_id)[:150]
    if safe.startswith(".") or not safe:
        safe = "_" + safe  # never a hidden file, never "." or ".."
    if safe != job_id:
        safe += "-" + hashlib.sha256(job_id.encode("utf-8")).hexdigest()[:16]
    return safe + ".json"


def _free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use under ``path`` (None when it cannot be told)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


class Outbox:
    """Durable, ordered store of job outcomes until the coordinator acknowledges them.

    Contract: :meth:`open` once before use (raises :class:`StateError` if the folder is
    unusable). ``put`` before submitting; ``ack`` after a 2xx; ``reject`` for an answer
    meaning "never"; ``pending`` in creation order; ``seen(job_id)`` true for any job
    with a pending, acknowledged (recently) or rejected outcome.
    """

    def __init__(self, state_dir: Path, *, acked_limit: int = ACKED_LIMIT) -> None:
        self.dir = Path(state_dir) / "outbox"
        self.rejected_dir = self.dir / "rejected"
        self.acked_path = self.dir / "acked.log"
        self.acked_limit = acked_limit
        self._lock = threading.RLock()
        self._pending: dict[str, OutboxEntry] = {}
        self._unsaved: set[str] = set()  # pending only in memory (the disk refused them)
        self._acked: OrderedDict[str, None] = OrderedDict()
        self._acked_lines = 0
        self._rejected: set[str] = set()
        self._seq = 0
        self.healthy = True
        self.reason = ""

    # -- start-up --------------------------------------------------------------------

    def open(self) -> None:
        """Create the folders, drop stale temporary files, load pending and acked ids."""
        with self._lock:
            try:
                self.rejected_dir.mkdir(parents=True, exist_ok=True)
                for tmp in self.dir.glob(".*.tmp"):
                    tmp.unlink(missing_ok=True)
                self._load_acked()
                self._rejected = {p.stem for p in self.rejected_dir.glob("*.json")}
                entries = []
                for path in self.dir.glob("*.json"):
                    try:
                        entries.append(OutboxEntry.from_json(json.loads(path.read_bytes())))
                    except (ValueError, UnicodeDecodeError) as exc:
                        bad = self.rejected_dir / (path.name + ".corrupt")
                        os.replace(path, bad)
                        log.error("outbox entry unreadable; moved aside", file=str(bad), error=str(exc))
            except OSError as exc:
                raise StateError(f"cannot use the outbox folder {self.dir}: {exc.strerror or exc}") from exc
            for entry in sorted(entries, key=lambda e: (e.created_at, e.seq)):
                if entry.job_id in self._acked:
                    self._remove_file(entry.job_id)  # acked just before a crash
                    continue
                self._pending[entry.job_id] = entry
                self._seq = max(self._seq, entry.seq)
            if self._pending:
                log.info("outbox holds undelivered outcomes; delivering them first", count=len(self._pending))

    def _load_acked(self) -> None:
        try:
            lines = self.acked_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines[-self.acked_limit :]:
            if line.strip():
                self._acked[line.strip()] = None
        self._acked_lines = len(lines)

    # -- queries ---------------------------------------------------------------------

    def pending(self) -> list[OutboxEntry]:
        with self._lock:
            return sorted(self._pending.values(), key=lambda e: (e.created_at, e.seq))

    def get(self, job_id: str) -> OutboxEntry | None:
        with self._lock:
            return self._pending.get(job_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def seen(self, job_id: str) -> bool:
        return self.state(job_id) is not None

    def state(self, job_id: str) -> Literal["pending", "rejected", "acked"] | None:
        """What this miner knows of ``job_id``'s outcome: pending, rejected, acked, or nothing."""
        with self._lock:
            if job_id in self._pending:
                return "pending"
            if file_name(job_id)[:-5] in self._rejected:
                return "rejected"
            return "acked" if job_id in self._acked else None

    # -- changes ---------------------------------------------------------------------

    def put(self, entry: OutboxEntry) -> None:
        """Persist ``entry``. On a write failure it is kept in memory and StateError is raised."""
        with self._lock:
            self._seq += 1
            entry.seq = self._seq
            self._pending[entry.job_id] = entry
            try:
                atomic_write(self.dir / file_name(entry.job_id), json.dumps(entry.to_json()).encode("utf-8"))
            except OSError as exc:
                self._unsaved.add(entry.job_id)
                self._mark_unhealthy(f"cannot write {self.dir}: {exc.strerror or exc}")
                raise StateError(f"outbox write failed for job {entry.job_id}: {self.reason}") from exc

    def ack(self, job_id: str, *, remember: bool = True) -> None:
        """The coordinator acknowledged ``job_id``: record it, then delete the entry.

        ``remember=False`` (a ``SHUTDOWN`` failure, which hands the job back for
        reassignment) deletes the entry without recording the job as done, so this miner
        may run it if it is offered again.
        """
        with self._lock:
            if remember:
                self._record_acked(job_id)
            self._pending.pop(job_id, None)
            self._unsaved.discard(job_id)
            self._remove_file(job_id)

    def reject(self, job_id: str, reason: str) -> None:
        """The coordinator will never accept ``job_id``: keep it under ``rejected/`` with the reason."""
        with self._lock:
            entry = self._pending.pop(job_id, None)
            self._unsaved.discard(job_id)
            name = file_name(job_id)
            self._rejected.add(name[:-5])  # the file under rejected/ is the durable record
            if entry is None:
                return
            data = entry.to_json() | {"rejected_reason": reason, "rejected_at": time.time()}
            try:
                atomic_write(self.rejected_dir / name, json.dumps(data).encode("utf-8"))
                self._remove_file(job_id)
            except OSError as exc:
                log.error("cannot move a rejected outcome aside", job_id=job_id, error=str(exc))

    def revive(self, job_id: str) -> OutboxEntry | None:
        """Move a rejected outcome back to pending (the coordinator offered its job again).

        Returns the entry, or ``None`` when there is no readable rejected outcome.
        """
        with self._lock:
            path = self.rejected_dir / file_name(job_id)
            try:
                entry = OutboxEntry.from_json(json.loads(path.read_bytes()))
            except (OSError, ValueError, UnicodeDecodeError):
                return None
            self._rejected.discard(path.stem)
            self._acked.pop(job_id, None)
            self.put(entry)
            try:
                path.unlink()
            except OSError as exc:
                log.warning("cannot remove a revived rejected outcome", job_id=job_id, error=str(exc))
            return entry

    def _record_acked(self, job_id: str) -> None:
        self._acked[job_id] = None
        self._acked.move_to_end(job_id)
        while len(self._acked) > self.acked_limit:
            self._acked.popitem(last=False)
        try:
            if self._acked_lines >= 2 * self.acked_limit:
                atomic_write(self.acked_path, "".join(f"{j}\n" for j in self._acked).encode("utf-8"))
                self._acked_lines = len(self._acked)
            else:
                with open(self.acked_path, "a", encoding="utf-8") as fh:
                    fh.write(job_id.replace("\n", " ") + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                self._acked_lines += 1
        except OSError as exc:
            # The in-memory record still prevents a re-run in this process.
            self._mark_unhealthy(f"cannot write {self.acked_path}: {exc.strerror or exc}")

    def _remove_file(self, job_id: str) -> None:
        try:
            (self.dir / file_name(job_id)).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot delete an acknowledged outbox entry", job_id=job_id, error=str(exc))

    def _mark_unhealthy(self, reason: str) -> None:
        if self.healthy:
            log.error("state folder not writable; claiming stops until it is", reason=reason)
        self.healthy = False
        self.reason = reason

    # -- recovery --------------------------------------------------------------------

    def recover(self) -> bool:
        """Probe the folder (free space, then a real write); if it is usable, save the outcomes
        kept in memory. True when healthy. Cheap enough to call on every heartbeat."""
        with self._lock:
            try:
                free = _free_bytes(self.dir)
                if free is not None and free < MIN_FREE_BYTES:
                    self._mark_unhealthy(
                        f"cannot write {self.dir}: {os.strerror(errno.ENOSPC)} "
                        f"({free // 1024} KiB free; claiming needs {MIN_FREE_BYTES // 1024} KiB)"
                    )
                    return False
                self.rejected_dir.mkdir(parents=True, exist_ok=True)
                atomic_write(self.dir / ".probe", b"ok")
                (self.dir / ".probe").unlink()
                for job_id in sorted(self._unsaved, key=lambda j: self._pending[j].seq if j in self._pending else 0):
                    entry = self._pending.get(job_id)
                    if entry is not None:
                        atomic_write(self.dir / file_name(job_id), json.dumps(entry.to_json()).encode("utf-8"))
                    self._unsaved.discard(job_id)
            except OSError as exc:
                self._mark_unhealthy(f"cannot write {self.dir}: {exc.strerror or exc}")
                return False
            if not self.healthy:
                log.info("state folder writable again; claiming resumes")
            self.healthy = True
            self.reason = ""
            return True
