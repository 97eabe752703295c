"""The durable outbox: atomic entries, order, acknowledgement, rejection, and disk trouble."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from miner.daemon.client import CoordinatorClient
from miner.outbox.delivery import Deliverer
from miner.wire.errors import CoordinatorUnavailable, StateError
from miner.outbox.store import Outbox, OutboxEntry, file_name


def _entry(job_id: str, kind: str = "result") -> OutboxEntry:
    body = (
        {"result": {"output": f"out {job_id}"}, "metrics": {}}
        if kind == "result"
        else {
            "error_code": "SHUTDOWN",
            "error_message": "bye",
            "metrics": {},
        }
    )
    return OutboxEntry(job_id, kind, body)  # type: ignore[arg-type]


def _open(tmp_path: Path) -> Outbox:
    box = Outbox(tmp_path)
    box.open()
    return box


def test_put_writes_a_private_file_and_survives_a_restart_in_order(tmp_path: Path) -> None:
    """Entries are files (mode 0600) that a fresh Outbox lists back in creation order."""
    box = _open(tmp_path)
    for job_id in ["c", "a", "b"]:
        box.put(_entry(job_id))
    path = tmp_path / "outbox" / "a.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert json.loads(path.read_text())["body"]["result"]["output"] == "out a"
    again = _open(tmp_path)
    assert [e.job_id for e in again.pending()] == ["c", "a", "b"]
    assert again.seen("a") and not again.seen("zzz")


def test_ack_removes_the_entry_and_remembers_the_job_across_restarts(tmp_path: Path) -> None:
    """An acknowledged job leaves the outbox but is still seen after a restart."""
    box = _open(tmp_path)
    box.put(_entry("j1"))
    box.ack("j1")
    assert box.pending() == [] and not (tmp_path / "outbox" / "j1.json").exists()
    assert _open(tmp_path).seen("j1")


def test_entry_acked_just_before_a_crash_is_not_replayed(tmp_path: Path) -> None:
    """If the ack was recorded but the file not yet deleted, the next start drops the file."""
    box = _open(tmp_path)
    box.put(_entry("j1"))
    (tmp_path / "outbox" / "acked.log").write_text("j1\n")
    again = _open(tmp_path)
    assert again.pending() == [] and again.seen("j1")
    assert not (tmp_path / "outbox" / "j1.json").exists()


def test_reject_moves_the_entry_aside_with_its_reason(tmp_path: Path) -> None:
    """A rejected outcome is kept under outbox/rejected with the reason, and never retried."""
    box = _open(tmp_path)
    box.put(_entry("j1", "fail"))
    box.reject("j1", "HTTP 409: already completed")
    kept = json.loads((tmp_path / "outbox" / "rejected" / "j1.json").read_text())
    assert kept["rejected_reason"] == "HTTP 409: already completed" and kept["kind"] == "fail"
    again = _open(tmp_path)
    assert again.pending() == [] and again.seen("j1")


def test_corrupt_entries_and_stale_temp_files_are_set_aside(tmp_path: Path) -> None:
    """A truncated entry is moved to rejected/*.corrupt and temporary files are removed at open."""
    (tmp_path / "outbox").mkdir(parents=True)
    (tmp_path / "outbox" / "bad.json").write_text('{"version": 1, "job_')
    (tmp_path / "outbox" / ".x.json.1.2.tmp").write_text("partial")
    box = _open(tmp_path)
    assert box.pending() == []
    assert (tmp_path / "outbox" / "rejected" / "bad.json.corrupt").exists()
    assert not list((tmp_path / "outbox").glob(".*.tmp"))


def test_odd_job_ids_get_safe_distinct_file_names() -> None:
    """Job ids with slashes or dots never escape the folder and never collide."""
    names = {file_name(j) for j in ["../etc/passwd", "a/b", "a_b", "a b"]}
    assert len(names) == 4
    assert all("/" not in n and not n.startswith("..") for n in names)


def test_acked_record_is_bounded(tmp_path: Path) -> None:
    """The acked log is compacted so it stays near its limit."""
    box = Outbox(tmp_path, acked_limit=5)
    box.open()
    for i in range(30):
        box.put(_entry(f"j{i}"))
        box.ack(f"j{i}")
    lines = (tmp_path / "outbox" / "acked.log").read_text().split()
    assert len(lines) <= 10 and "j29" in lines
    assert _open(tmp_path).seen("j29")


def test_unwritable_state_folder_keeps_outcomes_in_memory_until_it_recovers(tmp_path: Path) -> None:
    """A failed write raises StateError, keeps the entry pending in memory, and recover() saves it later."""
    box = _open(tmp_path)
    outbox_dir = tmp_path / "outbox"
    shutil.rmtree(outbox_dir)
    outbox_dir.write_text("not a folder")  # every write below it now fails, even as root
    with pytest.raises(StateError):
        box.put(_entry("j1"))
    assert not box.healthy and "cannot write" in box.reason
    assert [e.job_id for e in box.pending()] == ["j1"]
    assert box.recover() is False
    outbox_dir.unlink()
    assert box.recover() is True and box.healthy
    assert json.loads((outbox_dir / "j1.json").read_text())["job_id"] == "j1"


def test_open_on_an_unusable_folder_is_a_state_error(tmp_path: Path) -> None:
    """open() raises StateError naming the folder when it cannot be created."""
    (tmp_path / "state").write_text("a file where the state folder should be")
    with pytest.raises(StateError, match="outbox"):
        Outbox(tmp_path / "state").open()


def _deliverer(tmp_path: Path, handler: object) -> tuple[Outbox, Deliverer, CoordinatorClient]:
    box = _open(tmp_path)
    client = CoordinatorClient(
        "http://c.test", api_key="key-123456", miner_id="m", transport=httpx.MockTransport(handler)
    )
    return box, Deliverer(box, client), client


def test_delivery_acks_on_200_and_rejects_on_409_and_404(tmp_path: Path) -> None:
    """2xx acknowledges; 409 and 404 answers move the outcome to rejected/ instead."""
    answers = {
        "ok": httpx.Response(200, json={"status": "ok"}),
        "dup": httpx.Response(200, json={"status": "duplicate"}),
        "gone": httpx.Response(404, json={"detail": "job not found"}),
        "taken": httpx.Response(409, json={"detail": "job is not assigned to this miner"}),
    }

    def handler(request: httpx.Request) -> httpx.Response:
        return answers[request.url.path.split("/")[3]]

    async def scenario() -> None:
        box, deliverer, client = _deliverer(tmp_path, handler)
        for job_id in answers:
            box.put(_entry(job_id))
        assert await deliverer.flush() == 0
        await client.aclose()
        assert deliverer.delivered == 2 and deliverer.rejected == 2

    asyncio.run(scenario())
    assert sorted(p.name for p in (tmp_path / "outbox" / "rejected").iterdir()) == ["gone.json", "taken.json"]


def test_delivery_keeps_the_outcome_while_the_coordinator_is_down(tmp_path: Path) -> None:
    """A 503 leaves the outcome pending and raises for the flusher to back off."""

    async def scenario() -> list[str]:
        box, deliverer, client = _deliverer(tmp_path, lambda r: httpx.Response(503))
        box.put(_entry("j1", "fail"))
        with pytest.raises(CoordinatorUnavailable):
            await deliverer.flush()
        await client.aclose()
        return [e.job_id for e in box.pending()]

    assert asyncio.run(scenario()) == ["j1"]
    assert (tmp_path / "outbox" / "j1.json").exists()


def test_flush_until_empty_gives_up_at_its_deadline(tmp_path: Path) -> None:
    """Bounded flushing returns False with the outcome still on disk when the deadline passes."""
    import time

    async def scenario() -> bool:
        box, deliverer, client = _deliverer(tmp_path, lambda r: httpx.Response(500))
        box.put(_entry("j1"))
        try:
            return await deliverer.flush_until_empty(deadline=time.monotonic() + 0.3)
        finally:
            await client.aclose()

    assert asyncio.run(scenario()) is False
    assert os.path.exists(tmp_path / "outbox" / "j1.json")


def test_shutdown_failure_is_not_remembered_so_the_job_can_come_back(tmp_path: Path) -> None:
    """Delivering a SHUTDOWN failure does not mark the job done: the miner may run it if reassigned."""

    async def scenario() -> Outbox:
        box, deliverer, client = _deliverer(
            tmp_path, lambda r: httpx.Response(200, json={"status": "ok", "state": "QUEUED"})
        )
        box.put(_entry("j1", "fail"))  # error_code SHUTDOWN
        box.put(OutboxEntry("j2", "fail", {"error_code": "OUT_OF_MEMORY", "error_message": "oom", "metrics": {}}))
        await deliverer.flush()
        await client.aclose()
        return box

    box = asyncio.run(scenario())
    assert not box.seen("j1") and box.seen("j2")
    assert not _open(tmp_path).seen("j1")
