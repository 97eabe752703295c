"""Shared pieces of the reliability suite: a miner subprocess whose JSON log is read live,
its config, /proc sampling, and read-only access to the coordinator's SQLite file.

:class:`MinerProcess` runs ``python -m miner run`` (the real daemon, as operators run
it) with stdout on a pipe. A reader thread parses each JSON log line as it arrives and
can act on it at once (``on_event``), which is how the crash tests kill the process at
a chosen point of a job's life with a latency of a fraction of a millisecond.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "CANCELED", "EXPIRED")


def write_config(
    path: Path,
    *,
    url: str,
    miner_key: str,
    state_dir: Path,
    miner_id: str = "rig-rel",
    concurrency: int = 1,
    drain_grace_s: float = 5.0,
    metrics_listen: str | None = None,
    log_level: str = "info",
    coordinator: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    extra_models: Iterable[dict[str, Any]] = (),
) -> Path:
    """A miner.toml for a fast CPU test miner on the fake runner."""
    coord = {
        "url": url,
        "api_key": miner_key,
        "poll_interval_s": 0.05,
        "idle_backoff_max_s": 0.2,
        "heartbeat_interval_s": 0.5,
        "long_poll_s": 1,
        "max_polls_per_minute": 6000,
        "timeout_s": 5,
        **(coordinator or {}),
    }
    models = [{"name": "llama2", "runner": "fake", "delay_s": 0.05, **(model or {})}, *extra_models]
    lines = [
        f'miner_id = "{miner_id}"',
        f"state_dir = {json.dumps(str(state_dir))}",
        f"concurrency = {concurrency}",
        f"drain_grace_s = {drain_grace_s}",
        "",
        "[coordinator]",
        *(f"{k} = {json.dumps(v)}" for k, v in coord.items()),
        "",
        "[gpus]",
        "enabled = false",
        "",
        "[benchmark]",
        "enabled = false",
        "",
        "[metrics]",
        f"enabled = {'true' if metrics_listen else 'false'}",
        *([f'listen = "{metrics_listen}"'] if metrics_listen else []),
        "",
        "[log]",
        'format = "json"',
        f'level = "{log_level}"',
    ]
    for spec in models:
        lines += ["", "[[models]]", *(f"{k} = {json.dumps(v)}" for k, v in spec.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def child_env() -> dict[str, str]:
    """The test's environment without settings that would change the miner's behaviour."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AITBC_MINER_") and k != "NOTIFY_SOCKET"}


@dataclass
class MinerProcess:
    """One run of the daemon as a subprocess; its JSON log events are collected live.

    ``on_event(event)`` is called on the reader thread for every log line, before it is
    stored; it may kill the process (see :meth:`kill`). ``argv`` is extra CLI arguments.
    ``command`` replaces ``python -m miner run --config CONFIG`` (the soak uses a wrapper).
    """

    config: Path
    argv: tuple[str, ...] = ()
    on_event: Callable[[dict[str, Any]], None] | None = None
    command: list[str] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    other_lines: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    _reader: threading.Thread | None = None
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def start(self) -> MinerProcess:
        cmd = self.command or [sys.executable, "-m", "miner", "run", "--config", str(self.config)]
        self.proc = subprocess.Popen([*cmd, *self.argv], cwd=ROOT, env=child_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._reader = threading.Thread(target=self._read, name="miner-log", daemon=True)
        self._reader.start()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            event: dict[str, Any] | None = None
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except ValueError:
                    event = None
            if event is None:
                with self._cond:
                    self.other_lines.append(line)
                continue
            if self.on_event is not None:
                self.on_event(event)
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()
        self.proc.stdout.close()
        with self._cond:
            self._cond.notify_all()

    def wait_event(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, start: int = 0) -> dict[str, Any] | None:
        """The first event from index ``start`` matching ``predicate``; None on timeout or exit."""
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = start
            while True:
                for event in self.events[seen:]:
                    if predicate(event):
                        return event
                seen = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc is not None and self.proc.poll() is not None and not self._alive_reader()):
                    return None
                self._cond.wait(min(left, 0.2))

    def _alive_reader(self) -> bool:
        return self._reader is not None and self._reader.is_alive()

    def names(self) -> list[str]:
        with self._cond:
            return [str(e.get("event")) for e in self.events]

    def kill(self) -> None:
        """SIGKILL (safe to call from the reader thread, and twice)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """SIGKILL if still running, and reap the process (for ``finally`` blocks)."""
        if self.proc is None:
            return
        self.kill()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self.join()

    def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit in ``timeout``. The exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.wait(10)
        self.join()
        return code

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self.join()
        return code

    def join(self) -> None:
        if self._reader is not None:
            self._reader.join(10)

    def log_text(self, last: int = 60) -> str:
        with self._cond:
            lines = [json.dumps(e) for e in self.events[-last:]] + self.other_lines[-20:]
        return "\n".join(lines)


# -- /proc sampling ---------------------------------------------------------------------


def proc_sample(pid: int) -> dict[str, float]:
    """RSS (KiB), open file descriptors and OS threads of a live process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    values: dict[str, float] = {}
    for line in status.splitlines():
        key, _, rest = line.partition(":")
        if key == "VmRSS":
            values["rss_kib"] = float(rest.split()[0])
        elif key == "Threads":
            values["threads"] = float(rest.strip())
    values["fds"] = float(len(os.listdir(f"/proc/{pid}/fd")))
    return values


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``(x, y)`` points (0 for fewer than two distinct x)."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in points) / sxx


# -- the coordinator's file, read-only ----------------------------------------------------


def read_jobs(db_path: Path) -> dict[str, dict[str, Any]]:
    """Every job row of the coordinator's SQLite file (opened read-only), by job id, with
    ``receipts`` the count of the miner's receipts (the coordinator adds its own)."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT job_id, state, error, error_code, attempts, outcome_miner_id FROM jobs").fetchall()
        receipts: dict[str, int] = {}
        for job_id, count in conn.execute(
            "SELECT job_id, COUNT(*) FROM receipts WHERE signer = 'miner' GROUP BY job_id"
        ):
            receipts[job_id] = int(count)
    finally:
        conn.close()
    return {r["job_id"]: {**dict(r), "receipts": receipts.get(r["job_id"], 0)} for r in rows}


def outbox_files(state_dir: Path) -> dict[str, Path]:
    """Pending outbox entries on disk, by job id."""
    out: dict[str, Path] = {}
    folder = state_dir / "outbox"
    if not folder.is_dir():
        return out
    for path in folder.glob("*.json"):
        try:
            out[json.loads(path.read_text(encoding="utf-8"))["job_id"]] = path
        except (OSError, ValueError, KeyError):
            out[path.stem] = path
    return out


def acked_ids(state_dir: Path) -> set[str]:
    path = state_dir / "outbox" / "acked.log"
    try:
        return {line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}
    except OSError:
        return set()


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    waiter = threading.Event()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        waiter.wait(interval)
    return predicate()
