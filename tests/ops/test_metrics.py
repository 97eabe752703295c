"""Metrics, health state and the /metrics and /healthz endpoint, over real HTTP."""

from __future__ import annotations

import argparse
import asyncio
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from miner.cli.status import status_command, summarise
from miner.ops.health import HealthState
from miner.ops.metrics import MinerMetrics
from miner.ops.server import MetricsServer
from runners.base import GpuInfo

H200 = GpuInfo(
    index=0,
    uuid="GPU-aaaa",
    name="NVIDIA H200",
    memory_total_mb=143771,
    memory_free_mb=100000,
    utilization_pct=40.0,
    temperature_c=51.0,
    power_w=210.0,
)


def samples(metrics: MinerMetrics) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(metrics: MinerMetrics, metric: str, /, **labels: str) -> float | None:
    return samples(metrics).get((metric, frozenset(labels.items())))


def test_registries_are_per_instance() -> None:
    """Two MinerMetrics in one process do not share counters (no global registry)."""
    a, b = MinerMetrics(), MinerMetrics()
    a.job_started(model="llama2")
    assert value(a, "aitbc_miner_jobs_started_total", model="llama2") == 1
    assert value(b, "aitbc_miner_jobs_started_total", model="llama2") is None


def test_job_outcomes_tokens_and_units() -> None:
    """job_finished counts by outcome and code, and derives tokens/s and units from completed jobs only."""
    m = MinerMetrics()
    m.job_finished(model="llama2", outcome="completed", error_code=None, duration_s=2.0, completion_tokens=100)
    m.job_finished(
        model="llama2", outcome="completed", error_code=None, duration_s=1.0, completion_tokens=10, units=0.75
    )
    m.job_finished(model="llama2", outcome="failed", error_code="OUT_OF_MEMORY", duration_s=0.5, completion_tokens=None)
    m.job_finished(model="llama2", outcome="cancelled", error_code="CANCELLED", duration_s=0.1, completion_tokens=3)
    assert value(m, "aitbc_miner_jobs_total", model="llama2", outcome="completed", error_code="none") == 2
    assert value(m, "aitbc_miner_jobs_total", model="llama2", outcome="failed", error_code="OUT_OF_MEMORY") == 1
    assert value(m, "aitbc_miner_jobs_total", model="llama2", outcome="cancelled", error_code="CANCELLED") == 1
    assert value(m, "aitbc_miner_job_tokens_per_second_sum", model="llama2") == 60.0  # 50 + 10
    assert value(m, "aitbc_miner_job_tokens_per_second_count", model="llama2") == 2
    assert value(m, "aitbc_miner_completion_tokens_total", model="llama2") == 110
    assert value(m, "aitbc_miner_units_total", model="llama2") == 2.75
    assert value(m, "aitbc_miner_job_duration_seconds_count", model="llama2", outcome="failed") == 1


def test_odd_values_are_skipped_not_raised() -> None:
    """Negative or non-finite durations are not observed, and zero-length jobs give no tokens/s."""
    m = MinerMetrics()
    m.job_finished(model="x", outcome="completed", error_code=None, duration_s=float("nan"), completion_tokens=5)
    m.job_finished(model="x", outcome="completed", error_code=None, duration_s=0.0, completion_tokens=5)
    m.observe_request(endpoint="poll", seconds=-1.0, error=None)
    assert value(m, "aitbc_miner_jobs_total", model="x", outcome="completed", error_code="none") == 2
    assert value(m, "aitbc_miner_job_duration_seconds_count", model="x", outcome="completed") == 1
    assert value(m, "aitbc_miner_job_tokens_per_second_count", model="x") is None
    assert value(m, "aitbc_miner_coordinator_request_duration_seconds_count", endpoint="poll") is None


def test_requests_gauges_and_heartbeat() -> None:
    """Request latency, errors by endpoint and kind, in-flight, outbox and heartbeat age are exported."""
    m = MinerMetrics()
    m.observe_request(endpoint="poll", seconds=0.02, error=None)
    m.observe_request(endpoint="poll", seconds=0.01, error="429")
    m.observe_request(endpoint="result", seconds=5.0, error="timeout")
    m.set_inflight(3)
    m.set_outbox_depth(2)
    assert value(m, "aitbc_miner_coordinator_request_duration_seconds_count", endpoint="poll") == 2
    assert value(m, "aitbc_miner_coordinator_request_errors_total", endpoint="poll", kind="429") == 1
    assert value(m, "aitbc_miner_coordinator_request_errors_total", endpoint="result", kind="timeout") == 1
    assert value(m, "aitbc_miner_inflight_jobs") == 3
    assert value(m, "aitbc_miner_outbox_depth") == 2
    assert value(m, "aitbc_miner_last_heartbeat_timestamp_seconds") == 0
    m.heartbeat_ok(time.time() - 100)
    assert value(m, "aitbc_miner_last_heartbeat_timestamp_seconds") > 0
    assert value(m, "aitbc_miner_heartbeat_age_seconds") >= 100


def test_gpu_stats_replace_previous_and_skip_missing_readings() -> None:
    """set_gpu_stats exports bytes, ratio, celsius and watts per GPU, drops vanished GPUs and None readings."""
    m = MinerMetrics()
    other = GpuInfo(index=1, uuid="GPU-bbbb", name="NVIDIA L4", memory_total_mb=23034)
    m.set_gpu_stats([H200, other])
    labels0 = {"gpu": "0", "uuid": "GPU-aaaa", "name": "NVIDIA H200"}
    labels1 = {"gpu": "1", "uuid": "GPU-bbbb", "name": "NVIDIA L4"}
    assert value(m, "aitbc_miner_gpu_memory_total_bytes", **labels0) == 143771 * 1024 * 1024
    assert value(m, "aitbc_miner_gpu_memory_used_bytes", **labels0) == (143771 - 100000) * 1024 * 1024
    assert value(m, "aitbc_miner_gpu_utilization_ratio", **labels0) == 0.4
    assert value(m, "aitbc_miner_gpu_temperature_celsius", **labels0) == 51
    assert value(m, "aitbc_miner_gpu_power_watts", **labels0) == 210
    assert value(m, "aitbc_miner_gpu_memory_total_bytes", **labels1) == 23034 * 1024 * 1024
    assert value(m, "aitbc_miner_gpu_power_watts", **labels1) is None
    assert value(m, "aitbc_miner_gpus") == 2
    m.set_gpu_stats([H200])
    assert value(m, "aitbc_miner_gpu_memory_total_bytes", **labels1) is None
    assert value(m, "aitbc_miner_gpus") == 1


def test_models_loaded_and_load_time() -> None:
    """model_loaded records load seconds; set_loaded_models replaces the ready set."""
    m = MinerMetrics()
    m.model_loaded(model="llama2", runner="transformers", load_seconds=3.5)
    m.model_loaded(model="mistral", runner="fake", load_seconds=0.1)
    assert value(m, "aitbc_miner_model_load_seconds", model="llama2", runner="transformers") == 3.5
    assert value(m, "aitbc_miner_model_loaded", model="mistral") == 1
    m.set_loaded_models(["llama2"])
    assert value(m, "aitbc_miner_model_loaded", model="llama2") == 1
    assert value(m, "aitbc_miner_model_loaded", model="mistral") is None


def test_health_state_reasons() -> None:
    """HealthState is healthy only when registered, heartbeating recently, not draining and with a usable disk."""
    now = 1_000_000.0
    h = HealthState(heartbeat_interval_s=10.0)
    assert h.check(now) == (False, "not registered with the coordinator")
    h.registered = True
    assert h.check(now) == (False, "no heartbeat acknowledged yet")
    h.last_heartbeat = now - 29
    assert h.check(now) == (True, "ok")
    h.last_heartbeat = now - 31
    healthy, reason = h.check(now)
    assert not healthy and "31s ago" in reason and "limit 30s" in reason
    h.last_heartbeat = now
    h.disk_ok, h.disk_reason = False, "No space left on device"
    assert h.check(now) == (False, "state folder unusable: No space left on device")
    h.disk_ok = True
    h.draining = True
    healthy, reason = h.check(now)
    assert not healthy and reason.startswith("draining")


async def _serve_and_get(metrics: MinerMetrics, health: HealthState, paths: list[str]) -> list[httpx.Response]:
    server = MetricsServer("127.0.0.1:0", metrics, health)
    await server.start()
    try:
        assert server.port > 0
        async with httpx.AsyncClient(base_url=server.url) as client:
            return [await client.get(p) for p in paths]
    finally:
        await server.aclose()


def test_server_serves_metrics_and_health_over_http() -> None:
    """GET /metrics returns the Prometheus text; /healthz is 200 ok when healthy, 503 with the reason otherwise."""
    m = MinerMetrics()
    m.job_started(model="llama2")
    h = HealthState(registered=True, last_heartbeat=time.time())
    metrics, health, missing = asyncio.run(_serve_and_get(m, h, ["/metrics", "/healthz", "/nope"]))
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'aitbc_miner_jobs_started_total{model="llama2"} 1.0' in metrics.text
    assert (health.status_code, health.text) == (200, "ok\n")
    assert missing.status_code == 404
    h.draining = True
    (health,) = asyncio.run(_serve_and_get(m, h, ["/healthz?verbose=1"]))
    assert health.status_code == 503 and health.text.startswith("draining")


def test_server_survives_garbage_and_rejects_other_methods() -> None:
    """A client sending garbage is dropped, POST gets 405, and the server still answers afterwards."""

    async def scenario() -> tuple[bytes, int, int]:
        server = MetricsServer("127.0.0.1:0", MinerMetrics(), HealthState())
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"\x00\x01 nonsense\r\n\r\n")
            await writer.drain()
            garbage = await reader.read()
            writer.close()
            async with httpx.AsyncClient(base_url=server.url) as client:
                post = await client.post("/metrics")
                get = await client.get("/healthz")
            return garbage, post.status_code, get.status_code
        finally:
            await server.aclose()

    garbage, post, get = asyncio.run(scenario())
    assert garbage == b""
    assert post == 405
    assert get == 503


def test_summary_lines() -> None:
    """summarise turns a scrape into the short lines `aitbc-miner status` prints."""
    m = MinerMetrics()
    m.job_finished(model="llama2", outcome="completed", error_code=None, duration_s=1.0, completion_tokens=5)
    m.job_finished(
        model="llama2", outcome="failed", error_code="INSUFFICIENT_VRAM", duration_s=0.0, completion_tokens=None
    )
    m.set_inflight(1)
    m.heartbeat_ok(1000.0)
    m.set_gpu_stats([H200])
    m.set_loaded_models(["llama2"])
    m.watch_activity(price=0.02, idle_for=lambda: 12.0)
    lines = summarise(m.render().decode(), 503, "draining: not claiming\n", now=1004.0)
    assert lines[0].endswith("UNHEALTHY: draining: not claiming")
    assert lines[1] == (
        "jobs: 1 completed, 1 failed, 0 cancelled (INSUFFICIENT_VRAM x1); 1 in flight; 0 waiting in the outbox"
    )
    assert lines[2] == "since start: 5 tokens, 1.0 GPU-seconds, earnings 0.02 at 0.02 per GPU-second; idle for 12s"
    assert lines[3] == "last heartbeat: 4s ago"
    assert lines[4] == "models ready: llama2"
    assert lines[5] == "GPU 0 NVIDIA H200: 42.7/140.4 GiB, 40% busy, 51 C, 210 W"


def test_status_command_against_a_live_endpoint(capsys) -> None:
    """`aitbc-miner status` exits 0 with a summary for a healthy miner and 2 when nothing listens."""

    async def scenario() -> tuple[int, int]:
        m = MinerMetrics()
        h = HealthState(registered=True, last_heartbeat=time.time())
        server = MetricsServer("127.0.0.1:0", m, h)
        await server.start()
        try:
            rc = await asyncio.to_thread(status_command, argparse.Namespace(url=server.url))
        finally:
            await server.aclose()
        gone = await asyncio.to_thread(status_command, argparse.Namespace(url=server.url))
        return rc, gone

    rc, gone = asyncio.run(scenario())
    out, err = capsys.readouterr()
    assert rc == 0 and ": healthy" in out and "GPUs: none (CPU mode)" in out
    assert gone == 2 and "cannot reach the miner's metrics endpoint" in err
