"""The daemon for the soak, as ``aitbc-miner run`` builds it, plus a sampler of its asyncio
task count (the one figure /proc cannot give).

``python -m tests.reliability.soak_miner --config miner.toml --samples tasks.jsonl``
appends ``{"t": unix seconds, "tasks": n}`` every ``--interval`` seconds. The sampler's own
task is not counted. With ``--tracemalloc`` each line also carries ``py_heap_kib``, the
memory held by Python objects (``tracemalloc``), which tells a leak from allocator
settling when RSS moves (it slows the daemon down); ``--snapshot-at`` dumps heap snapshots
to compare with ``tracemalloc.Snapshot.load``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import tracemalloc
from pathlib import Path


async def _sample(path: Path, interval: float, snapshot_at: list[float]) -> None:
    me = asyncio.current_task()
    started = time.monotonic()
    pending = sorted(snapshot_at)
    with path.open("a", encoding="utf-8") as out:
        while True:
            if pending and tracemalloc.is_tracing() and time.monotonic() - started >= pending[0]:
                tracemalloc.take_snapshot().dump(str(path.with_name(f"{path.name}.{pending.pop(0):g}s.snapshot")))
            line: dict[str, float] = {"t": time.time(), "tasks": sum(1 for t in asyncio.all_tasks() if t is not me and not t.done())}
            if tracemalloc.is_tracing():
                line["py_heap_kib"] = round(tracemalloc.get_traced_memory()[0] / 1024, 1)
            out.write(json.dumps(line) + "\n")
            out.flush()
            await asyncio.sleep(interval)


async def _serve(config: Path, samples: Path, interval: float, exit_when_idle: float | None,
                 snapshot_at: list[float]) -> int:
    from miner.daemon.agent import Agent
    from miner.daemon.settings import load_settings
    from miner.ops.logs import configure_logging

    settings = load_settings(config)
    configure_logging(settings.log.level, settings.log.format)
    agent = Agent(settings, exit_when_idle=exit_when_idle)
    sampler = asyncio.create_task(_sample(samples, interval, snapshot_at), name="soak-sampler")
    try:
        return await agent.serve()
    finally:
        sampler.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--samples", type=Path, required=True)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--exit-when-idle", type=float, default=None)
    parser.add_argument("--tracemalloc", action="store_true", help="also sample the Python heap (slower)")
    parser.add_argument("--snapshot-at", type=float, action="append", default=[], metavar="SECONDS",
                        help="with --tracemalloc: dump a heap snapshot next to --samples at this age (repeatable)")
    args = parser.parse_args(argv)
    if args.tracemalloc:
        tracemalloc.start()
    return asyncio.run(_serve(args.config, args.samples, args.interval, args.exit_when_idle, args.snapshot_at))


if __name__ == "__main__":
    sys.exit(main())
