"""The metrics and health HTTP endpoint, and ``aitbc-miner status`` that reads it.

A deliberately tiny HTTP/1.1 server on :func:`asyncio.start_server` (the daemon carries
no web framework): ``GET /metrics`` and ``GET /healthz`` (``HEAD`` too), one request per
connection. Bound to loopback by default (``metrics.listen = "127.0.0.1:9477"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

if TYPE_CHECKING:
    import argparse

    from miner.metrics import HealthState, MinerMetrics

log = structlog.get_logger("miner.metrics")

_READ_TIMEOUT_S = 5.0
_MAX_HEADERS = 100
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def parse_listen(listen: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (``"[::1]:9477"`` for IPv6) -> ``(host, port)``; ValueError if malformed."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"metrics.listen: {listen!r} is not HOST:PORT such as 127.0.0.1:9477")
    return host.strip("[]"), int(port)


class MetricsServer:
    """Serves ``/metrics`` (Prometheus text) and ``/healthz`` (200 ``ok`` or 503 and the reason).

    Contract: ``await start()`` binds (port 0 picks a free one, see :attr:`port`) or
    raises ``OSError``; ``await aclose()`` stops listening and is safe to call twice. A
    client that sends garbage or stalls gets a 400 or is dropped after a few seconds; the
    server itself never raises into the daemon.
    """

    def __init__(self, listen: str, metrics: MinerMetrics, health: HealthState) -> None:
        self.host, self._port = parse_listen(listen)
        self.metrics = metrics
        self.health = health
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self._port)
        self._port = self._server.sockets[0].getsockname()[1]

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            async with asyncio.timeout(_READ_TIMEOUT_S):
                method, path = await _read_request(reader)
            status, ctype, body = self._respond(method, path)
            head = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode("ascii") + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # a stalled or broken client: drop it
        except Exception:  # never let a scrape take the daemon down
            log.exception("metrics endpoint failed to answer a request")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._clients.discard(task)

    def _respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        text = "text/plain; charset=utf-8"
        if method not in ("GET", "HEAD"):
            return 405, text, b"only GET and HEAD\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE_PLAIN_0_0_4, self.metrics.render()
        if path == "/healthz":
            healthy, reason = self.health.check()
            return (200 if healthy else 503), text, (reason + "\n").encode("utf-8")
        if path == "/":
            return 200, text, b"aitbc-miner: see /metrics and /healthz\n"
        return 404, text, b"not found: try /metrics or /healthz\n"


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    line = (await reader.readline()).decode("latin-1").strip()
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError("not an HTTP request line")
    for _ in range(_MAX_HEADERS):
        header = await reader.readline()
        if header in (b"\r\n", b"\n", b""):
            break
    else:
        raise ValueError("too many headers")
    return parts[0].upper(), parts[1].split("?", 1)[0]


# -- aitbc-miner status ------------------------------------------------------------------


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
    last = one("aitbc_miner_last_heartbeat_timestamp_seconds")
    lines.append(f"last heartbeat: {now - last:.0f}s ago" if last > 0 else "last heartbeat: none yet")
    models = sorted(labels["model"] for labels, value in s.get("aitbc_miner_model_loaded", []) if value)
    lines.append("models ready: " + (", ".join(models) if models else "none"))
    lines.extend(_gpu_lines(s))
    return lines


def _gpu_lines(s: dict[str, list[tuple[dict[str, str], float]]]) -> list[str]:
    def by_gpu(name: str) -> dict[str, float]:
        return {labels["gpu"]: value for labels, value in s.get(name, [])}

    total = by_gpu("aitbc_miner_gpu_memory_total_bytes")
    if not total:
        return ["GPUs: none (CPU mode)"]
    used, util = by_gpu("aitbc_miner_gpu_memory_used_bytes"), by_gpu("aitbc_miner_gpu_utilization_ratio")
    temp, power = by_gpu("aitbc_miner_gpu_temperature_celsius"), by_gpu("aitbc_miner_gpu_power_watts")
    names = {labels["gpu"]: labels.get("name", "") for labels, _ in s.get("aitbc_miner_gpu_memory_total_bytes", [])}
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
        lines.append(f"GPU {gpu} {names.get(gpu, '')}: " + ", ".join(parts))
    return lines


def status_command(args: argparse.Namespace) -> int:
    """``aitbc-miner status --url URL``: 0 healthy, 1 unhealthy, 2 endpoint unreachable."""
    import sys

    import httpx

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
        print(f"error: {base}/metrics answered {metrics.status_code}; is this an aitbc-miner endpoint?", file=sys.stderr)
        return 2
    try:
        lines = summarise(metrics.text, health.status_code, health.text)
    except ValueError as exc:
        print(f"error: {base}/metrics is not Prometheus text: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0 if health.status_code == 200 else 1
