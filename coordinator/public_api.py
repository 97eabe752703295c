"""Calls without authentication: the health check and the coordinator's receipt key.

``GET /health`` (and ``GET /v1/health``) answers ``{"status": "ok", "version", "db": "ok"}``
as the reference service does (its miner waits for it before registering), or 503 with
``db: "unavailable"`` when the database cannot be read. ``GET /v1/receipts/key`` serves the
public key the coordinator signs its own receipts with.
"""

from __future__ import annotations

from importlib import metadata

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from coordinator.models import HealthView, ReceiptKeyView
from coordinator.signing import public_key_info
from coordinator.state import signing_key_of

router = APIRouter(tags=["public"])


def coordinator_version() -> str:
    """The installed package's version (``0+unknown`` when run from a source tree without metadata)."""
    try:
        return metadata.version("aitbc-miner")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _health(request: Request) -> JSONResponse:
    dispatcher = getattr(request.app.state, "dispatcher", None)
    readable = dispatcher is not None and dispatcher.store.readable()
    body = (HealthView(status="ok", version=coordinator_version(), db="ok") if readable
            else HealthView(status="unavailable", version=coordinator_version(), db="unavailable"))
    return JSONResponse(body.model_dump(), status_code=200 if readable else 503)


@router.get("/health", response_model=HealthView, responses={503: {"model": HealthView}})
async def health(request: Request) -> JSONResponse:
    """Liveness and database check; no authentication."""
    return _health(request)


@router.get("/v1/health", response_model=HealthView, responses={503: {"model": HealthView}})
async def health_v1(request: Request) -> JSONResponse:
    """The same as ``GET /health``."""
    return _health(request)


@router.get("/v1/receipts/key", response_model=ReceiptKeyView)
async def receipt_key(request: Request) -> ReceiptKeyView:
    """The coordinator's receipt-signing public key; its receipts carry it as ``signature.key_id``."""
    return ReceiptKeyView.model_validate(public_key_info(signing_key_of(request)))
