"""``aitbc-miner status``: a summary of a running miner, read from its metrics endpoint."""

from __future__ import annotations

import argparse
import sys
import time

import httpx


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def summarise(metrics_text: str, health_status: int, health_body: str, now: float | None = None) -> list[str]:
    """The lines ``aitbc-miner status`` prints, from a scrape of ``/metrics`` and ``/healthz``."""
    now = time.time() if now is None else now
    s = _samples(metrics_text)

    def one(name: str, default: float = 0.0) -> float:
        values = s.get(name)
        return values[0][1] if values else default

    version = next((labels.get("version", "?") for labels, _ in s.get("aitbc_miner_build_info", [])), "?")
    health = "healthy" if health_status == 200 else f"UNHEALTHY: {health_body.strip() or health_status}"
    lines = [f"aitbc-miner {version}: {health}"]

    by_outcome: dict[str, float] = {}
    errors: dict[str, float] = {}
    for labels, value in s.get("aitbc_miner_jobs_total", []):
        by_outcome[labels["outcome"]] = by_outcome.get(labels["outcome"], 0) + value
        if labels.get("error_code", "none") != "none" and value:
            errors[labels["error_code"]] = errors.get(labels["error_code"], 0) + value
    jobs = ", ".join(f"{int(by_outcome.get(o, 0))} {o}" for o in ("completed", "failed", "cancelled"))
    if errors:
        jobs += " (" + ", ".join(f"{code} x{int(n)}" for code, n in sorted(errors.items())) + ")"
    lines.append(
        f"jobs: {jobs}; {int(one('aitbc_miner_inflight_jobs'))} in flight; "
        f"{int(one('aitbc_miner_outbox_depth'))} waiting in the outbox"
    )
    lines.append(_work_line(s, one("aitbc_miner_price_per_gpu_second"), one("aitbc_miner_idle_seconds")))
    last = one("aitbc_miner_last_heartbeat_timestamp_seconds")
    lines.append(f"last heartbeat: {now - last:.0f}s ago" if last > 0 else "last heartbeat: none yet")
    models = sorted(labels["model"] for labels, value in s.get("aitbc_miner_model_loaded", []) if value)
    lines.append("models ready: " + (", ".join(models) if models else "none"))
    lines.extend(_gpu_lines(s))
    return lines


def _work_line(s: dict[str, list[tuple[dict[str, str], float]]], price: float, idle_s: float) -> str:
    """Tokens, GPU-seconds and the earnings they represent at the advertised price, since start."""
    tokens = sum(value for _, value in s.get("aitbc_miner_completion_tokens_total", []))
    gpu_seconds = sum(value for _, value in s.get("aitbc_miner_units_total", []))
    idle = f"idle for {idle_s:.0f}s" if idle_s > 0 else "working"
    return (
        f"since start: {int(tokens)} tokens, {gpu_seconds:.1f} GPU-seconds, earnings {gpu_seconds * price:.6g} "
        f"at {price:g} per GPU-second; {idle}"
    )


def _gpu_lines(s: dict[str, list[tuple[dict[str, str], float]]]) -> list[str]:
    def by_gpu(name: str) -> dict[str, float]:
        return {labels["gpu"]: value for labels, value in s.get(name, [])}

    total = by_gpu("aitbc_miner_gpu_memory_total_bytes")
    if not total:
        return ["GPUs: none (CPU mode)"]
    used, util = by_gpu("aitbc_miner_gpu_memory_used_bytes"), by_gpu("aitbc_miner_gpu_utilization_ratio")
    temp, power = by_gpu("aitbc_miner_gpu_temperature_celsius"), by_gpu("aitbc_miner_gpu_power_watts")
    names = {labels["gpu"]: labels.get("name", "") for labels, _ in s.get("aitbc_miner_gpu_memory_total_bytes", [])}
    serving = by_gpu("aitbc_miner_gpu_serving")
    troubles: dict[str, list[str]] = {}
    for labels, value in s.get("aitbc_miner_gpu_trouble", []):
        if value:
            troubles.setdefault(labels["gpu"], []).append(labels["check"])
    gib = 1024.0**3
    lines = []
    for gpu in sorted(total, key=lambda g: int(g) if g.isdigit() else g):
        parts = [f"{used[gpu] / gib:.1f}/{total[gpu] / gib:.1f} GiB" if gpu in used else f"{total[gpu] / gib:.1f} GiB"]
        if gpu in util:
            parts.append(f"{util[gpu] * 100:.0f}% busy")
        if gpu in temp:
            parts.append(f"{temp[gpu]:.0f} C")
        if gpu in power:
            parts.append(f"{power[gpu]:.0f} W")
        if serving.get(gpu) == 0:
            parts.append("DRAINED: " + (", ".join(sorted(troubles.get(gpu, ()))) or "recovering"))
        elif troubles.get(gpu):
            parts.append("trouble not draining: " + ", ".join(sorted(troubles[gpu])))
        lines.append(f"GPU {gpu} {names.get(gpu, '')}: " + ", ".join(parts))
    return lines


def status_command(args: argparse.Namespace) -> int:
    """``aitbc-miner status --url URL``: 0 healthy, 1 unhealthy, 2 endpoint unreachable."""
    base = str(args.url).rstrip("/")
    try:
        with httpx.Client(timeout=5.0) as client:
            metrics = client.get(base + "/metrics")
            health = client.get(base + "/healthz")
    except httpx.HTTPError as exc:
        print(
            f"error: cannot reach the miner's metrics endpoint at {base}: {exc}; is the miner running, "
            "and does --url match metrics.listen in its config?",
            file=sys.stderr,
        )
        return 2
    if metrics.status_code != 200:
        print(
            f"error: {base}/metrics answered {metrics.status_code}; is this an aitbc-miner endpoint?", file=sys.stderr
        )
        return 2
    try:
        lines = summarise(metrics.text, health.status_code, health.text)
    except ValueError as exc:
        print(f"error: {base}/metrics is not Prometheus text: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0 if health.status_code == 200 else 1
