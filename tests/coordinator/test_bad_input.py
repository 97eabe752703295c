"""Every bad input gets a clear 4xx JSON ``detail`` naming the field, never a 500; rate limits answer 429."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from coordinator.ratelimit import ClientRateLimits
from tests.coordinator.helpers import ScriptedMiner
from tests.servers import RunningCoordinator, run_coordinator

JSON = "application/json"


@pytest.mark.parametrize(
    ("body", "status", "names"),
    [
        (b'{"payload": ', 400, "malformed JSON"),
        (b"[]", 422, "body"),
        (b"{}", 422, "body.payload"),
        (b'{"payload": "text"}', 422, "body.payload"),
        (b'{"payload": {}, "ttl_seconds": "60"}', 422, "body.ttl_seconds"),
        (b'{"payload": {}, "ttl_seconds": 1.5}', 422, "body.ttl_seconds"),
        (b'{"payload": {}, "ttl_seconds": 0}', 422, "body.ttl_seconds"),
        (b'{"payload": {}, "ttl_seconds": 86401}', 422, "body.ttl_seconds"),
        (b'{"payload": {}, "payment_amount": -3}', 422, "body.payment_amount"),
        (b'{"payload": {}, "payment_amount": true}', 422, "body.payment_amount"),
        (b'{"payload": {}, "payment_currency": ""}', 422, "body.payment_currency"),
        (b'{"payload": {}, "payment_currency": 5}', 422, "body.payment_currency"),
        (b'{"payload": {}, "constraints": []}', 422, "body.constraints"),
        (b'{"payload": {}, "constraints": {"models": 3}}', 422, "body.constraints.models"),
        (b'{"payload": {}, "constraints": {"min_gpu_memory": -1}}', 422, "body.constraints.min_gpu_memory"),
        (b'{"payload": {}, "constraints": {"gpu_type": 3090}}', 422, "body.constraints.gpu_type"),
        (b'{"payload": {"x": NaN}}', 422, "body.payload.x"),
        (b'{"payload": {"x": [1, Infinity]}}', 422, "body.payload.x[1]"),
        (b'{"payload": {"prompt": "\\ud800"}}', 422, "body.payload.prompt"),
        (b'{"payload": ' + b"[" * 40 + b"]" * 40 + b"}", 422, "nested deeper"),
        (b'{"payload": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400, "body"),
    ],
)
def test_bad_submissions(coordinator: RunningCoordinator, body: bytes, status: int, names: str) -> None:
    """A malformed or ill-typed submission is refused with a 4xx whose detail names the field."""
    response = httpx.post(f"{coordinator.url}/v1/jobs", content=body,
                          headers={"X-Api-Key": coordinator.client_key, "Content-Type": JSON})
    assert response.status_code == status
    assert names in response.json()["detail"]


def test_body_without_json_content_type_says_what_to_send(coordinator: RunningCoordinator) -> None:
    """A body sent without a JSON Content-Type is 422 and the detail says to send JSON."""
    response = httpx.post(f"{coordinator.url}/v1/jobs", content=b'{"payload": {}}',
                          headers={"X-Api-Key": coordinator.client_key, "Content-Type": "text/plain"})
    assert response.status_code == 422 and "Content-Type: application/json" in response.json()["detail"]


def _chunks(total: int) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield b" " * 65536
        sent += 65536


def test_oversize_body_is_413(coordinator: RunningCoordinator) -> None:
    """A body over 1 MiB is refused 413, whether its length is declared or streamed in chunks."""
    headers = {"X-Api-Key": coordinator.client_key, "Content-Type": JSON}
    big = b'{"payload": {"prompt": "' + b"x" * (1 << 20) + b'"}}'
    response = httpx.post(f"{coordinator.url}/v1/jobs", content=big, headers=headers)
    assert response.status_code == 413 and "1048576" in response.json()["detail"]
    response = httpx.post(f"{coordinator.url}/v1/jobs", content=_chunks(2 << 20), headers=headers)
    assert response.status_code == 413
    just_under = b'{"payload": {"prompt": "' + b"x" * ((1 << 20) - 100) + b'"}}'
    assert httpx.post(f"{coordinator.url}/v1/jobs", content=just_under, headers=headers).status_code == 201


def test_bad_paths_and_methods(coordinator: RunningCoordinator) -> None:
    """Unknown endpoints are 404, wrong methods 405, over-long job ids 422 naming the path field."""
    headers = {"X-Api-Key": coordinator.client_key}
    assert httpx.get(f"{coordinator.url}/v1/nothing", headers=headers).status_code == 404
    response = httpx.delete(f"{coordinator.url}/v1/jobs", headers=headers)
    assert response.status_code == 405 and response.json()["detail"]
    response = httpx.get(f"{coordinator.url}/v1/jobs/{'x' * 200}", headers=headers)
    assert response.status_code == 422 and "job_id" in response.json()["detail"]


@pytest.mark.parametrize(
    ("path", "body", "names"),
    [
        ("/v1/miners/poll", b'{"max_wait_seconds": -1}', "max_wait_seconds"),
        ("/v1/miners/poll", b'{"max_wait_seconds": "soon"}', "max_wait_seconds"),
        ("/v1/miners/heartbeat", b'{"inflight": -1}', "inflight"),
        ("/v1/miners/register", b'{"capabilities": []}', "capabilities"),
        ("/v1/miners/register", b'{"capabilities": {"receipt_key": "abc"}}', "capabilities.receipt_key"),
        ("/v1/miners/job/result", b'{"result": "text"}', "body.result"),
        ("/v1/miners/job/result", b'{"metrics": {}}', "body.result"),
        ("/v1/miners/job/fail", b'{"error_code": 1, "error_message": "x"}', "error_code"),
    ],
)
def test_bad_miner_requests(coordinator: RunningCoordinator, path: str, body: bytes, names: str) -> None:
    """A malformed miner request is 422 naming the field."""
    with ScriptedMiner(coordinator) as miner:
        miner.register()
        response = miner.http.post(path, content=body, headers={"Content-Type": JSON})
        assert response.status_code == 422 and names in response.json()["detail"]


def test_client_rate_limits_answer_429_with_retry_after(tmp_path: Path) -> None:
    """Over the per-key limit a client gets 429 with Retry-After; each category and each key counts apart."""
    limits = ClientRateLimits(submit=3, status=5, result=2, window_s=60.0)
    with run_coordinator(tmp_path / "c.db", rate_limits=limits, extra_client_keys=("other",)) as coord:
        with httpx.Client(base_url=coord.url, headers={"X-Api-Key": coord.client_key}) as http:
            codes = [http.post("/v1/jobs", json={"payload": {}}).status_code for _ in range(4)]
            assert codes == [201, 201, 201, 429]
            refused = http.post("/v1/jobs", json={"payload": {}})
            assert refused.status_code == 429 and "Rate limit exceeded" in refused.json()["detail"]
            assert 1 <= int(refused.headers["Retry-After"]) <= 20
            assert [http.get("/v1/jobs/x").status_code for _ in range(6)] == [404] * 5 + [429]
            assert [http.get("/v1/jobs/x/result").status_code for _ in range(3)] == [404, 404, 429]
        other = httpx.post(f"{coord.url}/v1/jobs", json={"payload": {}}, headers={"X-Api-Key": "other"})
        assert other.status_code == 201


def test_default_rate_limits_are_the_published_ones(tmp_path: Path) -> None:
    """Without options the coordinator allows a burst of 100 submissions per key, then answers 429."""
    with run_coordinator(tmp_path / "c.db") as coord:
        with httpx.Client(base_url=coord.url, headers={"X-Api-Key": coord.client_key}) as http:
            codes: list[int] = []
            while 429 not in codes and len(codes) < 150:  # tokens refill at 100/60 per second meanwhile
                codes.append(http.post("/v1/jobs", json={"payload": {}}).status_code)
    assert 429 in codes and codes.index(429) >= 100
    assert set(codes[: codes.index(429)]) == {201}
