"""Coordinator faults through the proxy: the miner keeps working, backs off, and every result
is delivered exactly once; nothing crashes."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest

from coordinator.client import Client
from miner.daemon.keyfile import KEY_FILE_NAME, load_or_create_key
from miner.wire.receipts import key_id, verify_receipt
from tests.reliability.faultproxy import FaultProxy
from tests.reliability.faults import PASS, Fault, Plan, Request
from tests.reliability.harness import TERMINAL, MinerProcess, outbox_files, read_jobs, wait_until, write_config
from tests.reliability.plans import AFTER, BEFORE, FORGET, ScheduledPlan, injected, retry_after_violations
from tests.servers import RunningCoordinator


def _submit(client: Client, n: int, tag: str) -> list[str]:
    return [client.submit_job({"model": "llama2", "prompt": f"{tag} {i}"}, ttl_seconds=900)["job_id"] for i in range(n)]


def _all_terminal(client: Client, ids: list[str]) -> bool:
    return all(client.get_job(j)["state"] in TERMINAL for j in ids)


def _crash_signs(miner: MinerProcess) -> list[str]:
    """Log lines that mean a bug was caught (or not caught) inside the daemon."""
    signs = [str(e["event"]) for e in miner.events if str(e.get("event", "")).startswith("unexpected error")]
    signs += [line for line in miner.other_lines if "Traceback" in line]
    return signs


def _check_books(tmp_path: Path, coordinator: RunningCoordinator, client: Client, proxy: FaultProxy,
                 ids: list[str]) -> None:
    """Every job COMPLETED with exactly one stored receipt that verifies; at most one outcome accepted."""
    jobs = read_jobs(coordinator.db_path)
    assert Counter(jobs[j]["state"] for j in ids) == {"COMPLETED": len(ids)}
    signer = key_id(load_or_create_key(tmp_path / "state" / KEY_FILE_NAME).verify_key)
    results = [r for r in proxy.snapshot() if r.endpoint == "result"]
    for job_id in ids:
        assert jobs[job_id]["receipts"] == 1
        verify_receipt(client.get_receipts(job_id, signer="miner")[0], signer)
        sent = {r.receipt_id for r in results if r.job_id == job_id and r.receipt_id}
        assert len(sent) == 1, f"{job_id}: {len(sent)} different results sent"
    assert not outbox_files(tmp_path / "state")
    assert not list((tmp_path / "state" / "outbox" / "rejected").glob("*"))


def test_every_fault_kind_is_ridden_out_and_every_result_delivered_once(
    tmp_path: Path, rel_coordinator: RunningCoordinator, proxy: FaultProxy
) -> None:
    """Every other request faulted (drops, resets, delays, 5xx, 429s, garbage, wrong types, lost answers, 404 heartbeats) plus a 2 s outage: all jobs COMPLETED once, Retry-After honoured, clean exit."""
    plan = ScheduledPlan(every=2)
    proxy.set_plan(plan)
    config = write_config(tmp_path / "miner.toml", url=proxy.url, miner_key=rel_coordinator.miner_key,
                          state_dir=tmp_path / "state", concurrency=2)
    miner = MinerProcess(config).start()
    try:
        with Client(rel_coordinator.url, rel_coordinator.client_key) as client:
            ids = _submit(client, 30, "faulty")
            assert wait_until(lambda: sum(client.get_job(j)["state"] == "COMPLETED" for j in ids) >= 10, 120)
            rel_coordinator.stop()  # an outage: the proxy answers 502 / refuses meanwhile
            threading.Event().wait(2.0)
            rel_coordinator.start()
            ids += _submit(client, 10, "after the outage")
            assert wait_until(lambda: _all_terminal(client, ids), 180, interval=0.2), miner.log_text()
            plan.enabled = False
            assert miner.proc is not None and miner.proc.poll() is None, "the miner died"
            assert wait_until(lambda: not outbox_files(tmp_path / "state"), 60)
            assert miner.terminate(30) == 0, miner.log_text()
            _check_books(tmp_path, rel_coordinator, client, proxy, ids)
    finally:
        miner.stop()
    records = proxy.snapshot()
    kinds = injected(records)
    print(f"\ncoordinator faults: {sum(kinds.values())} injected in {len(records)} requests over {len(ids)} jobs: "
          f"{dict(sorted(kinds.items()))}; by endpoint: {dict(Counter(r.endpoint for r in records if r.fault != 'pass'))}")
    expected = {f.label() for f in (*BEFORE, *AFTER, FORGET)}
    assert expected <= set(kinds), f"not injected: {expected - set(kinds)}"
    assert retry_after_violations(records) == []
    assert _crash_signs(miner) == []
    assert "miner_unknown_to_coordinator" in miner.names()


def test_a_poll_answer_lost_after_assignment_does_not_strand_the_job(
    tmp_path: Path, rel_coordinator: RunningCoordinator, proxy: FaultProxy
) -> None:
    """The coordinator assigns a job but the answer never reaches the miner: the job is still completed within its TTL."""
    proxy.set_plan(lambda r: Fault("drop_answer") if r.endpoint == "poll" and r.number <= 1 else PASS)
    config = write_config(tmp_path / "miner.toml", url=proxy.url, miner_key=rel_coordinator.miner_key,
                          state_dir=tmp_path / "state")
    with Client(rel_coordinator.url, rel_coordinator.client_key) as client:
        job_id = client.submit_job({"model": "llama2", "prompt": "lost on the wire"}, ttl_seconds=15)["job_id"]
        miner = MinerProcess(config).start()
        try:
            assert proxy.wait_for(lambda rs: any(r.endpoint == "poll" and r.upstream_status == 200 for r in rs), 30)
            final = client.wait(job_id, 30)
        finally:
            miner.terminate(30)
    assert final["state"] == "COMPLETED", final


def _forget_until_registered(armed: threading.Event) -> Plan:
    """Plan: once ``armed``, answer every miner call but register with 404 "miner not registered"."""

    def plan(request: Request) -> Fault:
        if not armed.is_set():
            return PASS
        if request.endpoint == "register":
            armed.clear()
            return PASS
        return FORGET

    return plan


def test_a_coordinator_that_forgets_the_miner_loses_no_result(
    tmp_path: Path, rel_coordinator: RunningCoordinator, proxy: FaultProxy
) -> None:
    """The coordinator answers 404 "miner not registered" while a job runs: the miner registers again and the result is accepted."""
    armed = threading.Event()
    proxy.set_plan(_forget_until_registered(armed))
    config = write_config(tmp_path / "miner.toml", url=proxy.url, miner_key=rel_coordinator.miner_key,
                          state_dir=tmp_path / "state", model={"delay_s": 1.5})
    miner = MinerProcess(config).start()
    try:
        with Client(rel_coordinator.url, rel_coordinator.client_key) as client:
            job_id = client.submit_job({"model": "llama2", "prompt": "remember me"}, ttl_seconds=60)["job_id"]
            assert miner.wait_event(lambda e: e.get("event") == "job_claimed", 30) is not None
            armed.set()
            final = client.wait(job_id, 40)
            assert final["state"] == "COMPLETED", (final, miner.log_text())
            assert len(client.get_receipts(job_id, signer="miner")) == 1
            assert read_jobs(rel_coordinator.db_path)[job_id]["attempts"] == 1  # held, not requeued and rerun
            assert wait_until(lambda: not outbox_files(tmp_path / "state"), 30)
        assert miner.terminate(30) == 0
    finally:
        miner.stop()
    assert "miner_unknown_to_coordinator" in miner.names()
    assert not list((tmp_path / "state" / "outbox" / "rejected").glob("*"))


def test_a_coordinator_that_forgets_the_miner_while_it_delivers_loses_no_result(
    tmp_path: Path, rel_coordinator: RunningCoordinator, proxy: FaultProxy
) -> None:
    """The first /result is answered 404 "miner not registered" (and every call after it until the miner registers again): the outcome is kept and delivered."""
    armed = threading.Event()
    forget = _forget_until_registered(armed)

    def plan(request: Request) -> Fault:
        if request.endpoint == "result" and request.number == 1:
            armed.set()
        return forget(request)

    proxy.set_plan(plan)
    config = write_config(tmp_path / "miner.toml", url=proxy.url, miner_key=rel_coordinator.miner_key,
                          state_dir=tmp_path / "state")
    miner = MinerProcess(config).start()
    try:
        with Client(rel_coordinator.url, rel_coordinator.client_key) as client:
            job_id = client.submit_job({"model": "llama2", "prompt": "remember my result"}, ttl_seconds=60)["job_id"]
            rejected = tmp_path / "state" / "outbox" / "rejected"
            wait_until(lambda: client.get_job(job_id)["state"] == "COMPLETED" or any(rejected.glob("*")), 30)
            assert not list(rejected.glob("*")), "the result was thrown away"
            final = client.get_job(job_id)
            assert final["state"] == "COMPLETED", (final, miner.log_text())
            assert len(client.get_receipts(job_id, signer="miner")) == 1
        assert miner.terminate(30) == 0
    finally:
        miner.stop()
    assert not list((tmp_path / "state" / "outbox" / "rejected").glob("*"))


@pytest.mark.slow
def test_429_without_retry_after_waits_the_reference_minute_and_still_delivers(
    tmp_path: Path, rel_coordinator: RunningCoordinator, proxy: FaultProxy
) -> None:
    """A 429 with no Retry-After on /result holds that endpoint back for the default 60 s; the result is then delivered once."""
    proxy.set_plan(lambda r: Fault("rate") if r.endpoint == "result" and r.number <= 1 else PASS)
    config = write_config(tmp_path / "miner.toml", url=proxy.url, miner_key=rel_coordinator.miner_key,
                          state_dir=tmp_path / "state")
    miner = MinerProcess(config).start()
    try:
        with Client(rel_coordinator.url, rel_coordinator.client_key) as client:
            job_id = client.submit_job({"model": "llama2", "prompt": "patience"}, ttl_seconds=300)["job_id"]
            final = client.wait(job_id, 120)
            assert final["state"] == "COMPLETED"
        assert miner.terminate(30) == 0
    finally:
        miner.stop()
    results = [r for r in proxy.snapshot() if r.endpoint == "result"]
    assert [r.sent_status for r in results] == [429, 200]
    assert results[1].at - results[0].at >= 59.0
