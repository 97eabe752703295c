"""``aitbc-miner bench``: measure the signed capability benchmark now, and print it.

Loads the settings exactly as ``run`` does, takes the state folder's lock (a miner running
on that folder holds it: one line says to stop it first, exit 1), loads the receipt key,
starts the runners (the models load, as at a miner's start), measures every ready model on
every GPU it has a copy on afresh (:func:`miner.daemon.benchmark.run_benchmarks` with
``fresh``), rewrites ``state_dir/benchmarks.json`` and prints the records: one line per
model and GPU, or with ``--json`` the list of signed records (what the miner publishes in
its capabilities; ``aitbc-miner verify-receipt`` checks them). Logs go to stderr.

Exit status: 0 every model was measured, 1 one failed (a ``benchmark_failed`` line and a
``FAILED`` line on stderr name it) or the state folder is in use, 2 the settings do not load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from miner.wire.errors import StateLocked

if TYPE_CHECKING:  # imported where used: `aitbc-miner --help` builds this parser without loading them
    from miner.daemon.settings import MinerSettings

EXIT_OK = 0
EXIT_FAILED = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``bench`` beside ``--config`` (which the caller adds)."""
    parser.add_argument(
        "--json", action="store_true", help="print the signed records as a JSON list (as published in capabilities)"
    )


def describe(record: dict[str, Any]) -> str:
    """One text line for a record."""
    return (
        f"{record.get('model')} on {record.get('gpu_uuid')}: {record.get('tokens_per_s_b1')} tokens/s at batch 1, "
        f"{record.get('tokens_per_s_batch')} tokens/s at batch {record.get('batch')}, "
        f"first token {record.get('ttft_ms')} ms ({record.get('max_new_tokens')} new tokens, "
        f"measured {record.get('measured_at')})"
    )


def bench_command(args: argparse.Namespace) -> int:
    """Measure and print (see the module docstring); raises ConfigError / MinerError as ``run`` does."""
    from miner.daemon.settings import load_settings
    from miner.ops.logs import configure_logging

    settings = load_settings(args.config)
    configure_logging(settings.log.level, settings.log.format, stream=sys.stderr)  # stdout is the report
    return asyncio.run(_bench(settings, as_json=bool(getattr(args, "json", False))))


def _holder(state_dir: Path) -> str:
    """Who holds the state folder's lock, as its pid file says."""
    from miner.daemon.statelock import LOCK_FILE_NAME

    try:
        pid = (state_dir / LOCK_FILE_NAME).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"


async def _bench(settings: MinerSettings, *, as_json: bool) -> int:
    from miner.daemon.benchmark import CACHE_FILE_NAME, run_benchmarks
    from miner.daemon.keyfile import KEY_FILE_NAME, load_or_create_key
    from miner.daemon.runtime import start_runtime
    from miner.daemon.statelock import StateLock
    from miner.ops.logs import register_secret
    from miner.wire.receipts import key_id

    lock = StateLock(settings.state_dir)
    try:
        lock.acquire()
    except StateLocked as exc:
        raise StateLocked(
            f"the state folder {settings.state_dir} is in use by a running miner ({_holder(settings.state_dir)}); "
            "stop it first (systemctl stop aitbc-miner): bench needs its GPUs and benchmark cache to itself"
        ) from exc
    try:
        for secret in settings.secret_values():
            register_secret(secret)
        key = await asyncio.to_thread(load_or_create_key, settings.state_dir / KEY_FILE_NAME)
        runtime = await start_runtime(settings)
        try:
            report = await run_benchmarks(runtime, settings, key, fresh=True)
        finally:
            await runtime.aclose()
    finally:
        lock.release()
    if as_json:
        print(json.dumps(report.records, indent=2, sort_keys=True))
    else:
        for record in report.records:
            print(describe(record))
        print(f"signed by {key_id(key.verify_key)}; written to {settings.state_dir / CACHE_FILE_NAME}")
    for failure in report.failures:
        print(f"FAILED: {failure.model} on {failure.gpu_uuid}: {failure.code}", file=sys.stderr)
    if not report.records and not report.failures:
        print("no model is ready to measure; see the model_not_ready_after_start lines above", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_FAILED if report.failures else EXIT_OK
