"""The durable outbox: every job outcome is on disk before it is submitted.

Layout under ``state_dir``::

    outbox/<job_id>.json        one pending outcome (a result or a fail body)
    outbox/rejected/<id>.json   outcomes the coordinator will never accept (kept for people)
    outbox/acked.log            job ids recently acknowledged, one a line (bounded)

Writes are atomic: a temporary file is written and fsynced, renamed over the final name,
and the folder is fsynced. An acknowledgement is recorded in ``acked.log`` *before* the
entry is deleted, so a crash between the two still counts the job as delivered.
:meth:`Outbox.state` is how the daemon refuses to run or submit a job twice.

The event loop never waits for the disk. The index (what is pending, acked, rejected,
kept only in memory; ``healthy``/``reason``) belongs to the event loop and takes no lock,
so ``len``, ``pending``, ``get`` and ``state`` are cheap synchronous calls. Every disk
operation runs in the outbox's one writer thread (:mod:`miner.outbox.writer`) and is
awaited; the loop changes the index only once the write it depends on has returned.
Changes take turns (an ``asyncio.Lock``, which parks coroutines, never the loop), and a
change whose caller is cancelled still completes, so the index always matches the disk.

An entry is encoded (strict JSON: no NaN, no sets or bytes) before anything else: an
unencodable one raises ``ValueError``/``TypeError`` and leaves no trace. When the state
folder cannot be written (disk full, read-only), :meth:`Outbox.put` keeps the outcome in
memory so it can still be delivered, marks the outbox unhealthy and raises
:class:`~miner.wire.errors.StateError`; :meth:`Outbox.recover` writes the kept outcomes
once writes work again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import structlog

from miner.outbox import writer
from miner.outbox.writer import MIN_FREE_BYTES, Fsync, Writer, atomic_write, why
from miner.wire.errors import StateError

__all__ = ["ACKED_LIMIT", "MIN_FREE_BYTES", "Outbox", "OutboxEntry", "atomic_write", "encode", "file_name"]

log = structlog.get_logger("miner.outbox.store")

FORMAT_VERSION = 1
ACKED_LIMIT = 4096
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")

Kind = Literal["result", "fail"]
State = Literal["pending", "rejected", "acked"]
T = TypeVar("T")


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
        try:
            created_at, seq = float(data.get("created_at", 0.0)), int(data.get("seq", 0))
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError("outbox entry has a bad created_at or seq") from exc
        return cls(job_id=job_id, kind=kind, body=body, created_at=created_at, seq=seq)


def encode(data: dict[str, Any]) -> bytes:
    """Strict JSON bytes of an outbox record; ``ValueError``/``TypeError`` for what JSON cannot hold."""
    return json.dumps(data, allow_nan=False).encode("utf-8")


def file_name(job_id: str) -> str:
    """A safe, unique file name for a job id (ids with odd characters get a hash suffix)."""
    safe = _SAFE_NAME.sub("_", job_id)[:150]
    if safe.startswith(".") or not safe:
        safe = "_" + safe  # never a hidden file, never "." or ".."
    if safe != job_id:
        safe += "-" + hashlib.sha256(job_id.encode("utf-8")).hexdigest()[:16]
    return safe + ".json"


class Outbox:
    """Durable, ordered store of job outcomes until the coordinator acknowledges them.

    Contract: ``await open()`` once before use (raises :class:`StateError` if the folder
    is unusable) and ``await aclose()`` at the end. ``put`` before submitting; ``ack``
    after a 2xx; ``reject`` for an answer meaning "never"; ``revive`` when a rejected job
    is offered again. ``pending()`` lists in creation order; ``state(job_id)`` says
    whether an outcome is pending, rejected, recently acknowledged, or unknown. Reads are
    synchronous and for the event loop's thread only; ``fsync`` (called with a file
    descriptor) is used for every fsync, files and folders alike.
    """

    def __init__(self, state_dir: Path, *, acked_limit: int = ACKED_LIMIT, fsync: Fsync = os.fsync) -> None:
        self.dir = Path(state_dir) / "outbox"
        self.rejected_dir = self.dir / "rejected"
        self.acked_path = self.dir / "acked.log"
        self.acked_limit = acked_limit
        self._fsync = fsync
        self._writer = Writer()
        self._turn: asyncio.Lock | None = None
        self._turn_loop: asyncio.AbstractEventLoop | None = None
        self._changes: set[asyncio.Task[Any]] = set()
        # The index: touched only on the event loop, never by the writer thread.
        self._pending: dict[str, OutboxEntry] = {}
        self._unsaved: dict[str, bytes] = {}  # pending only in memory (the disk refused them), encoded
        self._acked: OrderedDict[str, None] = OrderedDict()
        self._acked_lines = 0
        self._rejected: set[str] = set()
        self._seq = 0
        self.healthy = True
        self.reason = ""

    # -- queries (event loop only, no lock, no disk) --------------------------------------

    def pending(self) -> list[OutboxEntry]:
        return sorted(self._pending.values(), key=lambda e: (e.created_at, e.seq))

    def get(self, job_id: str) -> OutboxEntry | None:
        return self._pending.get(job_id)

    def __len__(self) -> int:
        return len(self._pending)

    def state(self, job_id: str) -> State | None:
        """What this miner knows of ``job_id``'s outcome: pending, rejected, acked, or nothing."""
        if job_id in self._pending:
            return "pending"
        if file_name(job_id)[:-5] in self._rejected:
            return "rejected"
        return "acked" if job_id in self._acked else None

    # -- taking turns ------------------------------------------------------------------

    async def _change(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run one change after those before it; it completes even if the caller is cancelled."""
        task = asyncio.ensure_future(self._in_turn(fn, *args))
        self._changes.add(task)
        task.add_done_callback(self._change_done)
        return await asyncio.shield(task)

    async def _in_turn(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        if self._turn is None or self._turn_loop is not loop:
            self._turn, self._turn_loop = asyncio.Lock(), loop
        async with self._turn:
            return await fn(*args)

    def _change_done(self, task: asyncio.Task[Any]) -> None:
        self._changes.discard(task)
        if not task.cancelled():
            task.exception()  # a caller that was cancelled no longer reads it; do not warn

    # -- start-up and close -------------------------------------------------------------

    async def open(self) -> None:
        """Create the folders, drop stale temporary files, load pending, acked and rejected ids."""
        await self._change(self._open)

    async def _open(self) -> None:
        try:
            found = await self._writer.run(
                writer.load, self.dir, self.rejected_dir, self.acked_path, self.acked_limit, OutboxEntry.from_json
            )
        except OSError as exc:
            raise StateError(f"cannot use the outbox folder {self.dir}: {why(exc)}") from exc
        self._acked = OrderedDict.fromkeys(found.acked)
        self._acked_lines = found.acked_lines
        self._rejected = found.rejected
        self._unsaved = {}
        self._pending = {}
        for entry in sorted(found.entries, key=lambda e: (e.created_at, e.seq)):
            self._pending[entry.job_id] = entry
            self._seq = max(self._seq, entry.seq)
        if self._pending:
            log.info("outbox_undelivered_outcomes", count=len(self._pending))

    async def aclose(self) -> None:
        """Let the changes already asked for finish, then stop the writer thread (idempotent)."""
        if self._writer.closed:
            return
        await self._change(self._writer.aclose)

    # -- changes -----------------------------------------------------------------------

    async def put(self, entry: OutboxEntry) -> None:
        """Persist ``entry``; it is pending once written.

        Raises ``ValueError``/``TypeError`` (and changes nothing) when the entry cannot be
        encoded as JSON. On a write failure it is kept in memory, the outbox is marked
        unhealthy and :class:`StateError` is raised.
        """
        seq = self._seq + 1
        data = encode(entry.to_json() | {"seq": seq})  # first: an unencodable entry leaves no trace
        self._seq = entry.seq = seq
        await self._change(self._save, entry, data)

    async def _save(self, entry: OutboxEntry, data: bytes) -> None:
        try:
            await self._writer.run(atomic_write, self.dir / file_name(entry.job_id), data, fsync=self._fsync)
        except OSError as exc:
            self._pending[entry.job_id] = entry
            self._unsaved[entry.job_id] = data
            self._mark_unhealthy(f"cannot write {self.dir}: {why(exc)}")
            raise StateError(f"outbox write failed for job {entry.job_id}: {self.reason}") from exc
        self._pending[entry.job_id] = entry
        self._unsaved.pop(entry.job_id, None)

    async def ack(self, job_id: str, *, remember: bool = True) -> None:
        """The coordinator acknowledged ``job_id``: record it, then delete the entry.

        ``remember=False`` (a ``SHUTDOWN`` failure, which hands the job back for
        reassignment) deletes the entry without recording the job as done, so this miner
        may run it if it is offered again. When ``acked.log`` cannot be written the job is
        still remembered in memory and the outbox is marked unhealthy.
        """
        await self._change(self._ack, job_id, remember)

    async def _ack(self, job_id: str, remember: bool) -> None:
        line: str | None = None
        compacted: OrderedDict[str, None] | None = None
        if remember and self._acked_lines >= 2 * self.acked_limit:
            compacted = self._with_acked(OrderedDict(self._acked), job_id)
        elif remember:
            line = job_id.replace("\n", " ") + "\n"
        data = None if compacted is None else "".join(f"{j}\n" for j in compacted).encode("utf-8")
        failed = await self._writer.run(
            writer.record_ack, self.acked_path, line, data, self.dir / file_name(job_id), self._fsync
        )
        if remember:
            # Remembered even when the log write failed: no re-run in this process.
            self._acked = compacted if compacted is not None else self._with_acked(self._acked, job_id)
            if not failed:
                self._acked_lines = len(self._acked) if compacted is not None else self._acked_lines + 1
        self._pending.pop(job_id, None)
        self._unsaved.pop(job_id, None)
        if failed:
            self._mark_unhealthy(failed)

    def _with_acked(self, acked: OrderedDict[str, None], job_id: str) -> OrderedDict[str, None]:
        acked[job_id] = None
        acked.move_to_end(job_id)
        while len(acked) > self.acked_limit:
            acked.popitem(last=False)
        return acked

    async def reject(self, job_id: str, reason: str) -> None:
        """The coordinator will never accept ``job_id``: keep it under ``rejected/`` with the reason."""
        await self._change(self._reject, job_id, reason)

    async def _reject(self, job_id: str, reason: str) -> None:
        name = file_name(job_id)
        entry = self._pending.get(job_id)
        if entry is not None:
            data = encode(entry.to_json() | {"rejected_reason": reason, "rejected_at": time.time()})
            await self._writer.run(writer.move_aside, self.rejected_dir / name, data, self.dir / name, self._fsync)
        self._pending.pop(job_id, None)
        self._unsaved.pop(job_id, None)
        self._rejected.add(name[:-5])  # the file under rejected/ is the durable record

    async def revive(self, job_id: str) -> OutboxEntry | None:
        """Move a rejected outcome back to pending (the coordinator offered its job again).

        Returns the entry, or ``None`` when there is no readable rejected outcome; raises
        :class:`StateError` (the entry kept in memory) when it cannot be written back.
        """
        return await self._change(self._revive, job_id)

    async def _revive(self, job_id: str) -> OutboxEntry | None:
        path = self.rejected_dir / file_name(job_id)
        try:
            entry = OutboxEntry.from_json(await self._writer.run(writer.read_json, path))
            seq = self._seq + 1
            data = encode(entry.to_json() | {"seq": seq})
        except (ValueError, TypeError):
            return None
        self._seq = entry.seq = seq
        try:
            await self._save(entry, data)
        finally:
            self._rejected.discard(path.stem)
            self._acked.pop(job_id, None)
        await self._writer.run(writer.unlink_revived, path)
        return entry

    def _mark_unhealthy(self, reason: str) -> None:
        if self.healthy:
            log.error("state_folder_not_writable", reason=reason)
        self.healthy = False
        self.reason = reason

    # -- recovery ----------------------------------------------------------------------

    async def recover(self) -> bool:
        """Probe the folder (free space, then a real write); if it is usable, save the outcomes
        kept in memory. True when healthy. Cheap enough to call on every heartbeat."""
        return await self._change(self._recover)

    async def _recover(self) -> bool:
        order = sorted(self._unsaved, key=lambda j: self._pending[j].seq if j in self._pending else 0)
        unsaved = [(j, self.dir / file_name(j), self._unsaved[j]) for j in order]
        done = await self._writer.run(writer.probe_and_save, self.dir, self.rejected_dir, unsaved, self._fsync)
        for job_id in done.saved:
            self._unsaved.pop(job_id, None)
        if done.failed:
            self._mark_unhealthy(done.failed)
            return False
        if not self.healthy:
            log.info("state_folder_writable_again")
        self.healthy = True
        self.reason = ""
        return True
