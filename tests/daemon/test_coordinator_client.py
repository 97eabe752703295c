"""CoordinatorClient: headers, answers, and every failure translated into the error tree."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from miner.daemon.client import CoordinatorClient, parse_assigned_job, parse_retry_after
from miner.daemon.pacing import Backoff, TokenBucket, retry
from miner.wire.errors import (
    AuthenticationFailed,
    ConfigError,
    CoordinatorRejected,
    CoordinatorUnavailable,
    NotRegistered,
    RateLimited,
)

Handler = Callable[[httpx.Request], httpx.Response]


def _client(handler: Handler, **kwargs: Any) -> CoordinatorClient:
    return CoordinatorClient(
        "http://coordinator.test",
        api_key="miner-key-123",
        miner_id="rig-01",
        transport=httpx.MockTransport(handler),
        **kwargs,
    )


def _call(handler: Handler, call: Callable[[CoordinatorClient], Any], **kwargs: Any) -> Any:
    async def scenario() -> Any:
        client = _client(handler, **kwargs)
        try:
            return await call(client)
        finally:
            await client.aclose()

    return asyncio.run(scenario())


def test_requests_carry_the_miner_headers_and_bodies() -> None:
    """Every call sends X-Api-Key and X-Miner-ID and the documented body shape."""
    seen: list[tuple[str, dict[str, Any], httpx.Headers]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.raw_path.decode(), json.loads(request.content), request.headers))
        if request.url.path.endswith("/poll"):
            return httpx.Response(204)
        return httpx.Response(200, json={"status": "ok"})

    async def calls(c: CoordinatorClient) -> None:
        await c.register({"models": ["llama2"]}, 2, "eu")
        await c.heartbeat(1, "ONLINE", {"gpus": []})
        assert await c.poll(15) is None
        await c.submit_result("job 1/x", {"result": {"output": "hi"}, "metrics": {"duration_ms": 3}})
        await c.fail("j2", "OUT_OF_MEMORY", "", {"duration_ms": 1})

    _call(handler, calls)
    paths = [p for p, _, _ in seen]
    assert paths == [
        "/v1/miners/register",
        "/v1/miners/heartbeat",
        "/v1/miners/poll",
        "/v1/miners/job%201%2Fx/result",
        "/v1/miners/j2/fail",
    ]
    assert all(h["x-api-key"] == "miner-key-123" and h["x-miner-id"] == "rig-01" for _, _, h in seen)
    assert seen[0][1] == {"capabilities": {"models": ["llama2"]}, "concurrency": 2, "region": "eu", "held_jobs": []}
    assert seen[1][1]["inflight"] == 1
    assert seen[2][1] == {"max_wait_seconds": 15}
    # both strings are required by the coordinator, even when the message is empty
    assert seen[4][1] == {
        "error_code": "OUT_OF_MEMORY",
        "error_message": "OUT_OF_MEMORY",
        "metrics": {"duration_ms": 1},
    }


def test_poll_parses_a_job_with_naive_and_aware_expiry() -> None:
    """A poll answer becomes an AssignedJob; naive timestamps are read as UTC."""
    for stamp in ("2026-11-28T17:08:59.765980", "2026-11-28T17:08:59.765980Z", "2026-11-28T18:08:59.765980+01:00"):
        job = parse_assigned_job({"job_id": "j1", "payload": {"model": "m", "prompt": "p"}, "expires_at": stamp})
        assert job.expires_at == datetime(2026, 11, 28, 17, 8, 59, 765980, tzinfo=UTC)
        assert job.payload_error is None


@pytest.mark.parametrize(
    "answer",
    [
        {"payload": {"model": "m"}},
        {"job_id": 42, "payload": {}},
        {"job_id": "", "payload": {}},
        ["job_id", "j1"],
        "j1",
    ],
)
def test_poll_answer_without_a_usable_job_id_is_a_bad_answer(answer: Any) -> None:
    """An answer naming no string job id raises CoordinatorUnavailable, never a crash."""
    with pytest.raises(CoordinatorUnavailable):
        _call(lambda r: httpx.Response(200, json=answer), lambda c: c.poll(0))


@pytest.mark.parametrize("payload", [None, "text", ["a"], 3])
def test_poll_answer_with_a_job_id_and_a_bad_payload_is_kept_for_failing(payload: Any) -> None:
    """A job id with a non-object payload is returned with payload_error set, so it can be failed."""
    job = _call(lambda r: httpx.Response(200, json={"job_id": "j9", "payload": payload}), lambda c: c.poll(0))
    assert job.job_id == "j9" and job.payload_error is not None


def test_poll_ignores_garbled_expiry_and_ttl() -> None:
    """Unreadable expires_at and non-numeric ttl_seconds are dropped, not fatal."""
    job = parse_assigned_job({"job_id": "j", "payload": {}, "expires_at": "yesterday", "ttl_seconds": "soon"})
    assert job.expires_at is None and job.ttl_seconds is None


@pytest.mark.parametrize(
    ("response", "error"),
    [
        (httpx.Response(500, json={"detail": "boom"}), CoordinatorUnavailable),
        (httpx.Response(503, text="<html>bad gateway</html>"), CoordinatorUnavailable),
        (httpx.Response(200, text="not json"), CoordinatorUnavailable),
        (httpx.Response(200, json=["a", "list"]), CoordinatorUnavailable),
        (httpx.Response(401, json={"detail": "Invalid API key"}), AuthenticationFailed),
        (httpx.Response(403, json={"detail": "forbidden"}), AuthenticationFailed),
        (httpx.Response(404, json={"detail": "miner not registered"}), NotRegistered),
        (httpx.Response(422, json={"detail": "bad"}), CoordinatorRejected),
        (httpx.Response(302, headers={"Location": "/elsewhere"}), CoordinatorUnavailable),
    ],
)
def test_heartbeat_failures_map_to_the_error_tree(response: httpx.Response, error: type[Exception]) -> None:
    """Each kind of bad heartbeat answer raises its documented error type."""
    with pytest.raises(error):
        _call(lambda r: response, lambda c: c.heartbeat(0))


def test_404_on_result_is_a_rejection_not_a_registration_problem() -> None:
    """404 "job not found" on /result is CoordinatorRejected carrying the status."""
    with pytest.raises(CoordinatorRejected) as info:
        _call(lambda r: httpx.Response(404, json={"detail": "job not found"}), lambda c: c.submit_result("j", {}))
    assert info.value.status == 404 and "job not found" in str(info.value)


@pytest.mark.parametrize(
    "exc", [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("eof")]
)
def test_transport_errors_are_unavailable(exc: Exception) -> None:
    """Connection refused, timeouts and protocol errors become CoordinatorUnavailable."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    with pytest.raises(CoordinatorUnavailable):
        _call(handler, lambda c: c.poll(1))


def test_connection_refused_on_a_real_socket_is_unavailable() -> None:
    """A coordinator URL with nothing listening raises CoordinatorUnavailable."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def scenario() -> None:
        client = CoordinatorClient(f"http://127.0.0.1:{port}", api_key="k" * 8, miner_id="m", timeout_s=2)
        try:
            await client.heartbeat(0)
        finally:
            await client.aclose()

    with pytest.raises(CoordinatorUnavailable):
        asyncio.run(scenario())


def test_heartbeat_normalises_cancelled_jobs() -> None:
    """cancelled_jobs is always a list of strings; junk entries and shapes are dropped."""
    answers = [{"status": "ok"}, {"cancelled_jobs": ["a", 3, None, "b"]}, {"cancelled_jobs": "a"}]
    out = []
    for answer in answers:
        out.append(_call(lambda r, a=answer: httpx.Response(200, json=a), lambda c: c.heartbeat(0))["cancelled_jobs"])
    assert out == [[], ["a", "b"], []]


def test_429_sets_retry_after_and_blocks_that_endpoint_only() -> None:
    """429 raises RateLimited with Retry-After; later calls to that endpoint fail fast, others go out."""
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path.endswith("/poll"):
            return httpx.Response(429, json={"detail": "Rate limit exceeded"}, headers={"Retry-After": "60"})
        return httpx.Response(200, json={"status": "ok"})

    async def scenario(c: CoordinatorClient) -> tuple[float, float]:
        with pytest.raises(RateLimited) as first:
            await c.poll(0)
        with pytest.raises(RateLimited) as second:
            await c.poll(0)
        await c.heartbeat(0)
        return first.value.retry_after, second.value.retry_after

    first, second = _call(handler, scenario)
    assert first == 60 and 0 < second <= 60
    assert calls == ["/v1/miners/poll", "/v1/miners/heartbeat"]


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, 60.0), ("", 60.0), ("garbage", 60.0), ("2.5", 2.5), ("-4", 0.0), ("99999999", 3600.0), ("nan", 60.0)],
)
def test_retry_after_parsing(header: str | None, expected: float) -> None:
    """Retry-After seconds are parsed, clamped, and default to 60 when missing or garbled."""
    assert parse_retry_after(header) == expected


def test_retry_after_http_date() -> None:
    """An HTTP-date Retry-After gives the seconds until that date."""
    assert (
        parse_retry_after("Thu, 01 Jan 2026 00:01:00 GMT", now=datetime(2026, 1, 1, tzinfo=UTC).timestamp())
        == 60
    )


def test_observer_sees_every_request_with_its_error_kind() -> None:
    """The observe hook gets endpoint, seconds and an error kind for metrics."""
    seen: list[tuple[str, str | None]] = []
    answers = iter([httpx.Response(204), httpx.Response(500)])

    async def scenario(c: CoordinatorClient) -> None:
        await c.poll(0)
        with pytest.raises(CoordinatorUnavailable):
            await c.poll(0)

    _call(lambda r: next(answers), scenario, observe=lambda e, s, err: seen.append((e, err)))
    assert seen == [("poll", None), ("poll", "5xx")]


def test_retry_helper_retries_transient_errors_and_logs_attempts_left() -> None:
    """retry() retries CoordinatorUnavailable with backoff, then succeeds; sleeps are jittered and bounded."""
    sleeps: list[float] = []
    attempts = iter([CoordinatorUnavailable("down"), RateLimited("slow", retry_after=7), "ok"])

    async def call() -> str:
        item = next(attempts)
        if isinstance(item, Exception):
            raise item
        return item

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    result = asyncio.run(
        retry(call, what="test", attempts=3, backoff=Backoff(1.0, 8.0, rng=lambda: 1.0), sleep=fake_sleep)
    )
    assert result == "ok" and sleeps == [1.0, 7]


def test_retry_helper_gives_up_after_its_attempts() -> None:
    """After the last attempt the last transient error propagates."""

    async def call() -> None:
        raise CoordinatorUnavailable("down")

    async def no_sleep(seconds: float) -> None:
        return None

    with pytest.raises(CoordinatorUnavailable):
        asyncio.run(retry(call, what="test", attempts=2, sleep=no_sleep))


def test_retry_helper_does_not_retry_rejections() -> None:
    """A CoordinatorRejected is not transient and propagates on the first attempt."""
    count = 0

    async def call() -> None:
        nonlocal count
        count += 1
        raise CoordinatorRejected("no")

    with pytest.raises(CoordinatorRejected):
        asyncio.run(retry(call, what="test", attempts=5))
    assert count == 1


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    """Backoff delays double up to max_s and stay within [d/2, d]."""
    low = Backoff(1.0, 8.0, rng=lambda: 0.0)
    high = Backoff(1.0, 8.0, rng=lambda: 1.0)
    assert [low.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert [high.next_delay() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_token_bucket_limits_the_rate() -> None:
    """A 60/min bucket with capacity 2 lets 2 through at once, then one per simulated second."""
    now = [0.0]
    granted: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        now[0] += seconds

    async def scenario() -> None:
        bucket = TokenBucket(60, capacity=2, clock=lambda: now[0], sleep=fake_sleep)
        for _ in range(5):
            await bucket.acquire()
            granted.append(now[0])

    asyncio.run(scenario())
    assert granted == pytest.approx([0.0, 0.0, 1.0, 2.0, 3.0])


def test_unreadable_ca_file_is_a_config_error(tmp_path: Path) -> None:
    """A coordinator.ca_file that is missing or not PEM stops start-up with a ConfigError naming the setting."""
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    for path in (tmp_path / "missing.pem", bad):
        with pytest.raises(ConfigError, match="coordinator.ca_file"):
            CoordinatorClient("https://c.test", api_key="key-123456", miner_id="m", ca_file=path)


@pytest.mark.parametrize(("api_key", "miner_id"), [("kéy-123456", "m"), ("key-123456", "rig 01\n")])
def test_header_values_that_cannot_be_sent_are_config_errors(api_key: str, miner_id: str) -> None:
    """An API key or miner id that cannot travel as an HTTP header is refused at start with the setting's name."""
    with pytest.raises(ConfigError):
        CoordinatorClient("http://c.test", api_key=api_key, miner_id=miner_id)
