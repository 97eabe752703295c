"""Helpers for daemon tests: settings for a test miner, and a scripted coordinator double.

:class:`ScriptedCoordinator` is an ``httpx.MockTransport`` handler that speaks the miner
API well enough to drive the daemon through hostile answers (the real local coordinator
is used by the end-to-end tests). Each endpoint can be given a queue of canned answers
(an ``httpx.Response``, an exception to raise, or a callable) that are served before the
default behaviour resumes.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from miner.daemon.agent import Agent
from miner.daemon.settings import MinerSettings, load_settings

TEST_API_KEY = "test-miner-key-0123456789"
JSON_TYPE = {"content-type": "application/json"}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def miner_settings(state_dir: Path, url: str = "http://127.0.0.1:9", **overrides: Any) -> MinerSettings:
    """Settings for a fast test miner: CPU mode, no metrics server, quick pacing."""
    base: dict[str, Any] = {
        "miner_id": "rig-test",
        "state_dir": state_dir,
        "coordinator": {
            "url": url,
            "api_key": TEST_API_KEY,
            "poll_interval_s": 0.02,
            "idle_backoff_max_s": 0.1,
            "heartbeat_interval_s": 0.5,
            "long_poll_s": 1,
            "max_polls_per_minute": 6000,
            "timeout_s": 5,
        },
        "gpus": {"enabled": False},
        "metrics": {"enabled": False},
        "models": [{"name": "llama2", "runner": "fake", "delay_s": 0.02}],
        "drain_grace_s": 5,
        "benchmark": {"enabled": False},  # tests that measure turn it on
    }
    return load_settings(None, **_merge(base, overrides))


def job(
    job_id: str, prompt: str = "hello", model: str = "llama2", constraints: Any = None, **extra: Any
) -> dict[str, Any]:
    return {"job_id": job_id, "payload": {"model": model, "prompt": prompt}, "constraints": constraints or {}, **extra}


Canned = httpx.Response | Exception | Callable[[httpx.Request], Any]


class ScriptedCoordinator:
    """A miner-API double for ``httpx.MockTransport`` (see the module docstring).

    ``calls`` records ``(endpoint, job_id_or_None, body)`` in order; ``results`` and
    ``fails`` hold accepted submissions by job id; ``cancelled`` job ids are reported in
    every heartbeat answer; ``forgotten`` makes it answer like a coordinator that lost its
    miner table, until the miner registers again.
    """

    def __init__(self, jobs: list[dict[str, Any]] | None = None) -> None:
        self.jobs: deque[dict[str, Any]] = deque(jobs or [])
        self.canned: dict[str, deque[Canned]] = {
            e: deque() for e in ("register", "heartbeat", "poll", "result", "fail")
        }
        self.calls: list[tuple[str, str | None, dict[str, Any]]] = []
        self.results: dict[str, list[dict[str, Any]]] = {}
        self.fails: dict[str, list[dict[str, Any]]] = {}
        self.cancelled: set[str] = set()
        self.registrations = 0
        self.forgotten = False  # while set, every call but register is 404 "miner not registered"
        self.changed = asyncio.Event()

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def script(self, endpoint: str, *answers: Canned) -> None:
        self.canned[endpoint].extend(answers)

    def endpoint_calls(self, endpoint: str) -> list[tuple[str, str | None, dict[str, Any]]]:
        return [c for c in self.calls if c[0] == endpoint]

    async def handle(self, request: httpx.Request) -> httpx.Response:
        parts = request.url.path.strip("/").split("/")  # v1 miners <endpoint> | v1 miners <job> <endpoint>
        endpoint = parts[-1]
        job_id = parts[2] if len(parts) == 4 else None
        try:
            body = json.loads(request.content or b"{}")
        except ValueError:
            body = {}
        self.calls.append((endpoint, job_id, body))
        self.changed.set()
        if self.forgotten and endpoint != "register":
            return httpx.Response(404, json={"detail": "miner not registered"})
        if self.canned[endpoint]:
            answer = self.canned[endpoint].popleft()
            if isinstance(answer, Exception):
                raise answer
            if callable(answer):
                answer = answer(request)
                if asyncio.iscoroutine(answer):
                    answer = await answer
            if answer is not None:
                return answer
        return self.default(endpoint, job_id, body)

    def default(self, endpoint: str, job_id: str | None, body: dict[str, Any]) -> httpx.Response:
        if endpoint == "register":
            self.registrations += 1
            self.forgotten = False
            return httpx.Response(200, json={"status": "ok", "session_token": "abc"})
        if endpoint == "heartbeat":
            return httpx.Response(200, json={"status": "ok", "cancelled_jobs": sorted(self.cancelled)})
        if endpoint == "poll":
            if self.jobs:
                # ASCII-escaped JSON, as a server would send it (lone surrogates travel as \udXXX).
                return httpx.Response(200, content=json.dumps(self.jobs.popleft()).encode(), headers=JSON_TYPE)
            return httpx.Response(204)
        assert job_id is not None
        store = self.results if endpoint == "result" else self.fails
        store.setdefault(job_id, []).append(body)
        return httpx.Response(200, json={"status": "ok"})

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


async def serve_in_background(agent: Agent) -> asyncio.Task[int]:
    task = asyncio.create_task(agent.serve())
    await asyncio.sleep(0)
    return task


def fake_miner(tmp_path: Path, coordinator: ScriptedCoordinator, **kwargs: Any) -> Agent:
    settings_overrides = kwargs.pop("settings", {})
    settings = miner_settings(tmp_path / "state", **settings_overrides)
    return Agent(settings, transport=coordinator.transport(), handle_signals=False, **kwargs)
