"""The daemon as a real process (``python -m miner run``): SIGTERM drains, ``kill -9`` loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coordinator.client import Client
from tests.minerconfig import write_miner_config
from tests.servers import RunningCoordinator, run_coordinator

ROOT = Path(__file__).resolve().parents[2]


def _write_config(
    path: Path, coordinator: RunningCoordinator, state_dir: Path, *, drain_grace_s: float = 10.0, **model: Any
) -> Path:
    return write_miner_config(
        path, coordinator, state_dir, miner_id="rig-proc", drain_grace_s=drain_grace_s,
        models=[{"name": "llama2", "runner": "fake", "delay_s": 0.05, **model}],
    )


def _start_miner(config: Path, log_path: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AITBC_MINER_") and k != "NOTIFY_SOCKET"}
    with log_path.open("ab") as log_file:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "miner", "run", "--config", str(config), *extra],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


def _wait(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    waiter = threading.Event()
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        waiter.wait(0.02)
    raise AssertionError("condition not reached in time")


def _log_events(log_path: Path) -> list[dict[str, Any]]:
    events = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        if line.startswith("{") and line.endswith("}"):  # a line still being written is skipped
            events.append(json.loads(line))
    return events


def _claimed(log_path: Path, job_id: str) -> bool:
    """The miner has the job in hand (the coordinator shows RUNNING a moment earlier, at assignment)."""
    return any(e["event"] == "job_claimed" and e.get("job_id") == job_id for e in _log_events(log_path))


def _sigterm_once_claimed(config: Path, log_path: Path, job_id: str) -> None:
    """Start the miner, send SIGTERM once it holds ``job_id``, and expect a clean exit (0)."""
    proc = _start_miner(config, log_path)
    try:
        _wait(lambda: _claimed(log_path, job_id))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text()
    finally:
        proc.kill()


def test_sigterm_lets_the_running_job_finish_then_exits_0(
    tmp_path: Path, coordinator: RunningCoordinator, coordinator_client: Client
) -> None:
    """SIGTERM during a job stops claiming, lets the job complete within the grace period, and exits 0."""
    job_id = coordinator_client.submit_job({"model": "llama2", "prompt": "drain me"}, ttl_seconds=120)["job_id"]
    later = coordinator_client.submit_job({"model": "llama2", "prompt": "not claimed"}, ttl_seconds=120)["job_id"]
    config = _write_config(tmp_path / "miner.toml", coordinator, tmp_path / "state", delay_s=1.5)
    log_path = tmp_path / "miner.log"
    _sigterm_once_claimed(config, log_path, job_id)
    assert coordinator_client.get_job(job_id)["state"] == "COMPLETED"
    assert coordinator_client.get_job(later)["state"] == "QUEUED"
    events = [e["event"] for e in _log_events(log_path)]
    assert events.index("shutting_down") < events.index("job_finished") < events.index("miner_stopped")


def test_sigterm_past_the_grace_period_hands_the_job_back(
    tmp_path: Path, coordinator: RunningCoordinator, coordinator_client: Client
) -> None:
    """A job still running when drain_grace_s ends is failed SHUTDOWN, which requeues it; exit code 0."""
    job_id = coordinator_client.submit_job({"model": "llama2", "prompt": "HANG forever"}, ttl_seconds=120)["job_id"]
    config = _write_config(
        tmp_path / "miner.toml",
        coordinator,
        tmp_path / "state",
        drain_grace_s=0.3,
        fail_mode="hang",
        fail_marker="HANG",
    )
    log_path = tmp_path / "miner.log"
    _sigterm_once_claimed(config, log_path, job_id)
    assert coordinator_client.get_job(job_id)["state"] == "QUEUED"
    finished = [e for e in _log_events(log_path) if e["event"] == "job_finished"]
    assert [e["code"] for e in finished] == ["SHUTDOWN"]


def test_kill_9_before_acknowledgement_then_restart_delivers_once(tmp_path: Path) -> None:
    """A result stuck in the outbox at a kill -9 is delivered once by the next start, before it registers."""
    state_dir = tmp_path / "state"
    log_path = tmp_path / "miner.log"
    with run_coordinator(tmp_path / "coordinator.db", rate_limits=None) as coordinator:
        with Client(coordinator.url, coordinator.client_key) as client:
            job_id = client.submit_job({"model": "llama2", "prompt": "survive a crash"}, ttl_seconds=300)["job_id"]
            config = _write_config(tmp_path / "miner.toml", coordinator, state_dir, delay_s=1.5)
            proc = _start_miner(config, log_path)
            try:
                _wait(lambda: _claimed(log_path, job_id))
                coordinator.stop()  # the result cannot be acknowledged now
                _wait(lambda: any((state_dir / "outbox").glob("*.json")))
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
            finally:
                proc.kill()
            pending = [json.loads(p.read_text())["job_id"] for p in (state_dir / "outbox").glob("*.json")]
            assert pending == [job_id]

            coordinator.start()
            first_run_lines = len(_log_events(log_path))
            restarted = _start_miner(config, log_path, "--exit-when-idle", "1")
            try:
                assert restarted.wait(60) == 0, log_path.read_text()
            finally:
                restarted.kill()
            assert client.get_job(job_id)["state"] == "COMPLETED"
            receipts = client.get_receipts(job_id, signer="miner")
            assert len(receipts) == 1 and receipts[0]["job_id"] == job_id
    second_run = [e["event"] for e in _log_events(log_path)[first_run_lines:]]
    assert "job_claimed" not in second_run  # delivered from the outbox, not run again
    assert second_run.index("outbox_undelivered_outcomes") < second_run.index(
        "registered"
    )
    assert not list((state_dir / "outbox").glob("*.json"))
