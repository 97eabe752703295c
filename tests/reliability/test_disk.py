"""Disk trouble: the state folder fills up or turns read-only under a running miner.

How the fault is made (tests run as root here, and ``chmod`` does not stop root):

* **full**: the state folder is a 2 MiB tmpfs mounted for the test and filled with a file
  until ``ENOSPC``; recovery deletes the file. Without the privilege to mount, the miner's
  file size limit is lowered to 0 with ``prlimit`` (``RLIMIT_FSIZE``: every write fails
  with ``EFBIG``; Python ignores ``SIGXFSZ``) and raised again to recover.
* **read-only**: the tmpfs is remounted ``ro`` (``EROFS``) and back ``rw``. Without mount,
  a non-root run makes the outbox folder mode 0500; as root without mount it is skipped.

Both hit the daemon's real write path (``atomic_write``: open, write, fsync, rename).
"""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from coordinator.client import Client
from tests.reliability.faultproxy import FaultProxy
from tests.reliability.harness import MinerProcess, wait_until, write_config
from tests.servers import RunningCoordinator, free_port

TMPFS_SIZE = "2m"


def _run(*cmd: str) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture
def state_fs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """The state folder: a small tmpfs for the ``tmpfs`` variants (skipped where mounting is
    not permitted), a plain folder otherwise."""
    state = tmp_path / "state"
    state.mkdir()
    mounted = False
    if getattr(request, "param", "plain") == "tmpfs":
        mounted = _run("mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(state))
        if not mounted:
            pytest.skip("mounting a tmpfs is not permitted here; the rlimit/chmod variants cover this machine")
    try:
        yield state
    finally:
        if mounted and not _run("umount", str(state)):
            _run("umount", "-l", str(state))


def _fill(folder: Path) -> Path:
    """Write a file in ``folder`` until the filesystem is full (unbuffered: nothing left to flush)."""
    filler = folder / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 16, 1 << 12, 1 << 9, 1):  # the last blocks too
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return filler


def _healthz(port: int) -> tuple[int, str]:
    answer = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    return answer.status_code, answer.text


def _scenario(tmp_path: Path, coordinator: RunningCoordinator, proxy: FaultProxy, state: Path,
              break_disk: Callable[[MinerProcess], None], heal_disk: Callable[[MinerProcess], None], why: str) -> None:
    port = free_port()
    config = write_config(tmp_path / "miner.toml", url=proxy.url, miner_key=coordinator.miner_key, state_dir=state,
                          metrics_listen=f"127.0.0.1:{port}", model={"delay_s": 1.0})
    miner = MinerProcess(config).start()
    try:
        with Client(coordinator.url, coordinator.client_key) as client:
            first = client.submit_job({"model": "llama2", "prompt": "before"}, ttl_seconds=120)["job_id"]
            assert client.wait(first, 30)["state"] == "COMPLETED"
            assert wait_until(lambda: _healthz(port)[0] == 200, 10)

            # The disk breaks while a job runs: its signed result cannot be written to the outbox.
            during = client.submit_job({"model": "llama2", "prompt": "while the disk is bad"}, ttl_seconds=120)["job_id"]
            assert miner.wait_event(lambda e: e.get("event") == "job_claimed" and e.get("job_id") == during, 30)
            break_disk(miner)
            stopped = miner.wait_event(lambda e: e.get("event") == "state_folder_not_writable", 30)
            assert stopped is not None, miner.log_text()
            assert why in stopped["reason"], stopped
            assert client.wait(during, 30)["state"] == "COMPLETED"  # kept in memory, delivered anyway
            status, reason = _healthz(port)
            assert status == 503 and "state folder unusable" in reason and why in reason, reason
            print(f"\ndisk trouble ({why}): log {stopped['event']!r} reason {stopped['reason']!r}; /healthz {status} {reason!r}")

            waiting = client.submit_job({"model": "llama2", "prompt": "after the disk broke"}, ttl_seconds=120)["job_id"]
            polls = proxy.counts.get("poll", 0)
            threading.Event().wait(1.5)
            assert client.get_job(waiting)["state"] == "QUEUED"
            assert proxy.counts.get("poll", 0) == polls, "the miner kept claiming while its disk was bad"

            heal_disk(miner)
            assert miner.wait_event(lambda e: e.get("event") == "state_folder_writable_again", 30), \
                miner.log_text()
            assert client.wait(waiting, 30)["state"] == "COMPLETED"
            assert wait_until(lambda: _healthz(port)[0] == 200, 10)
            for job_id in (first, during, waiting):
                assert len(client.get_receipts(job_id, signer="miner")) == 1
        assert miner.terminate(30) == 0, miner.log_text()
    finally:
        miner.stop()
    assert not list((state / "outbox").glob("*.json"))


class DiskFault:
    """How to break and heal the state folder of a running miner (see the module docstring)."""

    def __init__(self, how: str, state: Path) -> None:
        self.how, self.state = how, state
        self.saved: tuple[int, int] = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)

    def why(self) -> str:
        return {"tmpfs-full": "No space left on device", "rlimit": "File too large",
                "tmpfs-ro": "Read-only file system", "chmod": "Permission denied"}[self.how]

    def brk(self, miner: MinerProcess) -> None:
        if self.how == "tmpfs-full":
            _fill(self.state)
        elif self.how == "rlimit":
            self.saved = resource.prlimit(miner.pid, resource.RLIMIT_FSIZE)
            resource.prlimit(miner.pid, resource.RLIMIT_FSIZE, (0, self.saved[1]))
        elif self.how == "tmpfs-ro":
            assert _run("mount", "-o", "remount,ro", str(self.state))
        else:
            (self.state / "outbox").chmod(0o500)

    def heal(self, miner: MinerProcess) -> None:
        if self.how == "tmpfs-full":
            for path in self.state.glob("filler*.bin"):
                path.unlink()
        elif self.how == "rlimit":
            resource.prlimit(miner.pid, resource.RLIMIT_FSIZE, self.saved)
        elif self.how == "tmpfs-ro":
            assert _run("mount", "-o", "remount,rw", str(self.state))
        else:
            (self.state / "outbox").chmod(0o700)


@pytest.mark.parametrize("state_fs,how", [("tmpfs", "tmpfs-full"), ("plain", "rlimit")], indirect=["state_fs"])
def test_full_state_folder_stops_claiming_says_why_and_resumes(
    tmp_path: Path, rel_coordinator: RunningCoordinator, proxy: FaultProxy, state_fs: Path, how: str
) -> None:
    """With the state folder full, the result in hand is still delivered, claiming stops, logs and /healthz say why, and work resumes once space is freed."""
    fault = DiskFault(how, state_fs)
    _scenario(tmp_path, rel_coordinator, proxy, state_fs, fault.brk, fault.heal, fault.why())


@pytest.mark.parametrize("state_fs,how", [("tmpfs", "tmpfs-ro"), ("plain", "chmod")], indirect=["state_fs"])
def test_read_only_state_folder_stops_claiming_says_why_and_resumes(
    tmp_path: Path, rel_coordinator: RunningCoordinator, proxy: FaultProxy, state_fs: Path, how: str
) -> None:
    """With the state folder read-only, the result in hand is still delivered, claiming stops, logs and /healthz say why, and work resumes once it is writable."""
    if how == "chmod" and os.geteuid() == 0:
        pytest.skip("root ignores file modes; the tmpfs variant covers read-only here")
    fault = DiskFault(how, state_fs)
    _scenario(tmp_path, rel_coordinator, proxy, state_fs, fault.brk, fault.heal, fault.why())


@pytest.mark.parametrize("state_fs", ["tmpfs"], indirect=True)
def test_a_state_folder_filled_while_idle_stops_claiming_before_any_job(
    tmp_path: Path, rel_coordinator: RunningCoordinator, proxy: FaultProxy, state_fs: Path
) -> None:
    """A miner whose state folder fills up while idle notices it by itself and claims nothing until it has space again."""
    config = write_config(tmp_path / "miner.toml", url=proxy.url, miner_key=rel_coordinator.miner_key,
                          state_dir=state_fs)
    miner = MinerProcess(config).start()
    try:
        assert miner.wait_event(lambda e: e.get("event") == "registered", 30)
        _fill(state_fs)
        assert miner.wait_event(lambda e: e.get("event") == "state_folder_not_writable", 30)
        with Client(rel_coordinator.url, rel_coordinator.client_key) as client:
            job_id = client.submit_job({"model": "llama2", "prompt": "no room"}, ttl_seconds=60)["job_id"]
            polls = proxy.counts.get("poll", 0)
            threading.Event().wait(1.5)
            assert client.get_job(job_id)["state"] == "QUEUED"
            assert proxy.counts.get("poll", 0) == polls
            for path in state_fs.glob("filler*.bin"):
                path.unlink()
            assert client.wait(job_id, 30)["state"] == "COMPLETED"
        assert miner.terminate(30) == 0
    finally:
        miner.stop()
