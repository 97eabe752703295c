"""Start-up a service manager can trust, one miner per state folder, and a shutdown that keeps answered polls."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from coordinator.client import Client
from miner.daemon.agent import Agent
from miner.daemon.settings import load_settings
from miner.ops.notify import Notifier
from miner.wire.errors import ErrorCode
from tests.daemon.helpers import ScriptedCoordinator, fake_miner, job
from tests.minerconfig import FAST_COORDINATOR, write_miner_config
from tests.servers import RunningCoordinator, free_port

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("AITBC_MINER_") and k != "NOTIFY_SOCKET"}


def _run_miner(config: Path, *extra: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "miner", "run", "--config", str(config), *extra],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout,
    )


def _events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_taken_metrics_port_exits_2_before_any_model_load(tmp_path: Path, coordinator: RunningCoordinator) -> None:
    """A metrics port already in use stops start-up with exit 2 and one line naming metrics.listen, before the (slow) model load."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_miner_config(
            tmp_path / "miner.toml", coordinator, tmp_path / "state",
            models=[{"name": "llama2", "runner": "fake", "load_delay_s": 600}],
        )
        text = config.read_text().replace("[metrics]\nenabled = false", f'[metrics]\nlisten = "127.0.0.1:{port}"')
        config.write_text(text)
        done = _run_miner(config, timeout=120)  # a model load of 600 s would blow this bound
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "metrics.listen" in err[0] and str(port) in err[0], done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert not [e for e in _events(done.stdout) if e["event"] == "model_loading"]


def test_second_miner_on_the_same_state_folder_is_refused(
    tmp_path: Path, coordinator: RunningCoordinator, coordinator_client: Client
) -> None:
    """A second miner on a state folder in use exits 1 at once naming the folder and the holder's pid; the first goes on serving."""
    config = write_miner_config(
        tmp_path / "miner.toml", coordinator, tmp_path / "state", models=[{"name": "llama2", "runner": "fake"}]
    )
    log_path = tmp_path / "first.log"
    with log_path.open("wb") as log_file:
        first = subprocess.Popen(
            [sys.executable, "-m", "miner", "run", "--config", str(config), "--max-jobs", "1"],
            cwd=ROOT, env=_env(), stdout=log_file, stderr=subprocess.STDOUT,
        )
    try:
        pause = threading.Event()
        for _ in range(3000):
            if b'"registered"' in log_path.read_bytes() or first.poll() is not None:
                break
            pause.wait(0.02)
        assert first.poll() is None, log_path.read_text()
        second = _run_miner(config, timeout=60)
        assert second.returncode == 1
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and str(tmp_path / "state") in err[0] and f"pid {first.pid}" in err[0], second.stderr
        job_id = coordinator_client.submit_job({"model": "llama2", "prompt": "still here"}, ttl_seconds=60)["job_id"]
        assert coordinator_client.wait(job_id, timeout=60)["state"] == "COMPLETED"
        assert first.wait(timeout=60) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


class _Datagrams:
    """A unix datagram socket standing in for systemd's $NOTIFY_SOCKET, read from the event loop."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.lines: list[str] = []

    async def wait_for(self, predicate: Any, timeout: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while not predicate(self.lines):
                data = await loop.sock_recv(self.sock, 4096)
                self.lines.extend(data.decode().split("\n"))


def test_ready_comes_before_registration_and_the_miner_registers_when_the_coordinator_appears(tmp_path: Path) -> None:
    """With the coordinator down, READY=1 follows the model load, /healthz and STATUS say why it is not registered, and the miner registers once the coordinator starts."""
    receiver = _Datagrams(tmp_path / "notify.sock")
    port = free_port()
    coordinator = RunningCoordinator(
        db_path=tmp_path / "coordinator.db", port=port, client_key="client-key", miner_key="miner-key",
        lease_seconds=60.0, app_options={"rate_limits": None},
    )
    settings = load_settings(
        None,
        miner_id="rig-late",
        state_dir=tmp_path / "state",
        coordinator={"url": coordinator.url, "api_key": "miner-key", **FAST_COORDINATOR, "timeout_s": 2},
        gpus={"enabled": False},
        metrics={"enabled": True, "listen": "127.0.0.1:0"},
        models=[{"name": "llama2", "runner": "fake"}],
    )
    agent = Agent(settings, notifier=Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}), handle_signals=False,
                  max_jobs=1)

    async def scenario() -> None:
        served = asyncio.create_task(agent.serve())
        await receiver.wait_for(lambda lines: "READY=1" in lines)
        await receiver.wait_for(lambda lines: any("not registered yet" in line for line in lines))
        assert agent.metrics_server is not None
        async with httpx.AsyncClient() as http:
            health = await http.get(agent.metrics_server.url + "/healthz")
        assert health.status_code == 503 and "not registered" in health.text
        assert "registration failed" in health.text  # the reason, not just the state
        await asyncio.to_thread(coordinator.start)
        try:
            with Client(coordinator.url, coordinator.client_key) as client:
                job_id = (await asyncio.to_thread(client.submit_job, {"model": "llama2", "prompt": "late"}, None, 60))[
                    "job_id"
                ]
                done = await asyncio.to_thread(client.wait, job_id, 60)
            assert done["state"] == "COMPLETED"
            assert await asyncio.wait_for(served, 60) == 0
        finally:
            await asyncio.to_thread(coordinator.stop)

    try:
        asyncio.run(scenario())
    finally:
        receiver.sock.close()
    assert receiver.lines.index("READY=1") < next(
        i for i, line in enumerate(receiver.lines) if line.startswith("STATUS=") and "not registered yet" in line
    )


def _held_poll(release: asyncio.Event, started: asyncio.Event, answer: dict[str, Any]) -> Any:
    async def handler(request: httpx.Request) -> httpx.Response:
        started.set()
        await release.wait()
        return httpx.Response(200, json=answer)

    return handler


def test_a_poll_answered_during_shutdown_is_handed_back(tmp_path: Path) -> None:
    """A job assigned by a poll that was in flight when shutdown began is not lost: it is failed SHUTDOWN at once."""
    coord = ScriptedCoordinator()
    release, started = asyncio.Event(), asyncio.Event()
    coord.script("poll", _held_poll(release, started, job("late-1")))
    agent = fake_miner(tmp_path, coord)

    async def scenario() -> int:
        served = asyncio.create_task(agent.serve())
        await asyncio.wait_for(started.wait(), 20)
        agent.request_exit("test")
        await asyncio.sleep(0.1)
        release.set()
        return await asyncio.wait_for(served, 30)

    assert asyncio.run(scenario()) == 0
    assert [f["error_code"] for f in coord.fails["late-1"]] == [ErrorCode.SHUTDOWN]
    assert "late-1" not in coord.results
    assert agent.outcomes == {"failed": 1}


def test_a_poll_answered_after_the_state_folder_went_bad_is_handed_back(tmp_path: Path) -> None:
    """When the state folder fails while a poll is in flight, the job that poll brings is handed back SHUTDOWN, not run."""
    broken = False

    def fsync(fd: int) -> None:
        if broken:
            raise OSError(5, "Input/output error")
        os.fsync(fd)

    coord = ScriptedCoordinator([job("first")])
    release, started = asyncio.Event(), asyncio.Event()
    # The first poll gets "first" (default answer); the second is held until released.
    coord.script("poll", lambda request: None, _held_poll(release, started, job("second")))
    slow = [{"name": "llama2", "runner": "fake", "delay_s": 0.5}]
    agent = fake_miner(tmp_path, coord, fsync=fsync, settings={"concurrency": 2, "models": slow})

    async def scenario() -> None:
        nonlocal broken
        served = asyncio.create_task(agent.serve())
        await asyncio.wait_for(started.wait(), 20)
        broken = True  # "first" finishes on the other slot and cannot be stored: the folder is now unhealthy
        await coord.wait_for(lambda: "first" in coord.results)
        assert not agent.outbox.healthy
        release.set()
        await coord.wait_for(lambda: "second" in coord.fails)
        agent.request_exit("test")
        await asyncio.wait_for(served, 30)

    asyncio.run(scenario())
    assert coord.fails["second"][0]["error_code"] == ErrorCode.SHUTDOWN
    assert "second" not in coord.results


@pytest.mark.parametrize("url", ["http://coordinator.example.net:8011"])
def test_remote_plain_http_is_a_one_line_config_error(tmp_path: Path, url: str) -> None:
    """`run` against a remote http:// coordinator stops with exit 2 and one line, unless allow_insecure_http is set."""
    config = tmp_path / "miner.toml"
    config.write_text(
        f'miner_id = "rig"\nstate_dir = "{tmp_path / "state"}"\n[coordinator]\nurl = "{url}"\napi_key = "k-123456"\n'
        '[gpus]\nenabled = false\n[metrics]\nenabled = false\n[[models]]\nname = "llama2"\nrunner = "fake"\n'
    )
    done = _run_miner(config)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "coordinator.url" in done.stderr
