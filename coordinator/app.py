"""The FastAPI app factory of the local coordinator.

``create_app`` does no I/O: the SQLite file is opened, the coordinator's receipt key
loaded (created beside the database the first time), and the sweeper task started, by
the app's lifespan, so one factory call serves one server run. docs/protocol.md describes
the API it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordinator.client_api import router as client_router
from coordinator.dispatch import Dispatcher
from coordinator.errors import ApiError
from coordinator.miner_api import router as miner_router
from coordinator.public_api import router as public_router
from coordinator.quirks import Behaviour, MinerRateLimits, behaviour_for
from coordinator.ratelimit import ClientRateLimits
from coordinator.signing import load_or_create_receipt_key, receipt_key_path
from coordinator.state import AppConfig
from coordinator.store import Store

DEFAULT_RATE_LIMITS = ClientRateLimits()


class BodyLimit:
    """Refuse a request body over ``max_bytes`` with 413 (declared or streamed size)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = HTTPException(
            413, f"request body is larger than {self.max_bytes} bytes; send a smaller payload"
        )
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await JSONResponse({"detail": too_large.detail}, status_code=413)(scope, receive, send)
                    return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_large
            return message

        await self.app(scope, counting_receive, send)


def _format_validation(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        loc = ".".join(str(p) for p in error.get("loc", ()))
        message = str(error.get("msg", "invalid"))
        if error.get("type") == "json_invalid":
            message = f"malformed JSON ({error.get('ctx', {}).get('error', 'decode error')})"
            loc = "body"
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
            if message.startswith("body"):
                loc = ""
        parts.append(f"{loc}: {message}" if loc else message)
    return "; ".join(parts) or "invalid request"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        malformed = any(e.get("type") == "json_invalid" for e in exc.errors())
        detail = _format_validation(exc)
        content_type = request.headers.get("content-type", "")
        if request.headers.get("content-length", "0") != "0" and "json" not in content_type:
            detail += "; send the body as JSON with Content-Type: application/json"
        return JSONResponse({"detail": detail}, status_code=400 if malformed else 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400 and detail == "There was an error parsing the body":
            detail = "body: cannot be parsed as JSON (nested too deeply or not UTF-8?)"
        elif exc.status_code == 405:
            detail = "method not allowed on this path"
        elif exc.status_code == 404 and detail == "Not Found":
            detail = "no such endpoint; see /docs or /openapi.json"
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))


def create_app(
    db_path: Path | str,
    *,
    client_keys: Iterable[str],
    miner_keys: Iterable[str],
    lease_seconds: float = 60.0,
    rate_limits: ClientRateLimits | None = DEFAULT_RATE_LIMITS,
    quirks: str | Behaviour | None = None,
    miner_rate_limits: MinerRateLimits | None = None,
    max_body_bytes: int = 1 << 20,
    max_poll_wait: float = 30.0,
    clock: Callable[[], float] = time.time,
    require_receipts: bool = False,
    unheld_grace_s: float = 5.0,
    receipt_key_file: Path | str | None = None,
) -> FastAPI:
    """Build the coordinator app.

    ``rate_limits=None`` disables the per-client-key limits; ``quirks="reference"``
    emulates the reference service (see :mod:`coordinator.quirks`), whose miner rate
    limits ``miner_rate_limits`` replaces. ``require_receipts`` refuses results without
    a signed receipt. A RUNNING job assigned over ``unheld_grace_s`` ago that its miner's
    heartbeat does not list (``metadata.jobs``) never reached the miner and is requeued.
    ``receipt_key_file`` is the coordinator's receipt key (default: beside the database,
    ``<db file>.receipt-key``); it is created, mode 0600, when absent.
    """
    config = AppConfig(
        db_path=Path(db_path),
        client_keys=frozenset(client_keys),
        miner_keys=frozenset(miner_keys),
        lease_seconds=lease_seconds,
        rate_limits=rate_limits,
        behaviour=behaviour_for(quirks, miner_rate_limits),
        max_body_bytes=max_body_bytes,
        max_poll_wait=max_poll_wait,
        clock=clock,
        require_receipts=require_receipts,
        unheld_grace_s=unheld_grace_s,
        receipt_key_file=Path(receipt_key_file) if receipt_key_file is not None else receipt_key_path(Path(db_path)),
    )
    if not config.client_keys or not config.miner_keys:
        raise ValueError("the coordinator needs at least one client key and one miner key")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.receipt_key = load_or_create_receipt_key(config.receipt_key_file)
        store = Store(config.db_path)
        dispatcher = Dispatcher(store, config.behaviour, lease_seconds=config.lease_seconds,
                                max_poll_wait=config.max_poll_wait, unheld_grace_s=config.unheld_grace_s,
                                clock=config.clock)
        app.state.dispatcher = dispatcher
        sweeper = asyncio.create_task(dispatcher.run_sweeper(), name="coordinator-sweeper")
        try:
            yield
        finally:
            dispatcher.release_waiters()
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            store.close()

    app = FastAPI(
        title="AITBC local coordinator",
        version="1.0",
        description="The published AITBC Coordinator API plus the miner endpoints, on one machine "
        "(docs/protocol.md). Payments are a SIMULATED ledger: no funds move.",
        lifespan=lifespan,
    )
    app.state.config = config
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    _install_error_handlers(app)
    app.include_router(public_router)
    app.include_router(client_router)
    app.include_router(miner_router)
    return app
