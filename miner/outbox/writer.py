"""The outbox's disk side: every read, write, fsync and unlink, run in one writer thread.

The functions here take paths, bytes and an ``fsync`` callable and return plain data;
none of them sees the outbox's index (which belongs to the event loop, see
:mod:`miner.outbox.store`). :class:`Writer` runs them one at a time, in the order they
were submitted, on a single thread, so the event loop only ever awaits them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import structlog

log = structlog.get_logger("miner.outbox.writer")

Fsync = Callable[[int], None]
T = TypeVar("T")

# Below this much free space in the state folder, no new job is claimed (its outcome may not fit).
MIN_FREE_BYTES = 1 << 20


def fsync_dir(path: Path, fsync: Fsync = os.fsync) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, fsync: Fsync = os.fsync) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent, fsync)


def free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use under ``path`` (None when it cannot be told)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def why(exc: OSError) -> str:
    """The short reason of an OS error (``No space left on device``)."""
    return exc.strerror or str(exc)


@dataclass
class Loaded:
    """What :func:`load` found in the outbox folder."""

    acked: list[str] = field(default_factory=list)  # the last ``acked_limit`` ids, oldest first
    acked_lines: int = 0
    rejected: set[str] = field(default_factory=set)  # file stems under rejected/
    entries: list[Any] = field(default_factory=list)  # ``parse`` of each pending file not yet acked


def load(folder: Path, rejected_dir: Path, acked_path: Path, acked_limit: int, parse: Callable[[Any], Any]) -> Loaded:
    """Create the folders, drop stale temporary files, read acked ids, rejected names, entries.

    ``parse`` builds an entry from one decoded file (raising ValueError); a file that fails is moved
    to ``rejected/<name>.corrupt``. Entries already in ``acked.log`` (acknowledged just
    before a crash) are deleted instead of returned. Raises OSError.
    """
    rejected_dir.mkdir(parents=True, exist_ok=True)
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    found = Loaded()
    try:
        lines = acked_path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = []
    found.acked = [line.strip() for line in lines[-acked_limit:] if line.strip()]
    found.acked_lines = len(lines)
    found.rejected = {p.stem for p in rejected_dir.glob("*.json")}
    acked = set(found.acked)
    for path in folder.glob("*.json"):
        try:
            entry = parse(json.loads(path.read_bytes()))
        except (ValueError, UnicodeDecodeError) as exc:
            bad = rejected_dir / (path.name + ".corrupt")
            os.replace(path, bad)
            log.error("outbox_entry_unreadable", file=str(bad), error=str(exc))
            continue
        if entry.job_id in acked:
            remove(path)
            continue
        found.entries.append(entry)
    return found


def remove(path: Path) -> None:
    """Delete a settled entry's file; a failure is logged, never raised (the ack already counts)."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("outbox_entry_delete_failed", file=path.name, error=why(exc))


def record_ack(acked_path: Path, line: str | None, compacted: bytes | None, entry: Path, fsync: Fsync) -> str:
    """Record an acknowledgement, then delete the entry's file. Returns "" or why the record failed.

    ``line`` is appended to ``acked.log`` (fsynced); ``compacted`` replaces the whole log
    instead; neither: nothing is recorded (a job handed back). The entry is deleted even
    when the record fails: the job was acknowledged, and the process still remembers it.
    """
    failed = ""
    try:
        if compacted is not None:
            atomic_write(acked_path, compacted, fsync=fsync)
        elif line is not None:
            with open(acked_path, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                fsync(fh.fileno())
    except OSError as exc:
        failed = f"cannot write {acked_path}: {why(exc)}"
    remove(entry)
    return failed


def move_aside(target: Path, data: bytes, entry: Path, fsync: Fsync) -> None:
    """Write a rejected outcome under ``rejected/`` and delete its pending file (errors logged)."""
    try:
        atomic_write(target, data, fsync=fsync)
    except OSError as exc:
        log.error("rejected_outcome_move_failed", file=target.name, error=why(exc))
        return
    remove(entry)


def read_json(path: Path) -> Any:
    """The decoded JSON of ``path``, or None when it cannot be read or decoded."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def unlink_revived(path: Path) -> None:
    """Delete a rejected outcome that went back to pending (a failure is only logged)."""
    try:
        path.unlink()
    except OSError as exc:
        log.warning("rejected_outcome_remove_failed", file=path.name, error=why(exc))


@dataclass
class Probed:
    """What :func:`probe_and_save` achieved: the entries it saved, and why it stopped ("" if it did not)."""

    saved: list[str] = field(default_factory=list)
    failed: str = ""


def probe_and_save(folder: Path, rejected_dir: Path, unsaved: list[tuple[str, Path, bytes]], fsync: Fsync) -> Probed:
    """Check free space, make a real probe write, then write the outcomes kept in memory."""
    done = Probed()
    free = free_bytes(folder)
    if free is not None and free < MIN_FREE_BYTES:
        done.failed = (
            f"cannot write {folder}: {os.strerror(errno.ENOSPC)} "
            f"({free // 1024} KiB free; claiming needs {MIN_FREE_BYTES // 1024} KiB)"
        )
        return done
    try:
        rejected_dir.mkdir(parents=True, exist_ok=True)
        probe = folder / ".probe"
        atomic_write(probe, b"ok", fsync=fsync)
        probe.unlink()
        for job_id, path, data in unsaved:
            atomic_write(path, data, fsync=fsync)
            done.saved.append(job_id)
    except OSError as exc:
        done.failed = f"cannot write {folder}: {why(exc)}"
    return done


class Writer:
    """One thread that runs the outbox's disk work, in submission order.

    ``await writer.run(fn, *args)`` returns ``fn``'s result or raises its exception; the
    event loop stays free meanwhile. :meth:`aclose` stops the thread (idempotent); work
    submitted after it raises RuntimeError.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-writer")
        self.closed = False

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self.closed:
            raise RuntimeError("the outbox is closed; open a new Outbox to write")
        return await asyncio.wrap_future(self._pool.submit(fn, *args, **kwargs))

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        # Work already queued finishes first; then the idle thread exits at once.
        await asyncio.wrap_future(self._pool.submit(lambda: None))
        self._pool.shutdown(wait=True)
