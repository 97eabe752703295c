"""Soak: a bounded run of thousands of fake jobs, tracking the miner's RSS, open file
descriptors, OS threads, asyncio tasks and outbox size over time, and their slopes.

The coordinator runs as its own process (``python -m miner coordinator``) so the feeder
and the sampler in this process do not compete with it for one interpreter. The miner
is the real daemon (:mod:`tests.reliability.soak_miner`: ``Agent`` plus a task-count
sampler), fake runner, ``concurrency`` slots. A feeder keeps about ``queue_depth`` jobs
queued until the time is up; then the queue drains, the miner gets SIGTERM, and the books
are checked (every job COMPLETED, one receipt each, outbox empty).

Slopes are least-squares fits over the samples after the first ``warmup_share`` of the
run, per minute. ``python -m tests.reliability.soak --minutes 10 --json soak.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.reliability.harness import (
    ROOT,
    MinerProcess,
    child_env,
    outbox_files,
    proc_sample,
    read_jobs,
    slope,
    wait_until,
    write_config,
)

CLIENT_KEY = "soak-client-key"
MINER_KEY = "soak-miner-key"


@dataclass
class Sample:
    t: float  # seconds since the start
    rss_kib: float
    fds: float
    threads: float
    tasks: float | None  # None until the miner's sampler has written a line
    outbox: float
    completed: int
    py_heap_kib: float | None = None  # Python objects (tracemalloc), with ``trace_heap`` only


@dataclass
class SoakReport:
    seconds: float = 0.0
    jobs: int = 0
    completed: int = 0
    not_completed: int = 0
    receipts_not_one: int = 0
    outbox_left: int = 0
    max_outbox: float = 0.0
    exit_code: int | None = None
    jobs_per_s: float = 0.0
    start: dict[str, float] = field(default_factory=dict)  # first sample after warm-up
    end: dict[str, float] = field(default_factory=dict)
    peak: dict[str, float] = field(default_factory=dict)
    slope_per_min: dict[str, float] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)

    def ok(self) -> bool:
        return (self.not_completed == 0 and self.receipts_not_one == 0 and self.outbox_left == 0
                and self.exit_code == 0 and self.jobs > 0)

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("samples")
        return data


def _states(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return {state: int(n) for state, n in conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")}
    except sqlite3.OperationalError:
        return {}
    finally:
        conn.close()


def _last_line(path: Path) -> dict[str, float]:
    """The miner's latest self-sample (tasks, and the Python heap with --tracemalloc)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    return json.loads(lines[-1]) if lines else {}


def run_soak(workdir: Path, *, seconds: float, interval: float = 1.0, concurrency: int = 4, delay_s: float = 0.005,
             queue_depth: int = 100, warmup_share: float = 0.2, trace_heap: bool = False,
             snapshot_at: tuple[float, ...] = ()) -> SoakReport:
    from coordinator.client import Client
    from tests.servers import free_port

    workdir = Path(workdir)
    report = SoakReport()
    port = free_port()
    db = workdir / "coordinator.db"
    coord_log = (workdir / "coordinator.log").open("wb")
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "miner", "coordinator", "--port", str(port), "--db", str(db), "--client-key", CLIENT_KEY,
         "--miner-key", MINER_KEY, "--no-rate-limits", "--log-level", "warning"],
        cwd=ROOT, env=child_env(), stdout=coord_log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    samples_path = workdir / "tasks.jsonl"
    state_dir = workdir / "state"
    config = write_config(workdir / "miner.toml", url=url, miner_key=MINER_KEY, state_dir=state_dir,
                          concurrency=concurrency, model={"delay_s": delay_s}, log_level="warning",
                          coordinator={"heartbeat_interval_s": 2.0, "long_poll_s": 5})
    miner = MinerProcess(config, command=[sys.executable, "-m", "tests.reliability.soak_miner", "--config", str(config),
                                          "--samples", str(samples_path), "--interval", str(interval),
                                          *(["--tracemalloc"] if trace_heap else []),
                                          *[f"--snapshot-at={t:g}" for t in snapshot_at]])
    try:
        with Client(url, CLIENT_KEY) as client:
            if not wait_until(lambda: _up(client), 30):
                raise RuntimeError("the soak coordinator did not start; see coordinator.log")
            miner.start()
            started = time.monotonic()
            ids: list[str] = []
            next_sample = started
            sampler_wait = threading.Event()
            while time.monotonic() - started < seconds:
                states = _states(db)
                if states.get("QUEUED", 0) < queue_depth // 2:
                    ids += [client.submit_job({"model": "llama2", "prompt": f"soak {len(ids) + i}"}, ttl_seconds=3600)["job_id"]
                            for i in range(queue_depth)]
                now = time.monotonic()
                if now >= next_sample:
                    values, own = proc_sample(miner.pid), _last_line(samples_path)
                    report.samples.append(Sample(round(now - started, 2), values["rss_kib"], values["fds"], values["threads"],
                                                 own.get("tasks"), float(len(outbox_files(state_dir))),
                                                 states.get("COMPLETED", 0), own.get("py_heap_kib")))
                    next_sample += interval
                sampler_wait.wait(min(0.1, max(0.0, next_sample - time.monotonic())))
            wait_until(lambda: _states(db).get("COMPLETED", 0) >= len(ids), 120, interval=0.25)
            report.seconds = round(time.monotonic() - started, 1)
            wait_until(lambda: not outbox_files(state_dir), 30)
            report.exit_code = miner.terminate(30)
            _books(report, db, ids, state_dir, warmup_share)
    finally:
        miner.stop()
        coordinator.terminate()
        try:
            coordinator.wait(20)
        except subprocess.TimeoutExpired:
            coordinator.kill()
            coordinator.wait(10)
        coord_log.close()
    return report


def _up(client: Any) -> bool:
    import httpx

    try:
        return httpx.get(client.base_url + "/openapi.json", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _books(report: SoakReport, db: Path, ids: list[str], state_dir: Path, warmup_share: float) -> None:
    jobs = read_jobs(db)
    report.jobs = len(ids)
    report.completed = sum(1 for j in ids if jobs[j]["state"] == "COMPLETED")
    report.not_completed = report.jobs - report.completed
    report.receipts_not_one = sum(1 for j in ids if jobs[j]["receipts"] != 1)
    report.outbox_left = len(outbox_files(state_dir))
    report.jobs_per_s = round(report.completed / report.seconds, 1) if report.seconds else 0.0
    samples = report.samples
    report.max_outbox = max((s.outbox for s in samples), default=0.0)
    steady = [s for s in samples if s.t >= warmup_share * samples[-1].t and s.tasks is not None] if samples else []
    if steady:
        first, last = steady[0], steady[-1]
        keys = ("rss_kib", "fds", "threads", "tasks", "outbox") + (("py_heap_kib",) if first.py_heap_kib is not None else ())
        report.start = {k: float(getattr(first, k)) for k in keys}
        report.end = {k: float(getattr(last, k)) for k in keys}
        report.peak = {k: max(float(getattr(s, k)) for s in steady) for k in keys}
        report.slope_per_min = {k: round(60 * slope([(s.t, float(getattr(s, k))) for s in steady]), 3) for k in keys}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--tracemalloc", action="store_true", help="also sample the miner's Python heap (slower)")
    parser.add_argument("--snapshot-at", type=float, action="append", default=[], metavar="SECONDS",
                        help="with --tracemalloc: keep heap snapshots taken at these ages in --keep")
    parser.add_argument("--keep", type=Path, default=None, help="copy the miner's samples and snapshots here")
    parser.add_argument("--json", type=Path, default=None, help="write the report with every sample here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="aitbc-soak-") as tmp:
        report = run_soak(Path(tmp), seconds=args.minutes * 60, interval=args.interval, concurrency=args.concurrency,
                          trace_heap=args.tracemalloc, snapshot_at=tuple(args.snapshot_at))
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            for path in Path(tmp).glob("tasks.jsonl*"):
                shutil.copy(path, args.keep / path.name)
    print(json.dumps(report.summary(), indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(report), indent=2), encoding="utf-8")
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
