"""The metrics and health HTTP endpoint.

A deliberately tiny HTTP/1.1 server on :func:`asyncio.start_server` (the daemon carries
no web framework): ``GET /metrics`` and ``GET /healthz`` (``HEAD`` too), one request per
connection. Bound to loopback by default (``metrics.listen = "127.0.0.1:9477"``).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from miner.ops.health import HealthState
from miner.ops.metrics import MinerMetrics
from miner.wire.net import parse_host_port

log = structlog.get_logger("miner.ops.server")

_READ_TIMEOUT_S = 5.0
_MAX_HEADERS = 100
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def parse_listen(listen: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (``"[::1]:9477"`` for IPv6) -> ``(host, port)``; ValueError naming metrics.listen."""
    try:
        return parse_host_port(listen, "127.0.0.1:9477")
    except ValueError as exc:
        raise ValueError(f"metrics.listen: {exc}") from None


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
            log.exception("metrics_request_failed")
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
