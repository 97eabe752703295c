"""One miner per state folder: an advisory ``flock`` on ``<state_dir>/miner.lock``.

Two daemons on one state folder (a foreground trial beside the service, say) would
register as the same miner with the same key and run every job twice. The first to
start holds an exclusive, non-blocking ``flock`` for its whole life and writes its pid
into the file; a second gets :class:`~miner.wire.errors.StateLocked` at once, naming the
folder and the pid that holds it. The kernel drops the lock when the process dies, so a
crash never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from miner.wire.errors import StateError, StateLocked

LOCK_FILE_NAME = "miner.lock"


class StateLock:
    """The exclusive lock on a state folder; :meth:`acquire` once, :meth:`release` at exit."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LOCK_FILE_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise StateLocked (another miner has it) / StateError (unusable folder)."""
        if self._fd is not None:
            return
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            # Held read-only: a writable descriptor would keep the folder's file system from
            # being remounted read-only, and the lock needs none.
            fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateError(f"cannot use the state folder {self.state_dir}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "another process"
            raise StateLocked(
                f"the state folder {self.state_dir} is in use by another aitbc-miner ({who}); "
                "stop that one first, or give this one its own state_dir"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StateError(f"cannot lock {self.path}: {exc.strerror or exc}") from exc
        self._fd = fd
        try:  # the pid is for the message a second miner prints; only the lock holder writes it
            with open(self.path, "w", encoding="ascii") as fh:
                fh.write(f"{os.getpid()}\n")
        except OSError:
            pass

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing drops the flock


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
