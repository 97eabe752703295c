"""A fault-injecting HTTP/1.1 proxy on loopback, between a miner and its coordinator.

:class:`FaultProxy` runs its own asyncio loop in a thread, accepts the miner's
connections (keep-alive included), and for every request asks its *plan* which
:class:`Fault` to inject. Faults act either before the request reaches the coordinator
(it never sees it) or after (the coordinator has acted on it, the miner does not learn
the answer): that difference is what decides whether a result can be lost or doubled.

============== ======================================================================
fault          what the miner sees
============== ======================================================================
``pass``       the coordinator's answer, unchanged (after ``delay_s``, if set)
``drop``       the connection closes without an answer (request not forwarded)
``reset``      a TCP reset while the request is being read (not forwarded)
``status``     ``status`` (500/502/503/404/...) with a JSON ``detail`` (not forwarded)
``rate``       429 ``Rate limit exceeded``, with ``Retry-After: retry_after`` if set
``garbage``    200 with an HTML body
``wrong``      200 with valid JSON of the wrong shape for that endpoint
``truncate``   the answer's headers and half its body, then the connection closes
``drop_answer`` forwarded; the connection closes without the answer
``hold``       parked until :meth:`FaultProxy.release` (forwarded or discarded then)
``hold_answer`` forwarded; the answer is parked until :meth:`FaultProxy.release`
============== ======================================================================

Any fault may carry ``rewrite``: a function applied to a forwarded 2xx answer's body (a
coordinator that hands out payloads the local one would refuse).

``garbage``, ``wrong``, ``truncate`` and ``status`` take ``forward=True`` to let the
coordinator act first. Every exchange is recorded (:attr:`FaultProxy.records`) with the
endpoint, job id, fault, the coordinator's status (when forwarded) and the status the
miner received, so tests can count what was accepted. When the miner hangs up while its
request is being forwarded (a killed process), the upstream request is cancelled too, as
the kernel would have closed a direct connection.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.reliability.faults import PASS, WRONG_SHAPES, Fault, Plan, Record, Request, body_facts, parse_endpoint

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "te", "upgrade",
              "proxy-connection", "trailer"}
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 4 * 1024 * 1024


class _Hold:
    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.forward = False


class FaultProxy:
    """The proxy (see the module docstring). ``start()``/``stop()``; ``url`` is what the miner uses.

    ``plan`` may be replaced at any time (:meth:`set_plan`); it is called on the proxy's
    thread and must be quick.
    """

    def __init__(self, upstream: str, plan: Plan | None = None, *, seed: int = 0) -> None:
        self.upstream = upstream.rstrip("/")
        self._plan: Plan = plan or (lambda request: PASS)
        self._rng = random.Random(seed)
        self.records: list[Record] = []
        self.counts: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._client: httpx.AsyncClient | None = None
        self._holds: list[_Hold] = []
        self._connections: set[asyncio.Task[Any]] = set()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.port = 0

    # -- control (any thread) -------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_plan(self, plan: Plan) -> None:
        self._plan = plan

    def start(self) -> None:
        ready = threading.Event()
        errors: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._open())
            except BaseException as exc:  # surfaced to the starting thread
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._close())
            loop.close()

        self._thread = threading.Thread(target=main, name="fault-proxy", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors or not self.port:
            raise RuntimeError(f"the fault proxy did not start: {errors or 'timeout'}")

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(15)
        self._loop = self._thread = None

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def release(self, *, forward: bool) -> None:
        """Let every parked request or answer go on (``forward``) or drop it (close)."""
        loop = self._loop
        if loop is None:
            return

        def go() -> None:
            holds, self._holds = self._holds, []
            for hold in holds:
                hold.forward = forward
                hold.event.set()

        loop.call_soon_threadsafe(go)

    def held(self) -> int:
        with self._lock:
            return sum(1 for r in self.records if r.fault in ("hold", "hold_answer") and r.sent_status is None)

    def snapshot(self) -> list[Record]:
        with self._lock:
            return list(self.records)

    def wait_for(self, predicate: Callable[[list[Record]], bool], timeout: float) -> bool:
        """Wait until ``predicate(records)`` holds; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self.records):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.5))
        return True

    # -- the server (proxy thread) ---------------------------------------------------------

    async def _open(self) -> None:
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(None), trust_env=False,
                                         limits=httpx.Limits(max_keepalive_connections=32))
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    def _record(self, record: Record) -> Record:
        with self._changed:
            self.records.append(record)
            self._changed.notify_all()
        return record

    def _touch(self) -> None:
        with self._changed:
            self._changed.notify_all()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while True:
                keep = await self._one(reader, writer)
                if not keep:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], int] | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        if len(head) > MAX_HEADER_BYTES:
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        return method, path, headers, min(length, MAX_BODY_BYTES)

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        parsed = await self._read_request(reader)
        if parsed is None:
            return False
        method, path, headers, length = parsed
        endpoint, job_id = parse_endpoint(path)
        with self._lock:
            self.counts[endpoint] = self.counts.get(endpoint, 0) + 1
            number = self.counts[endpoint]
        # The plan is asked before the body is read, so ``reset`` can strike mid-request.
        probe = Request(method, path, headers, b"", endpoint, job_id, number)
        fault = self._plan(probe)
        if fault.kind == "reset":
            if length:
                await reader.readexactly(max(0, length // 2))
            self._record(Record(time.time(), endpoint, job_id, fault.label()))
            _abort(writer)
            return False
        body = await reader.readexactly(length) if length else b""
        request = Request(method, path, headers, body, endpoint, job_id, number)
        record = self._record(Record(time.time(), endpoint, job_id, fault.label(), **body_facts(endpoint, request)))
        if fault.delay_s:
            await asyncio.sleep(fault.delay_s)
        if fault.kind == "drop":
            return False
        if fault.kind == "hold":
            hold = _Hold()
            self._holds.append(hold)
            if not await self._wait_hold(hold, reader):
                return False
        if fault.kind in ("status", "rate", "garbage", "wrong") and not fault.forward:
            return await self._send_fault(writer, record, fault, endpoint)

        upstream = await self._forward(request, reader)
        if upstream is None:  # the miner hung up; the upstream request was cancelled
            return False
        status, up_headers, content = upstream
        record.upstream_status = status
        record.upstream_body = _json_or_none(content)
        if fault.rewrite is not None and 200 <= status < 300 and content:
            content = fault.rewrite(content)
        self._touch()
        if fault.kind == "drop_answer":
            return False
        if fault.kind == "hold_answer":
            hold = _Hold()
            self._holds.append(hold)
            if not await self._wait_hold(hold, reader):
                return False
        if fault.kind in ("status", "rate", "garbage", "wrong"):
            return await self._send_fault(writer, record, fault, endpoint)
        if fault.kind == "truncate" and content:
            await self._write(writer, status, up_headers, content, truncate=True)
            record.sent_status = status
            self._touch()
            return False
        await self._write(writer, status, up_headers, content)
        record.sent_status = status
        self._touch()
        return headers.get("connection", "").lower() != "close"

    async def _wait_hold(self, hold: _Hold, reader: asyncio.StreamReader) -> bool:
        """Park until released; False when dropped or when the miner hung up meanwhile."""
        gone = asyncio.ensure_future(reader.read(1))
        released = asyncio.ensure_future(hold.event.wait())
        try:
            await asyncio.wait({gone, released}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            released.cancel()
            await asyncio.gather(gone, released, return_exceptions=True)
        return released.done() and not released.cancelled() and hold.forward and not (gone.done() and not gone.cancelled())

    async def _forward(self, request: Request, reader: asyncio.StreamReader) -> tuple[int, list[tuple[str, str]], bytes] | None:
        assert self._client is not None
        headers = [(k, v) for k, v in request.headers.items() if k not in HOP_BY_HOP]
        call = asyncio.ensure_future(
            self._client.request(request.method, self.upstream + request.path, headers=headers, content=request.body)
        )
        gone = asyncio.ensure_future(reader.read(1))  # EOF: the miner went away (HTTP/1.1, no pipelining)
        try:
            await asyncio.wait({call, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not call.done():
                call.cancel()
                await asyncio.gather(call, return_exceptions=True)
            gone.cancel()
            await asyncio.gather(gone, return_exceptions=True)
        if not call.done() or call.cancelled():
            return None
        try:
            response = call.result()
        except httpx.HTTPError:
            return 502, [("content-type", "application/json")], b'{"detail": "upstream unavailable"}'
        out_headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in HOP_BY_HOP]
        return response.status_code, out_headers, response.content

    async def _send_fault(self, writer: asyncio.StreamWriter, record: Record, fault: Fault, endpoint: str) -> bool:
        json_type = [("content-type", "application/json")]
        if fault.kind == "status":
            detail = "miner not registered" if fault.status == 404 else "injected fault"
            status, headers, content = fault.status, json_type, json.dumps({"detail": detail}).encode()
        elif fault.kind == "rate":
            headers = json_type + ([("retry-after", fault.retry_after)] if fault.retry_after is not None else [])
            record.retry_after = fault.retry_after
            status, content = 429, b'{"detail": "Rate limit exceeded"}'
        elif fault.kind == "garbage":
            status, headers, content = 200, [("content-type", "text/html")], b"<html><body>502 Bad Gateway</body></html>"
        else:
            shapes = WRONG_SHAPES.get(endpoint, ({"unexpected": True},))
            status, headers, content = 200, json_type, json.dumps(self._rng.choice(list(shapes))).encode()
        await self._write(writer, status, headers, content)
        record.sent_status = status
        self._touch()
        return True

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, status: int, headers: list[tuple[str, str]], content: bytes,
                     *, truncate: bool = False) -> None:
        lines = [f"HTTP/1.1 {status} X"]
        lines += [f"{k}: {v}" for k, v in headers]
        lines.append(f"content-length: {len(content)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        writer.write(content[: len(content) // 2] if truncate else content)
        await writer.drain()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0) rather than a clean FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport = writer.transport
    transport.abort()


def _json_or_none(content: bytes) -> Any:
    try:
        return json.loads(content) if content else None
    except ValueError:
        return None


__all__ = ["FaultProxy"]
