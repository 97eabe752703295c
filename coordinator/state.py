"""What the routes need from the app: its configuration and its dispatcher."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from coordinator.dispatch import Dispatcher
from coordinator.quirks import Behaviour
from coordinator.ratelimit import ClientRateLimits, FixedWindows, TokenBuckets


@dataclass
class AppConfig:
    """Everything :func:`create_app` was given; kept on ``app.state.config``."""

    db_path: Path
    client_keys: frozenset[str]
    miner_keys: frozenset[str]
    lease_seconds: float
    rate_limits: ClientRateLimits | None
    behaviour: Behaviour
    max_body_bytes: int
    max_poll_wait: float
    clock: Callable[[], float]
    require_receipts: bool
    unheld_grace_s: float
    receipt_key_file: Path
    client_buckets: TokenBuckets = field(default_factory=TokenBuckets)
    miner_windows: FixedWindows = field(default_factory=FixedWindows)


def dispatcher_of(request: Any) -> Dispatcher:
    """The running app's dispatcher (created by the lifespan)."""
    return request.app.state.dispatcher


def config_of(request: Any) -> AppConfig:
    return request.app.state.config


def signing_key_of(request: Any) -> SigningKey:
    """The key the coordinator signs its own receipts with (loaded by the lifespan)."""
    return request.app.state.receipt_key
