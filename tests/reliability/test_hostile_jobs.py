"""Hostile jobs through the real claim path: fuzzed payloads submitted to the local coordinator
and claimed by a running daemon each end FAILED with a clear code and message (or COMPLETED
when valid), and the daemon keeps serving."""

from __future__ import annotations

import hashlib
import json
import queue
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from coordinator.client import Client
from coordinator.quirks import LOCAL
from miner.wire.errors import ErrorCode
from tests.reliability.faultproxy import FaultProxy
from tests.reliability.faults import PASS, Fault, Request
from tests.reliability.harness import TERMINAL, MinerProcess, read_jobs, wait_until, write_config
from tests.reliability.hostile import HOSTILE_JOBS, PAYLOAD_CODES, RAW_PAYLOADS
from tests.servers import RunningCoordinator, run_coordinator

KNOWN_CODES = {v for k, v in vars(ErrorCode).items() if k.isupper()}
MAX_BODY = 1 << 20
FUZZ_STATS: Counter[str] = Counter()
RAW_STATS: dict[str, str] = {}


class PayloadSwap:
    """Plan: replace the payload of the next poll answers that carry a job with raw JSON text."""

    def __init__(self) -> None:
        self.raw: queue.Queue[str] = queue.Queue()

    def __call__(self, request: Request) -> Fault:
        return Fault("pass", rewrite=self._rewrite) if request.endpoint == "poll" else PASS

    def _rewrite(self, content: bytes) -> bytes:
        answer = json.loads(content)
        if not isinstance(answer, dict) or "job_id" not in answer:
            return content
        try:
            raw = self.raw.get_nowait()
        except queue.Empty:
            return content
        rest = {k: v for k, v in answer.items() if k != "payload"}
        return (json.dumps(rest)[:-1] + ', "payload": ' + raw + "}").encode("utf-8")


class Bench:
    """One coordinator, the proxy and one daemon for the whole module (hypothesis runs many examples).

    The coordinator hands out every job whatever its model (as the reference service does), so
    a job for a model this miner does not serve reaches the miner, which must fail it clearly."""

    def __init__(self, coordinator: RunningCoordinator, proxy: FaultProxy, miner: MinerProcess, client: Client,
                 swap: PayloadSwap) -> None:
        self.coordinator, self.proxy, self.miner, self.client, self.swap = coordinator, proxy, miner, client, swap

    def submit_raw(self, payload: Any) -> httpx.Response:
        """Submit ``{"payload": payload}``, JSON-encoded as ASCII (so any Python string can be sent)."""
        body = json.dumps({"payload": payload, "ttl_seconds": 120}).encode("ascii")
        return httpx.post(self.coordinator.url + "/v1/jobs", content=body, timeout=30,
                          headers={"X-Api-Key": self.coordinator.client_key, "Content-Type": "application/json"})

    def outcome(self, job_id: str) -> dict[str, Any]:
        job = self.client.wait(job_id, 30)
        row = read_jobs(self.coordinator.db_path)[job_id]
        return {**job, "error_code": row["error_code"], "receipts": row["receipts"]}


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    tmp = tmp_path_factory.mktemp("hostile")
    with run_coordinator(tmp / "coordinator.db", rate_limits=None,
                         quirks=replace(LOCAL, dispatch_by_model=False)) as coordinator:
        swap = PayloadSwap()
        with FaultProxy(coordinator.url, swap) as proxy, Client(coordinator.url, coordinator.client_key) as client:
            config = write_config(tmp / "miner.toml", url=proxy.url, miner_key=coordinator.miner_key,
                                  state_dir=tmp / "state", concurrency=2, model={"delay_s": 0.0})
            miner = MinerProcess(config).start()
            try:
                assert miner.wait_event(lambda e: e.get("event") == "registered", 30), miner.log_text()
                yield Bench(coordinator, proxy, miner, client, swap)
                assert miner.proc is not None and miner.proc.poll() is None, "the daemon died"
                assert miner.terminate(30) == 0, miner.log_text()
            finally:
                miner.stop()
            print(f"\nhostile jobs: {sum(FUZZ_STATS.values())} fuzzed payloads: {dict(FUZZ_STATS)}; "
                  f"raw payloads: {dict(RAW_STATS)}")
            crashes = [e for e in miner.events if str(e.get("event", "")).startswith("unexpected error")]
            assert crashes == [] and not [line for line in miner.other_lines if "Traceback" in line]


def _prompt_of(payload: Any) -> str | None:
    prompt = payload.get("prompt") if isinstance(payload, dict) else None
    return prompt if isinstance(prompt, str) else None


def _check_outcome(bench: Bench, payload: Any, expected: str, job_id: str) -> str:
    """The job is terminal, as expected, and a failure says clearly why. Returns the state/code."""
    final = bench.outcome(job_id)
    assert final["state"] in ("COMPLETED", "FAILED"), final
    if final["state"] == "COMPLETED":
        assert expected in ("COMPLETED", "ANY"), (payload, final)
        assert final["receipts"] == 1
        return "COMPLETED"
    code, message = final["error_code"], final["error"]
    assert code in KNOWN_CODES, final
    if expected == "ANY":
        assert code in PAYLOAD_CODES, (payload, final)
    elif expected != "FAILED":
        assert code == expected, (payload, final)
    assert isinstance(message, str) and 0 < len(message) <= 2000, final
    prompt = _prompt_of(payload)
    model = payload.get("model") if isinstance(payload, dict) else None
    if prompt is not None and len(prompt) >= 12 and prompt not in str(model):  # the model name may be quoted
        assert prompt not in message, "the failure message quotes the prompt"
    return code


def _fuzz_one(bench: Bench, job: tuple[dict[str, Any], str]) -> None:
    payload, expected = job
    answer = bench.submit_raw(payload)
    if answer.status_code != 201:
        # Refused at the door: a 4xx whose detail names the field is also a clear failure.
        assert 400 <= answer.status_code < 500 and "payload" in answer.json()["detail"], answer.text
        assert expected != "COMPLETED", answer.text
        FUZZ_STATS["refused at submit"] += 1
        return
    FUZZ_STATS[_check_outcome(bench, payload, expected, answer.json()["job_id"])] += 1


# The default run is derandomized (the same 80 examples each time, so `make test` is reproducible);
# the slow run draws fresh examples every time.
@settings(max_examples=80, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(job=HOSTILE_JOBS)
def test_fuzzed_jobs_end_failed_with_a_clear_code_or_completed(bench: Bench, job: tuple[dict[str, Any], str]) -> None:
    """80 generated payloads (wrong types, bad or enormous parameters, unicode edge cases, unknown models, chaos): each ends as promised."""
    _fuzz_one(bench, job)


@pytest.mark.slow
@pytest.mark.timeout(1200)
@settings(max_examples=600, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(job=HOSTILE_JOBS)
def test_many_fuzzed_jobs_end_failed_with_a_clear_code_or_completed(bench: Bench, job: tuple[dict[str, Any], str]) -> None:
    """600 generated payloads: each ends as promised and the daemon keeps serving."""
    _fuzz_one(bench, job)


@pytest.mark.parametrize("name,raw,expected", RAW_PAYLOADS, ids=[r[0] for r in RAW_PAYLOADS])
def test_payloads_a_careless_coordinator_could_send_are_handled(bench: Bench, name: str, raw: str, expected: str) -> None:
    """Payloads the local coordinator refuses (lone surrogates, non-objects, deep nesting, huge numbers) reach the daemon through a rewriting proxy and still end as promised."""
    bench.swap.raw.put(raw)
    job_id = bench.client.submit_job({"model": "llama2", "prompt": "to be replaced"}, ttl_seconds=120)["job_id"]
    assert wait_until(lambda: bench.swap.raw.empty(), 30)
    RAW_STATS[name] = _check_outcome(bench, None, expected, job_id)


def test_prompts_up_to_the_body_limit_complete_and_one_byte_more_is_refused(bench: Bench) -> None:
    """A prompt that fills the coordinator's 1 MiB body limit runs and its receipt hashes it; one byte more is refused with 413."""
    overhead = len(json.dumps({"payload": {"model": "llama2", "prompt": ""}, "ttl_seconds": 120}).encode("ascii"))
    head = "\u00e9 miner \U0001F680 "
    prompt = head + "x" * (MAX_BODY - overhead - (len(json.dumps(head)) - 2))  # the body is exactly 1 MiB
    answer = bench.submit_raw({"model": "llama2", "prompt": prompt})
    assert answer.status_code == 201, answer.text[:300]
    job_id = answer.json()["job_id"]
    assert _check_outcome(bench, {"prompt": prompt}, "COMPLETED", job_id) == "COMPLETED"
    receipt = bench.client.get_receipts(job_id, signer="miner")[0]
    assert receipt["prompt_sha256"] == hashlib.sha256(prompt.encode("utf-8")).hexdigest()
    too_big = bench.submit_raw({"model": "llama2", "prompt": prompt + "x"})
    assert too_big.status_code == 413


def test_the_daemon_still_serves_after_the_hostile_batch(bench: Bench) -> None:
    """After every hostile payload above, a plain job still completes with one receipt."""
    job_id = bench.client.submit_job({"model": "llama2", "prompt": "still alive?"}, ttl_seconds=60)["job_id"]
    assert _check_outcome(bench, None, "COMPLETED", job_id) == "COMPLETED"
    assert all(bench.client.get_job(j)["state"] in TERMINAL for j in _all_job_ids(bench))


def _all_job_ids(bench: Bench) -> list[str]:
    return list(read_jobs(bench.coordinator.db_path))
