"""The daemon's operational surface: systemd notifications, watchdog, health and metrics."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import httpx

from miner.ops.notify import Notifier
from tests.daemon.helpers import ScriptedCoordinator, fake_miner, job


def test_systemd_ready_watchdog_status_and_stopping(tmp_path: Path) -> None:
    """Under systemd the daemon sends READY=1, WATCHDOG=1 pings, STATUS= lines and STOPPING=1."""
    path = str(tmp_path / "notify.sock")
    messages: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.setblocking(False)
        notifier = Notifier(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
        coord = ScriptedCoordinator([job("j1")])
        agent = fake_miner(tmp_path, coord, notifier=notifier, exit_when_idle=0.4)

        async def read_forever() -> None:
            loop = asyncio.get_running_loop()
            while True:  # keep the queue short: Linux holds only a few datagrams
                messages.append((await loop.sock_recv(sock, 4096)).decode())

        async def scenario() -> int:
            reader = asyncio.create_task(read_forever())
            try:
                return await agent.serve()
            finally:
                await asyncio.sleep(0.05)
                reader.cancel()

        assert asyncio.run(scenario()) == 0
    flat = [line for m in messages for line in m.split("\n")]
    assert "READY=1" in flat and "WATCHDOG=1" in flat and "STOPPING=1" in flat
    assert flat.index("READY=1") < flat.index("STOPPING=1")
    assert any(line.startswith("STATUS=") and "1 completed" in line for line in flat)


def test_health_and_metrics_endpoints_reflect_the_daemon(tmp_path: Path) -> None:
    """While serving, /healthz is ok and /metrics counts the finished job; draining reports unhealthy."""
    coord = ScriptedCoordinator([job("j1")])
    agent = fake_miner(tmp_path, coord, settings={"metrics": {"enabled": True, "listen": "127.0.0.1:0"}})

    async def scenario() -> tuple[int, str, str]:
        task = asyncio.create_task(agent.serve())
        await coord.wait_for(lambda: "j1" in coord.results and agent.health.last_heartbeat is not None)
        await coord.wait_for(lambda: len(coord.endpoint_calls("heartbeat")) >= 2)
        assert agent.metrics_server is not None
        async with httpx.AsyncClient(base_url=agent.metrics_server.url) as http:
            health = await http.get("/healthz")
            metrics = await http.get("/metrics")
        agent.request_exit("test over")
        await task
        return health.status_code, health.text, metrics.text

    status, health, metrics = asyncio.run(scenario())
    assert status == 200, health
    assert 'outcome="completed"' in metrics and "aitbc_miner_" in metrics
    assert agent.health.draining
