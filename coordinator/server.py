"""``aitbc-miner coordinator``: run the local coordinator under uvicorn.

Keys come from ``--client-key``/``--miner-key`` (repeatable) and from
``AITBC_COORDINATOR_CLIENT_KEYS``/``AITBC_COORDINATOR_MINER_KEYS`` (comma separated).
On loopback, a missing kind of key is generated and printed once; beyond loopback the
coordinator refuses to start without both. The coordinator's receipt key is created
beside the database the first time (mode 0600) and its public ``key_id`` printed at every
start. docs/protocol.md describes the API.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Mapping

from miner.wire.net import is_loopback_host

CLIENT_KEYS_ENV = "AITBC_COORDINATOR_CLIENT_KEYS"
MINER_KEYS_ENV = "AITBC_COORDINATOR_MINER_KEYS"


def collect_keys(given: list[str] | None, env_name: str, environ: Mapping[str, str]) -> list[str]:
    """Keys from the command line, then from the environment variable; blanks dropped."""
    keys = [k.strip() for k in given or [] if k.strip()]
    keys += [k.strip() for k in environ.get(env_name, "").split(",") if k.strip()]
    return list(dict.fromkeys(keys))


def ws_protocol() -> str:
    """uvicorn's sans-I/O websockets implementation where it exists (no deprecation warnings)."""
    from uvicorn.config import WS_PROTOCOLS

    return "websockets-sansio" if "websockets-sansio" in WS_PROTOCOLS else "auto"


def serve_from_cli(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """Run the coordinator until SIGINT/SIGTERM; returns the exit code."""
    environ = os.environ if environ is None else environ
    client_keys = collect_keys(getattr(args, "client_key", None), CLIENT_KEYS_ENV, environ)
    miner_keys = collect_keys(getattr(args, "miner_key", None), MINER_KEYS_ENV, environ)
    if not (client_keys and miner_keys) and not is_loopback_host(args.host):
        print(
            f"error: refusing to listen on {args.host} without keys: pass --client-key and --miner-key "
            f"(or set {CLIENT_KEYS_ENV} and {MINER_KEYS_ENV})",
            file=sys.stderr,
        )
        return 2
    if args.lease_seconds <= 0:
        print("error: --lease-seconds must be positive", file=sys.stderr)
        return 2
    generated = []
    if not client_keys:
        client_keys = [secrets.token_urlsafe(24)]
        generated.append(f"client key: {client_keys[0]}")
    if not miner_keys:
        miner_keys = [secrets.token_urlsafe(24)]
        generated.append(f"miner key:  {miner_keys[0]}")
    if generated:
        print("No keys given; generated for this run (loopback only):\n  " + "\n  ".join(generated), flush=True)

    import uvicorn

    from coordinator.app import create_app
    from coordinator.ratelimit import ClientRateLimits
    from coordinator.signing import ReceiptKeyError, load_or_create_receipt_key, public_key_info, receipt_key_path

    key_path = receipt_key_path(args.db)
    try:
        receipt_key = public_key_info(load_or_create_receipt_key(key_path))["key_id"]
    except ReceiptKeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    quirks = getattr(args, "quirks", None)
    rate_limits = None if getattr(args, "no_rate_limits", False) else ClientRateLimits()
    try:
        app = create_app(args.db, client_keys=client_keys, miner_keys=miner_keys, lease_seconds=args.lease_seconds,
                         quirks=quirks, rate_limits=rate_limits)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"AITBC local coordinator on http://{args.host}:{args.port} (db {args.db}"
          f"{', reference quirks' if quirks else ''})\n"
          f"coordinator receipt key_id: {receipt_key} ({key_path}; also at GET /v1/receipts/key)", flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=getattr(args, "log_level", "info"),
                            ws=ws_protocol(), timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1
