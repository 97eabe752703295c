"""No runner answer can wedge the miner: each poisoned result fails its one job and the daemon goes on."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from coordinator.client import FINAL_STATES, Client
from coordinator.store import Store
from miner.daemon.keyfile import KEY_FILE_NAME, load_key
from miner.wire.receipts import sha256_hex, verify_receipt
from tests.minerconfig import write_miner_config
from tests.plugins.install import REPO, install_offline, plugin_env
from tests.servers import RunningCoordinator

PLUGIN = Path(__file__).resolve().parent / "poison_runner"
MODEL = "poison-model"
POISONS = {
    "set-in-extra": "RESULT_INVALID",
    "nan-in-extra": "RESULT_INVALID",
    "bytes-output": "RESULT_INVALID",
    "none": "RESULT_INVALID",
    "huge-output": "RESULT_TOO_LARGE",
    "str-raises": "RESULT_INVALID",
}
RUN_TIMEOUT_S = 15.0


@pytest.fixture(scope="session")
def poison_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The poison plugin pip-installed offline (no dependencies) into a folder put on PYTHONPATH."""
    return install_offline(PLUGIN, tmp_path_factory.getbasetemp() / "poison-plugin-site")


def _start_miner(
    site: Path, tmp_path: Path, coordinator: RunningCoordinator, *args: str, **options: Any
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start ``aitbc-miner run`` serving the poison model; return the process and its log file."""
    config = write_miner_config(
        tmp_path / "miner.toml", coordinator, tmp_path / "state", miner_id="rig-poison", drain_grace_s=5,
        models=[{"name": MODEL, "runner": "poison", **options}],
    )  # fmt: skip
    log_path = tmp_path / "miner.log"
    with log_path.open("ab") as log_file:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "miner", "run", "--config", str(config), *args],
            cwd=REPO, env=plugin_env(site), stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return proc, log_path


def _log_events(log_path: Path) -> list[dict[str, Any]]:
    events = []
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("{") and line.endswith("}"):  # a line still being written is skipped
            events.append(json.loads(line))
    return events


def _finished(log_path: Path) -> dict[str, dict[str, Any]]:
    """The miner's "job_finished" lines by job id."""
    return {e["job_id"]: e for e in _log_events(log_path) if e.get("event") == "job_finished" and "job_id" in e}


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    waiter = threading.Event()
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return True
        waiter.wait(0.05)
    return predicate()


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """The exit code within ``timeout``, else ``None`` (the process is killed)."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        return None


def _submit(client: Client, prompt: str) -> str:
    return str(client.submit_job({"model": MODEL, "prompt": prompt}, ttl_seconds=120)["job_id"])


def _stored_codes(coordinator: RunningCoordinator, job_ids: list[str]) -> dict[str, str | None]:
    """The error_code the coordinator stored from each job's /fail."""
    store = Store(coordinator.db_path)
    try:
        return {job_id: getattr(store.get_job(job_id), "error_code", None) for job_id in job_ids}
    finally:
        store.close()


def _job_of(poisoned: dict[str, str], poison: str) -> str:
    return next(job_id for job_id, name in poisoned.items() if name == poison)


def test_every_poisoned_result_fails_its_job_and_the_next_job_completes(
    poison_site: Path, tmp_path: Path, coordinator: RunningCoordinator, coordinator_client: Client
) -> None:
    """Each poison ends FAILED with RESULT_INVALID/RESULT_TOO_LARGE, an "ok" job after them completes with a
    verifying receipt, and the miner exits 0 at --max-jobs without a traceback."""
    poisoned = {_submit(coordinator_client, poison): poison for poison in POISONS}
    ok_job = _submit(coordinator_client, "ok")
    proc, log_path = _start_miner(poison_site, tmp_path, coordinator, "--max-jobs", str(len(POISONS) + 1))
    exit_code = _stop(proc, RUN_TIMEOUT_S)
    logs = log_path.read_text(encoding="utf-8", errors="replace")
    jobs = {job_id: coordinator_client.get_job(job_id) for job_id in [*poisoned, ok_job]}
    stuck = {poisoned.get(j, "ok"): job["state"] for j, job in jobs.items() if job["state"] not in FINAL_STATES}
    assert not stuck, f"jobs never finished: {stuck}\n{logs[-3000:]}"

    finished = _finished(log_path)
    stored = _stored_codes(coordinator, list(poisoned))
    for job_id, poison in poisoned.items():
        expected = POISONS[poison]
        assert jobs[job_id]["state"] == "FAILED", (poison, jobs[job_id])
        assert stored[job_id] == expected, (poison, stored[job_id])
        assert finished[job_id]["code"] == expected, (poison, finished[job_id])
        assert jobs[job_id]["error"] == finished[job_id]["message"]  # the message the miner sent, as stored
    assert "bytes; the coordinator accepts at most 1048576" in finished[_job_of(poisoned, "huge-output")]["message"]

    assert jobs[ok_job]["state"] == "COMPLETED", jobs[ok_job]
    answer = coordinator_client.get_job_result(ok_job)
    receipt = answer["receipt"]
    verify_receipt(receipt, load_key(tmp_path / "state" / KEY_FILE_NAME).verify_key)
    assert receipt["job_id"] == ok_job and receipt["output_sha256"] == sha256_hex("fine")
    assert answer["result"]["output"] == "fine"

    assert exit_code == 0, logs[-3000:]
    assert "Traceback" not in logs, logs[-3000:]


def test_sigterm_after_a_poisoned_result_exits_0_with_jobs_still_queued(
    poison_site: Path, tmp_path: Path, coordinator: RunningCoordinator, coordinator_client: Client
) -> None:
    """SIGTERM once a poisoned job has failed, with jobs still queued, drains and exits 0 without a traceback;
    the poisoned job is FAILED and every queued job is left for another miner (QUEUED) or finished."""
    first = _submit(coordinator_client, "str-raises")
    queued = [_submit(coordinator_client, poison) for poison in ("set-in-extra", "ok", "none", "ok")]
    proc, log_path = _start_miner(poison_site, tmp_path, coordinator, delay_s=0.3)
    try:
        saw_finish = _wait(lambda: first in _finished(log_path), RUN_TIMEOUT_S / 2)
        proc.send_signal(signal.SIGTERM)
        exit_code = _stop(proc, RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    logs = log_path.read_text(encoding="utf-8", errors="replace")
    assert saw_finish, f"the poisoned job never finished\n{logs[-3000:]}"
    assert exit_code == 0, logs[-3000:]
    assert "Traceback" not in logs, logs[-3000:]
    assert coordinator_client.get_job(first)["state"] == "FAILED"
    assert _stored_codes(coordinator, [first])[first] == "RESULT_INVALID"
    states = [coordinator_client.get_job(job_id)["state"] for job_id in queued]
    assert "RUNNING" not in states, states
    assert states[-1] == "QUEUED", states  # the last one was never claimed: stopping stops claiming
