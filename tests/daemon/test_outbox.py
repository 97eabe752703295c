"""The durable outbox: atomic entries, order, acknowledgement, rejection, disk trouble, and its loop-owned index."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import threading
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from miner.daemon.client import CoordinatorClient
from miner.daemon.delivery import Deliverer
from miner.outbox.store import Outbox, OutboxEntry, file_name
from miner.wire.errors import CoordinatorUnavailable, StateError

T = TypeVar("T")


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


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


async def _open(tmp_path: Path, **kwargs: Any) -> Outbox:
    box = Outbox(tmp_path, **kwargs)
    await box.open()
    return box


async def _reopen(tmp_path: Path) -> Outbox:
    """A fresh Outbox on the same folder, as the next start of the daemon sees it."""
    return await _open(tmp_path)


class SwitchFsync:
    """An fsync that fails with ``errno`` while ``failing`` is set (a disk that fills up, then empties)."""

    def __init__(self, err: int = errno.ENOSPC) -> None:
        self.err = err
        self.failing = False
        self.calls = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.failing:
            raise OSError(self.err, os.strerror(self.err))
        os.fsync(fd)


class GatedFsync:
    """An fsync that waits for ``gate`` (set by the test): the writer thread is busy until then."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __call__(self, fd: int) -> None:
        self.entered.set()
        if not self.gate.wait(10):
            raise AssertionError("the test never opened the fsync gate")
        os.fsync(fd)


def _files(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "outbox").iterdir() if p.is_file())


def test_put_writes_a_private_file_and_survives_a_restart_in_order(tmp_path: Path) -> None:
    """Entries are files (mode 0600) that a fresh Outbox lists back in creation order."""

    async def scenario() -> Outbox:
        box = await _open(tmp_path)
        for job_id in ["c", "a", "b"]:
            await box.put(_entry(job_id))
        await box.aclose()
        return await _reopen(tmp_path)

    again = run(scenario())
    path = tmp_path / "outbox" / "a.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert json.loads(path.read_text())["body"]["result"]["output"] == "out a"
    assert [e.job_id for e in again.pending()] == ["c", "a", "b"]
    assert again.state("a") == "pending" and again.state("zzz") is None
    assert again.get("b") is not None and len(again) == 3


def test_ack_removes_the_entry_and_remembers_the_job_across_restarts(tmp_path: Path) -> None:
    """An acknowledged job leaves the outbox but is still known as acked after a restart."""

    async def scenario() -> tuple[Outbox, Outbox]:
        box = await _open(tmp_path)
        await box.put(_entry("j1"))
        await box.ack("j1")
        return box, await _reopen(tmp_path)

    box, again = run(scenario())
    assert box.pending() == [] and not (tmp_path / "outbox" / "j1.json").exists()
    assert box.state("j1") == "acked" and again.state("j1") == "acked"


def test_entry_acked_just_before_a_crash_is_not_replayed(tmp_path: Path) -> None:
    """If the ack was recorded but the file not yet deleted, the next start drops the file."""

    async def scenario() -> Outbox:
        box = await _open(tmp_path)
        await box.put(_entry("j1"))
        (tmp_path / "outbox" / "acked.log").write_text("j1\n")
        return await _reopen(tmp_path)

    again = run(scenario())
    assert again.pending() == [] and again.state("j1") == "acked"
    assert not (tmp_path / "outbox" / "j1.json").exists()


def test_reject_moves_the_entry_aside_with_its_reason(tmp_path: Path) -> None:
    """A rejected outcome is kept under outbox/rejected with the reason, and never retried."""

    async def scenario() -> tuple[Outbox, Outbox]:
        box = await _open(tmp_path)
        await box.put(_entry("j1", "fail"))
        await box.reject("j1", "HTTP 409: already completed")
        return box, await _reopen(tmp_path)

    box, again = run(scenario())
    kept = json.loads((tmp_path / "outbox" / "rejected" / "j1.json").read_text())
    assert kept["rejected_reason"] == "HTTP 409: already completed" and kept["kind"] == "fail"
    assert not (tmp_path / "outbox" / "j1.json").exists()
    assert box.state("j1") == "rejected"
    assert again.pending() == [] and again.state("j1") == "rejected"


def test_revive_puts_a_rejected_outcome_back_in_the_outbox(tmp_path: Path) -> None:
    """revive() moves a rejected outcome back to pending on disk; an unknown job revives to None."""

    async def scenario() -> tuple[Outbox, OutboxEntry | None, OutboxEntry | None, Outbox]:
        box = await _open(tmp_path)
        await box.put(_entry("j1"))
        await box.reject("j1", "HTTP 409: not yours")
        revived = await box.revive("j1")
        missing = await box.revive("never-seen")
        return box, revived, missing, await _reopen(tmp_path)

    box, revived, missing, again = run(scenario())
    assert revived is not None and revived.body["result"]["output"] == "out j1" and missing is None
    assert box.state("j1") == "pending" and box.get("j1") is revived
    assert not (tmp_path / "outbox" / "rejected" / "j1.json").exists()
    assert (tmp_path / "outbox" / "j1.json").exists()
    assert again.state("j1") == "pending"


def test_corrupt_entries_and_stale_temp_files_are_set_aside(tmp_path: Path) -> None:
    """A truncated or ill-typed entry is moved to rejected/*.corrupt and temporary files are removed at open."""
    (tmp_path / "outbox").mkdir(parents=True)
    (tmp_path / "outbox" / "bad.json").write_text('{"version": 1, "job_')
    odd = {"version": 1, "job_id": "odd", "kind": "result", "body": {}, "created_at": [1]}
    (tmp_path / "outbox" / "odd.json").write_text(json.dumps(odd))
    (tmp_path / "outbox" / ".x.json.1.2.tmp").write_text("partial")
    box = run(_open(tmp_path))
    assert box.pending() == []
    assert (tmp_path / "outbox" / "rejected" / "bad.json.corrupt").exists()
    assert (tmp_path / "outbox" / "rejected" / "odd.json.corrupt").exists()
    assert not list((tmp_path / "outbox").glob(".*.tmp"))


def test_odd_job_ids_get_safe_distinct_file_names() -> None:
    """Job ids with slashes or dots never escape the folder and never collide."""
    names = {file_name(j) for j in ["../etc/passwd", "a/b", "a_b", "a b"]}
    assert len(names) == 4
    assert all("/" not in n and not n.startswith("..") for n in names)


def test_acked_record_is_bounded(tmp_path: Path) -> None:
    """The acked log is compacted so it stays near its limit, and still remembers the latest jobs."""

    async def scenario() -> Outbox:
        box = await _open(tmp_path, acked_limit=5)
        for i in range(30):
            await box.put(_entry(f"j{i}"))
            await box.ack(f"j{i}")
        return await _reopen(tmp_path)

    again = run(scenario())
    lines = (tmp_path / "outbox" / "acked.log").read_text().split()
    assert len(lines) <= 10 and "j29" in lines
    assert again.state("j29") == "acked"


def test_unwritable_state_folder_keeps_outcomes_in_memory_until_it_recovers(tmp_path: Path) -> None:
    """A failed write raises StateError, keeps the entry pending in memory, and recover() saves it later."""
    outbox_dir = tmp_path / "outbox"

    async def scenario() -> None:
        box = await _open(tmp_path)
        shutil.rmtree(outbox_dir)
        outbox_dir.write_text("not a folder")  # every write below it now fails, even as root
        with pytest.raises(StateError):
            await box.put(_entry("j1"))
        assert not box.healthy and "cannot write" in box.reason
        assert [e.job_id for e in box.pending()] == ["j1"]
        assert await box.recover() is False
        outbox_dir.unlink()
        assert await box.recover() is True and box.healthy and box.reason == ""
        await box.aclose()

    run(scenario())
    assert json.loads((outbox_dir / "j1.json").read_text())["job_id"] == "j1"


def test_a_failed_write_changes_the_index_only_by_the_unsaved_entry(tmp_path: Path) -> None:
    """When fsync fails, only the new entry is added (kept in memory); nothing else in the index or on disk moves."""
    fsync = SwitchFsync()

    async def scenario() -> None:
        box = await _open(tmp_path, fsync=fsync)
        await box.put(_entry("a"))
        await box.put(_entry("gone"))
        await box.ack("gone")
        await box.put(_entry("no"))
        await box.reject("no", "HTTP 409")
        before = (_files(tmp_path), [e.job_id for e in box.pending()])
        fsync.failing = True
        with pytest.raises(StateError, match="No space left on device"):
            await box.put(_entry("b"))
        assert _files(tmp_path) == before[0]  # no new file, no stray temporary file
        assert [e.job_id for e in box.pending()] == ["a", "b"] and before[1] == ["a"]
        assert [box.state(j) for j in ("a", "b", "gone", "no")] == ["pending", "pending", "acked", "rejected"]
        assert not box.healthy and await box.recover() is False
        fsync.failing = False
        assert await box.recover() is True
        assert (await _reopen(tmp_path)).state("b") == "pending"
        await box.aclose()

    run(scenario())


def test_a_failed_acked_log_write_still_settles_the_job_and_marks_the_outbox_unhealthy(tmp_path: Path) -> None:
    """If acked.log cannot be written, the job still leaves pending, is remembered in memory, and claiming stops."""
    fsync = SwitchFsync(errno.EROFS)

    async def scenario() -> Outbox:
        box = await _open(tmp_path, fsync=fsync)
        await box.put(_entry("j1"))
        fsync.failing = True
        await box.ack("j1")
        return box

    box = run(scenario())
    assert len(box) == 0 and box.state("j1") == "acked"
    assert not box.healthy and "acked.log" in box.reason and "Read-only file system" in box.reason


@pytest.mark.parametrize(
    "body",
    [
        {"result": {"tags": {"a", "b"}}, "metrics": {}},
        {"result": {"output": "x"}, "metrics": {"tokens_per_s": float("nan")}},
        {"result": {"output": b"raw bytes"}, "metrics": {}},
    ],
    ids=["set", "nan", "bytes"],
)
def test_an_unencodable_entry_raises_and_leaves_no_trace(tmp_path: Path, body: dict[str, Any]) -> None:
    """An entry JSON cannot hold raises ValueError/TypeError, leaves nothing pending or on disk; a later put works."""

    async def scenario() -> None:
        box = await _open(tmp_path)
        with pytest.raises((ValueError, TypeError)):
            await box.put(OutboxEntry("bad", "result", body))
        assert len(box) == 0 and box.pending() == [] and box.state("bad") is None and box.healthy
        assert _files(tmp_path) == []
        assert await box.recover() is True and _files(tmp_path) == []  # no phantom written later either
        await box.put(_entry("good"))
        assert [e.job_id for e in box.pending()] == ["good"] and _files(tmp_path) == ["good.json"]
        assert [e.job_id for e in (await _reopen(tmp_path)).pending()] == ["good"]

    run(scenario())


def test_reads_answer_while_the_writer_is_busy_and_an_entry_is_pending_only_once_written(tmp_path: Path) -> None:
    """len/pending/get/state answer at once while a write is held in fsync; the entry appears only after the write."""
    fsync = GatedFsync()

    async def scenario() -> None:
        box = await _open(tmp_path, fsync=fsync)
        put = asyncio.ensure_future(box.put(_entry("j1")))
        await asyncio.to_thread(fsync.entered.wait, 10)
        assert len(box) == 0 and box.pending() == [] and box.get("j1") is None and box.state("j1") is None
        assert box.healthy and not put.done()
        fsync.gate.set()
        await put
        assert box.state("j1") == "pending" and len(box) == 1
        await box.aclose()

    run(scenario())


def test_a_change_whose_caller_is_cancelled_still_completes(tmp_path: Path) -> None:
    """Cancelling a put mid-write does not stop it: the entry ends up written and pending, so memory matches disk."""
    fsync = GatedFsync()

    async def scenario() -> Outbox:
        box = await _open(tmp_path, fsync=fsync)
        put = asyncio.ensure_future(box.put(_entry("j1")))
        await asyncio.to_thread(fsync.entered.wait, 10)
        put.cancel()
        with pytest.raises(asyncio.CancelledError):
            await put
        fsync.gate.set()
        await box.aclose()  # waits for the changes already asked for
        return box

    box = run(scenario())
    assert box.state("j1") == "pending" and (tmp_path / "outbox" / "j1.json").exists()


def test_aclose_is_idempotent_and_later_changes_are_refused(tmp_path: Path) -> None:
    """aclose() can be called twice; a change after it raises a clear RuntimeError, and reads still work."""

    async def scenario() -> None:
        box = await _open(tmp_path)
        await box.put(_entry("j1"))
        await box.aclose()
        await box.aclose()
        with pytest.raises(RuntimeError, match="outbox is closed"):
            await box.put(_entry("j2"))
        assert [e.job_id for e in box.pending()] == ["j1"] and box.state("j2") is None

    run(scenario())


def test_open_on_an_unusable_folder_is_a_state_error(tmp_path: Path) -> None:
    """open() raises StateError naming the folder when it cannot be created."""
    (tmp_path / "state").write_text("a file where the state folder should be")
    with pytest.raises(StateError, match="outbox"):
        run(Outbox(tmp_path / "state").open())


async def _deliverer(tmp_path: Path, handler: Any) -> tuple[Outbox, Deliverer, CoordinatorClient]:
    box = await _open(tmp_path)
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
        box, deliverer, client = await _deliverer(tmp_path, handler)
        for job_id in answers:
            assert await deliverer.store(_entry(job_id)) is True
        assert await deliverer.flush() == 0
        await client.aclose()
        await box.aclose()
        assert deliverer.delivered == 2 and deliverer.rejected == 2

    run(scenario())
    assert sorted(p.name for p in (tmp_path / "outbox" / "rejected").iterdir()) == ["gone.json", "taken.json"]


def test_store_lets_an_encoding_error_reach_its_caller(tmp_path: Path) -> None:
    """Deliverer.store raises TypeError for an unencodable outcome (the job fails) and the outbox stays empty."""
    depths: list[int] = []

    async def scenario() -> None:
        box, _, client = await _deliverer(tmp_path, lambda r: httpx.Response(200, json={"status": "ok"}))
        deliverer = Deliverer(box, client, on_depth=depths.append)
        with pytest.raises(TypeError):
            await deliverer.store(OutboxEntry("j1", "result", {"result": {"s": {1}}, "metrics": {}}))
        assert len(box) == 0 and box.healthy
        await client.aclose()

    run(scenario())
    assert depths == [0] and _files(tmp_path) == []


def test_store_reports_disk_trouble_and_keeps_the_outcome_deliverable(tmp_path: Path) -> None:
    """On a failed write store() returns False and reports the disk unhealthy; the outcome is still delivered."""
    fsync = SwitchFsync()
    changes: list[tuple[bool, str]] = []

    async def scenario() -> Outbox:
        box = await _open(tmp_path, fsync=fsync)
        client = CoordinatorClient(
            "http://c.test",
            api_key="key-123456",
            miner_id="m",
            transport=httpx.MockTransport(lambda r: httpx.Response(200, json={"status": "ok"})),
        )
        deliverer = Deliverer(box, client, on_disk_change=lambda ok, why: changes.append((ok, why)))
        fsync.failing = True
        assert await deliverer.store(_entry("j1")) is False
        assert await deliverer.deliver_now(box.pending()[0]) is True
        await client.aclose()
        return box

    box = run(scenario())
    assert len(box) == 0 and box.state("j1") == "acked"
    assert changes and changes[0][0] is False and "No space left on device" in changes[0][1]


def test_delivery_keeps_the_outcome_while_the_coordinator_is_down(tmp_path: Path) -> None:
    """A 503 leaves the outcome pending and raises for the flusher to back off."""

    async def scenario() -> list[str]:
        box, deliverer, client = await _deliverer(tmp_path, lambda r: httpx.Response(503))
        await box.put(_entry("j1", "fail"))
        with pytest.raises(CoordinatorUnavailable):
            await deliverer.flush()
        await client.aclose()
        return [e.job_id for e in box.pending()]

    assert run(scenario()) == ["j1"]
    assert (tmp_path / "outbox" / "j1.json").exists()


def test_flush_until_empty_gives_up_at_its_deadline(tmp_path: Path) -> None:
    """Bounded flushing returns False with the outcome still on disk when the deadline passes."""

    async def scenario() -> bool:
        box, deliverer, client = await _deliverer(tmp_path, lambda r: httpx.Response(500))
        await box.put(_entry("j1"))
        try:
            return await deliverer.flush_until_empty(deadline=time.monotonic() + 0.3)
        finally:
            await client.aclose()

    assert run(scenario()) is False
    assert os.path.exists(tmp_path / "outbox" / "j1.json")


def test_shutdown_failure_is_not_remembered_so_the_job_can_come_back(tmp_path: Path) -> None:
    """Delivering a SHUTDOWN failure does not mark the job done: the miner may run it if reassigned."""

    async def scenario() -> tuple[Outbox, Outbox]:
        box, deliverer, client = await _deliverer(
            tmp_path, lambda r: httpx.Response(200, json={"status": "ok", "state": "QUEUED"})
        )
        await box.put(_entry("j1", "fail"))  # error_code SHUTDOWN
        await box.put(OutboxEntry("j2", "fail", {"error_code": "OUT_OF_MEMORY", "error_message": "oom", "metrics": {}}))
        await deliverer.flush()
        await client.aclose()
        return box, await _reopen(tmp_path)

    box, again = run(scenario())
    assert box.state("j1") is None and box.state("j2") == "acked"
    assert again.state("j1") is None


class FlakyRecoverOutbox(Outbox):
    """An Outbox whose first recover() hits a bug (raises RuntimeError); later ones probe for real."""

    def __init__(self, state_dir: Path, **kwargs: Any) -> None:
        super().__init__(state_dir, **kwargs)
        self.recovers = 0

    async def recover(self) -> bool:
        self.recovers += 1
        if self.recovers == 1:
            raise RuntimeError("a bug in the probe")
        return await super().recover()


def test_the_flusher_survives_an_unexpected_error_while_probing_the_disk(tmp_path: Path) -> None:
    """A probe that raises is logged and retried by run(); the disk is reported healthy again once it recovers."""
    fsync = SwitchFsync()
    recovered = asyncio.Event()

    async def scenario() -> int:
        box = FlakyRecoverOutbox(tmp_path, fsync=fsync)
        await box.open()
        client = CoordinatorClient(
            "http://c.test",
            api_key="key-123456",
            miner_id="m",
            transport=httpx.MockTransport(lambda r: httpx.Response(200, json={"status": "ok"})),
        )
        deliverer = Deliverer(
            box, client, disk_probe_s=0.01, on_disk_change=lambda ok, why: recovered.set() if ok else None
        )
        fsync.failing = True
        assert await deliverer.store(_entry("j1")) is False
        fsync.failing = False
        flusher = asyncio.create_task(deliverer.run())
        async with asyncio.timeout(10):
            await recovered.wait()
            while len(box):  # the flush that follows the probe delivers the kept outcome
                await asyncio.sleep(0.01)
        assert not flusher.done()
        flusher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flusher
        await client.aclose()
        await box.aclose()
        assert box.healthy and box.state("j1") == "acked"
        return box.recovers

    assert run(scenario()) >= 2
    assert (tmp_path / "outbox" / "acked.log").read_text().split() == ["j1"]
