"""Crash safety: SIGKILL the miner at chosen points of a job's life, restart it, and check
that every job ends in exactly one terminal state with at most one accepted result.

One campaign = one local coordinator (real HTTP on loopback, real SQLite file), the
fault proxy in front of it, and the real daemon as a subprocess (``python -m miner
run``, fake runner, one slot). Each *kill point* aims at one phase, then the process is
killed with SIGKILL and started again (the next start replays the outbox first):

=================  ==========================================================================
aimed phase        how it is reached
=================  ==========================================================================
``during_run``     a random moment after the ``job claimed`` log line, while the runner works
``after_signing``  at once on the ``job finished`` log line (written after the receipt is
                   signed and before the outbox write)
``during_submit``  the proxy parks the ``/result`` request (the coordinator never sees it)
``after_submit``   the proxy forwards ``/result`` and parks the coordinator's 200: the job is
                   COMPLETED but the outbox entry is still on disk
=================  ==========================================================================

Where each kill *actually* landed is read from the evidence after the kill (log events,
the outbox folder, ``acked.log`` and the proxy's records) and counted by phase.

Run it on its own: ``python -m tests.reliability.crash --kill-points 200 --json out.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.reliability.faultproxy import FaultProxy
from tests.reliability.faults import PASS, Fault, Request
from tests.reliability.harness import (
    TERMINAL,
    MinerProcess,
    acked_ids,
    outbox_files,
    read_jobs,
    wait_until,
    write_config,
)

AIMS = ("during_run", "after_signing", "during_submit", "after_submit")
PHASES = ("during_run", "after_signing", "stored", "during_submit", "after_submit", "ack_recorded", "after_ack", "missed")
RUN_DELAY_S = 0.3
TRIGGER_TIMEOUT_S = 30.0


@dataclass
class KillPoint:
    index: int
    aim: str
    phase: str
    job_id: str | None


@dataclass
class CrashReport:
    """What a campaign did and found (all counts; lists name the offending jobs)."""

    kill_points: int = 0
    phases: dict[str, int] = field(default_factory=dict)
    aims: dict[str, int] = field(default_factory=dict)
    jobs: int = 0
    states: dict[str, int] = field(default_factory=dict)
    not_terminal: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # not COMPLETED although every job is valid
    duplicate_results_sent: list[str] = field(default_factory=list)  # >1 distinct receipt sent
    duplicates_accepted: list[str] = field(default_factory=list)  # >1 distinct outcome accepted, or >1 receipt stored
    bad_receipts: list[str] = field(default_factory=list)
    outbox_left: int = 0
    rejected_left: int = 0
    unexpected_exits: list[str] = field(default_factory=list)
    extra_runs: int = 0  # runs beyond the first (a kill before the outcome was durable requeues the job)
    replays: int = 0  # /result requests for one receipt beyond the first (outbox replays)
    result_requests: int = 0
    seconds: float = 0.0
    points: list[KillPoint] = field(default_factory=list)

    def ok(self) -> bool:
        return not (self.not_terminal or self.lost or self.duplicate_results_sent or self.duplicates_accepted
                    or self.bad_receipts or self.outbox_left or self.unexpected_exits)

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("points")
        return data


class HoldResults:
    """Plan: park ``/result`` requests (``hold``) or their answers (``hold_answer``)."""

    def __init__(self, kind: str) -> None:
        self.fault = Fault(kind)

    def __call__(self, request: Request) -> Fault:
        return self.fault if request.endpoint == "result" else PASS


class CrashCampaign:
    """A crash campaign in ``workdir`` (see the module docstring)."""

    def __init__(self, workdir: Path, *, kill_points: int, seed: int = 7) -> None:
        self.workdir = Path(workdir)
        self.kill_points = kill_points
        self.rng = random.Random(seed)
        self.state_dir = self.workdir / "state"
        self.report = CrashReport()
        self.job_ids: list[str] = []

    # -- one kill point -----------------------------------------------------------------

    def _start(self, config: Path) -> MinerProcess:
        return MinerProcess(config).start()

    def _kill_at(self, miner: MinerProcess, proxy: FaultProxy, aim: str, since: int) -> str | None:
        """Kill ``miner`` at ``aim``; the job it was working on (None when the point was missed)."""
        target: dict[str, str | None] = {"job": None}
        if aim == "after_signing":
            fired = threading.Event()

            def on_event(event: dict[str, Any]) -> None:
                if event.get("event") == "job_finished" and not fired.is_set():
                    miner.kill()  # from the reader thread, as soon as the line arrives
                    target["job"] = event.get("job_id")
                    fired.set()

            miner.on_event = on_event
            fired.wait(TRIGGER_TIMEOUT_S)
            miner.on_event = None
            if not fired.is_set():
                return None
            return target["job"]
        if aim == "during_run":
            claimed = miner.wait_event(lambda e: e.get("event") == "job_claimed", TRIGGER_TIMEOUT_S)
            if claimed is None:
                return None
            threading.Event().wait(self.rng.uniform(0.0, RUN_DELAY_S * 0.8))
            miner.kill()
            return claimed.get("job_id")

        def parked(records: list[Any]) -> bool:
            for r in records[since:]:
                if r.endpoint == "result" and r.sent_status is None and r.fault in ("hold", "hold_answer"):
                    if r.fault == "hold" or r.upstream_status is not None:
                        target["job"] = r.job_id
                        return True
            return False

        if not proxy.wait_for(parked, TRIGGER_TIMEOUT_S):
            return None
        miner.kill()
        return target["job"]

    def _classify(self, miner: MinerProcess, proxy: FaultProxy, job_id: str | None, since: int) -> str:
        if job_id is None:
            return "missed"
        in_outbox = job_id in outbox_files(self.state_dir)
        acked = job_id in acked_ids(self.state_dir)
        records = [r for r in proxy.snapshot()[since:] if r.endpoint == "result" and r.job_id == job_id]
        accepted = any(r.upstream_status is not None and 200 <= r.upstream_status < 300 for r in records)
        finished = any(e.get("event") == "job_finished" and e.get("job_id") == job_id for e in miner.events)
        if acked:
            return "ack_recorded" if in_outbox else "after_ack"
        if in_outbox:
            if accepted:
                return "after_submit"
            return "during_submit" if records else "stored"
        if finished:
            return "after_signing"
        return "during_run"

    # -- the campaign ---------------------------------------------------------------------

    def run(self) -> CrashReport:
        from coordinator.client import Client
        from tests.servers import run_coordinator

        started = time.monotonic()
        db = self.workdir / "coordinator.db"
        with run_coordinator(db, rate_limits=None, lease_seconds=60.0) as coordinator, \
                FaultProxy(coordinator.url) as proxy, Client(coordinator.url, coordinator.client_key) as client:
            config = write_config(self.workdir / "miner.toml", url=proxy.url, miner_key=coordinator.miner_key,
                                  state_dir=self.state_dir, model={"delay_s": RUN_DELAY_S})
            miner = self._start(config)
            try:
                for index in range(self.kill_points):
                    self.job_ids.append(client.submit_job({"model": "llama2", "prompt": f"crash point {index}"},
                                                          ttl_seconds=3600)["job_id"])
                    # Each phase twice in turn first (the short run is exactly that), then at random.
                    aim = AIMS[index % len(AIMS)] if index < 2 * len(AIMS) else self.rng.choice(AIMS)
                    since = len(proxy.snapshot())
                    proxy.set_plan(HoldResults("hold") if aim == "during_submit"
                                   else HoldResults("hold_answer") if aim == "after_submit" else (lambda r: PASS))
                    job_id = self._kill_at(miner, proxy, aim, since)
                    code = miner.wait(30)
                    if job_id is not None and code != -9:
                        self.report.unexpected_exits.append(f"kill point {index}: exit {code}")
                    proxy.set_plan(lambda r: PASS)
                    proxy.release(forward=False)
                    phase = self._classify(miner, proxy, job_id, since)
                    self.report.points.append(KillPoint(index, aim, phase, job_id))
                    miner = self._start(config)
                self._finish(miner, proxy, client, db, coordinator.url)
            finally:
                miner.stop()
        self.report.seconds = round(time.monotonic() - started, 1)
        return self.report

    def _finish(self, miner: MinerProcess, proxy: FaultProxy, client: Any, db: Path, url: str) -> None:
        """Let the last miner drain every job, then check the coordinator's books."""
        from miner.daemon.keyfile import KEY_FILE_NAME, load_or_create_key
        from miner.wire.receipts import ReceiptVerificationError, key_id, verify_receipt

        wait_until(lambda: all(client.get_job(j)["state"] in TERMINAL for j in self.job_ids), 180, interval=0.25)
        code = miner.terminate(30)
        if code != 0:
            self.report.unexpected_exits.append(f"final miner: exit {code}\n{miner.log_text(20)}")
        report = self.report
        report.kill_points = len(report.points)
        report.phases = dict(Counter(p.phase for p in report.points))
        report.aims = dict(Counter(p.aim for p in report.points))
        jobs = read_jobs(db)
        report.jobs = len(self.job_ids)
        states = {j: jobs[j]["state"] for j in self.job_ids}
        report.states = dict(Counter(states.values()))
        report.not_terminal = [j for j, s in states.items() if s not in TERMINAL]
        report.lost = [j for j, s in states.items() if s != "COMPLETED"]
        report.extra_runs = sum(max(0, jobs[j]["attempts"] - 1) for j in self.job_ids)
        signer = key_id(load_or_create_key(self.state_dir / KEY_FILE_NAME).verify_key)
        results = [r for r in proxy.snapshot() if r.endpoint == "result"]
        report.result_requests = len(results)
        for job_id in self.job_ids:
            sent = [r for r in results if r.job_id == job_id]
            receipt_ids = {r.receipt_id for r in sent if r.receipt_id}
            accepted = {r.receipt_id for r in sent if r.upstream_status is not None and 200 <= r.upstream_status < 300}
            report.replays += max(0, sum(1 for r in sent if r.upstream_status is not None) - len(receipt_ids))
            if len(receipt_ids) > 1:
                report.duplicate_results_sent.append(job_id)
            if len(accepted) > 1 or jobs[job_id]["receipts"] > 1:
                report.duplicates_accepted.append(job_id)
            if states[job_id] == "COMPLETED":
                stored = client.get_receipts(job_id, signer="miner")
                try:
                    if len(stored) != 1:
                        raise ReceiptVerificationError(f"{len(stored)} receipts")
                    verify_receipt(stored[0], signer)
                except ReceiptVerificationError:
                    report.bad_receipts.append(job_id)
        report.outbox_left = len(outbox_files(self.state_dir))
        report.rejected_left = len(list((self.state_dir / "outbox" / "rejected").glob("*")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kill-points", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None, help="write the report (with every kill point) here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="aitbc-crash-") as tmp:
        report = CrashCampaign(Path(tmp), kill_points=args.kill_points, seed=args.seed).run()
    print(json.dumps(report.summary(), indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(report), indent=2), encoding="utf-8")
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
