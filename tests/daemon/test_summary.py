"""The owner's view as the miner works: summary lines, the idle warning, the outage line, ``status``.

A real local coordinator on loopback and the fake runner; short intervals so the lines
come within the test. The figures are checked against what the coordinator holds.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
from structlog.testing import capture_logs

from coordinator.client import Client
from miner.cli.status import summarise
from miner.daemon.agent import Agent
from miner.daemon.summary import Activity, Reachability
from tests.daemon.helpers import miner_settings
from tests.servers import RunningCoordinator, free_port

PRICE = 2.5


def _submit(client: Client, prompts: list[str]) -> list[str]:
    return [
        client.submit_job({"model": "llama2", "prompt": p, "parameters": {"max_tokens": 6}}, ttl_seconds=120)["job_id"]
        for p in prompts
    ]


def _events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


def test_summary_and_idle_lines_match_the_jobs_run(
    tmp_path: Path, coordinator: RunningCoordinator, coordinator_client: Client
) -> None:
    """Three completed jobs and one failed: the summary lines add up to them; then one idle warning."""
    models = [{"name": "llama2", "runner": "fake", "delay_s": 0.2, "fail_mode": "error", "fail_marker": "BAD"}]
    settings = miner_settings(
        tmp_path / "state",
        coordinator.url,
        coordinator={"api_key": coordinator.miner_key},
        models=models,
        price=PRICE,
        region="eu-west",
        log={"summary_interval_s": 0.3, "idle_warning_s": 2.5},  # > long_poll_s: answered polls
        metrics={"enabled": True, "listen": f"127.0.0.1:{free_port()}"},
    )
    agent = Agent(settings, handle_signals=False)
    ids = _submit(coordinator_client, ["one", "two", "three", "BAD four"])

    async def scenario() -> str:
        task = asyncio.create_task(agent.serve())
        async with asyncio.timeout(60):
            while agent.jobs_ended < 4:
                await asyncio.sleep(0.02)
            while not _events(logs, "miner_idle"):
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.7)  # a summary window after the last job
            assert agent.metrics_server is not None
            async with httpx.AsyncClient() as http:
                base = f"http://{settings.metrics.listen}"
                metrics, health = await http.get(base + "/metrics"), await http.get(base + "/healthz")
        agent.request_exit("test over")
        assert await task == 0
        return "\n".join(summarise(metrics.text, health.status_code, health.text))

    with capture_logs() as logs:
        status = asyncio.run(scenario())

    answers = [coordinator_client.get_job_result(j) for j in ids[:3]]
    tokens = sum(a["result"]["metadata"]["completion_tokens"] for a in answers)
    gpu_seconds = sum(a["receipt"]["units"] for a in answers)

    summaries = _events(logs, "miner_summary")
    assert len(summaries) >= 2
    assert sum(s["jobs_completed"] for s in summaries) == 3
    assert sum(s["jobs_failed"] for s in summaries) == 1
    assert sum(s["tokens"] for s in summaries) == tokens > 0
    assert abs(sum(s["gpu_seconds"] for s in summaries) - gpu_seconds) < 0.01
    assert abs(sum(s["earnings"] for s in summaries) - gpu_seconds * PRICE) < 0.01
    assert summaries[-1]["jobs_completed"] == 0 and summaries[-1]["idle_s"] > 0  # a window with no job
    busy = [s for s in summaries if s["jobs_completed"]]
    assert all(s["jobs_per_hour"] > 0 and s["earnings_per_hour"] > 0 for s in busy)

    (idle,) = _events(logs, "miner_idle")  # once per idle spell
    assert idle["idle_s"] >= 2.5 and idle["log_level"] == "warning"
    assert idle["polls"].get("empty", 0) > 0
    joined = " ".join(idle["causes"])
    assert "no job for this miner" in joined and "2.5 per GPU-second" in joined and "llama2" in joined
    assert "eu-west" in joined

    assert f"since start: {tokens} tokens" in status
    assert f"at {PRICE:g} per GPU-second" in status and "idle for" in status


def test_idle_causes_name_rate_limits_and_errors() -> None:
    """What the coordinator answered while idle decides the causes given, most telling first."""
    now = [0.0]
    answers: dict[str, int] = {}
    activity = Activity(
        price=0.01, region=None, models=lambda: ["llama2"], answers=lambda: answers, idle_warning_s=10,
        clock=lambda: now[0],
    )
    now[0] = 5.0
    assert activity.idle_warning() is None  # not idle long enough
    answers.update(rate_limited=4, error=2)
    now[0] = 12.0
    warning = activity.idle_warning()
    assert warning is not None
    causes = warning["causes"]
    assert "rate-limited 4 poll(s)" in causes[0] and "max_polls_per_minute" in causes[0]
    assert "2 poll(s) failed" in causes[1]
    assert activity.idle_warning() is None  # once per spell
    activity.job_started()
    activity.job_ended("completed", 3, 0.5)
    now[0] = 30.0
    assert activity.idle_warning() is not None  # a new spell warns again


def test_outage_ends_with_its_length() -> None:
    now = [100.0]
    reach = Reachability(clock=lambda: now[0])
    assert reach.observe(None) is None
    assert reach.observe("connect") is None
    now[0] = 130.0
    assert reach.observe("5xx") is None
    assert reach.observe("429") == (30.0, 2)  # an answer, even a refusal: reachable again
    assert reach.observe(None) is None


def test_coordinator_reachable_again_is_logged(tmp_path: Path) -> None:
    """The coordinator is down at start; once it answers, one line says after how long."""
    down = {"on": True}

    def handler(request: httpx.Request) -> httpx.Response:
        if down["on"]:
            raise httpx.ConnectError("refused")
        if request.url.path.endswith("/register"):
            return httpx.Response(200, json={"status": "ok"})
        return httpx.Response(204) if request.url.path.endswith("/poll") else httpx.Response(200, json={})

    settings = miner_settings(tmp_path / "state", coordinator={"heartbeat_interval_s": 0.2})
    agent = Agent(settings, transport=httpx.MockTransport(handler), handle_signals=False)

    async def scenario() -> None:
        task = asyncio.create_task(agent.serve())
        await asyncio.sleep(0.8)
        down["on"] = False
        async with asyncio.timeout(20):
            while not _events(logs, "coordinator_reachable_again"):
                await asyncio.sleep(0.05)
        agent.request_exit("test over")
        await task

    with capture_logs() as logs:
        asyncio.run(scenario())
    (line,) = _events(logs, "coordinator_reachable_again")
    assert line["after_s"] >= 0.5 and line["failed_requests"] >= 1
