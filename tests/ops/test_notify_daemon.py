"""The real daemon, as a subprocess under a fake systemd notify socket, against the local coordinator."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from coordinator.client import Client
from tests.minerconfig import write_miner_config
from tests.servers import RunningCoordinator

ROOT = Path(__file__).resolve().parents[2]


class NotifyReceiver:
    """A unix datagram socket standing in for systemd's $NOTIFY_SOCKET; keeps every line in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.lines: list[str] = []

    def wait_for(self, line: str, timeout: float = 60.0) -> None:
        self.sock.settimeout(timeout)
        while line not in self.lines:
            self.lines.extend(self.sock.recv(4096).decode().split("\n"))

    def drain(self) -> None:
        self.sock.setblocking(False)
        try:
            while True:
                self.lines.extend(self.sock.recv(4096).decode().split("\n"))
        except BlockingIOError:
            pass

    def close(self) -> None:
        self.sock.close()


def write_config(tmp_path: Path, coordinator: RunningCoordinator) -> Path:
    return write_miner_config(
        tmp_path / "miner.toml", coordinator, tmp_path / "state", miner_id="rig-notify", drain_grace_s=10,
        models=[{"name": "llama2", "runner": "fake", "delay_s": 0.05}],
    )


def test_daemon_sends_ready_watchdog_stopping_in_order(
    tmp_path: Path, coordinator: RunningCoordinator, coordinator_client: Client
) -> None:
    """`aitbc-miner run` says READY=1 once its models are loaded, pings WATCHDOG=1, runs a job, and says STOPPING=1 on SIGTERM, then exits 0."""
    receiver = NotifyReceiver(tmp_path / "notify.sock")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AITBC_MINER_") and k != "CREDENTIALS_DIRECTORY"}
    env.update(NOTIFY_SOCKET=str(receiver.path), WATCHDOG_USEC="1000000")
    proc = subprocess.Popen(
        [sys.executable, "-m", "miner", "run", "--config", str(write_config(tmp_path, coordinator))],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        receiver.wait_for("READY=1")
        receiver.wait_for("WATCHDOG=1")
        job_id = coordinator_client.submit_job({"model": "llama2", "prompt": "hello"}, ttl_seconds=60)["job_id"]
        assert coordinator_client.wait(job_id, timeout=60)["state"] == "COMPLETED"
        proc.send_signal(signal.SIGTERM)
        receiver.wait_for("STOPPING=1")
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        receiver.drain()
        receiver.close()
    assert proc.returncode == 0, output
    lines = [line for line in receiver.lines if line]
    ready, stopping = lines.index("READY=1"), lines.index("STOPPING=1")
    watchdogs = [i for i, line in enumerate(lines) if line == "WATCHDOG=1"]
    assert ready < watchdogs[0] < stopping, lines
    assert lines.count("READY=1") == 1 and lines.count("STOPPING=1") == 1
    assert any(line.startswith("STATUS=") and "1 completed" in line for line in lines[ready:stopping]), lines
    assert '"event": "miner_stopped"' in output
