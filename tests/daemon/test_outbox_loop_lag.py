"""Loop lag under slow fsync: the event loop keeps its pace while the outbox waits for the disk.

Run with ``-s`` to see the figures (docs/RELIABILITY.md quotes them)::

    .venv/bin/python -m pytest -q -s tests/daemon/test_outbox_loop_lag.py
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path

from miner.outbox.store import Outbox, OutboxEntry

FSYNC_S = 0.4  # a disk this slow to sync (a busy SD card, network storage)
TICK_S = 0.010
JOBS = 10
RECOVERS = 2


def slow_fsync(fd: int) -> None:
    """fsync that takes FSYNC_S longer than the real one."""
    time.sleep(FSYNC_S)
    os.fsync(fd)


async def _probe(lags: list[float], stop: asyncio.Event, box: Outbox) -> None:
    """Sleep TICK_S again and again, recording how late each wake-up is; read the index as the daemon does.

    A lag is the time between two wake-ups beyond TICK_S, so a read that blocked counts too.
    """
    last = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(TICK_S)
        now = time.perf_counter()
        lags.append(now - last - TICK_S)
        last = now
        len(box), box.pending(), box.state("job-0"), box.healthy  # the loop's cheap reads


async def _job(box: Outbox, i: int) -> None:
    await box.put(OutboxEntry(f"job-{i}", "result", {"result": {"output": f"out {i}"}, "metrics": {}}))
    await box.ack(f"job-{i}")


def test_slow_fsync_does_not_stall_the_event_loop(tmp_path: Path) -> None:
    """With every fsync taking 0.4 s, 10 puts + 10 acks + 2 recovers leave the loop's p99 wake-up lag under 100 ms."""

    async def scenario() -> tuple[list[float], float]:
        box = Outbox(tmp_path, fsync=slow_fsync)
        await box.open()
        lags: list[float] = []
        stop = asyncio.Event()
        probe = asyncio.create_task(_probe(lags, stop, box))
        began = time.perf_counter()
        await asyncio.gather(*(_job(box, i) for i in range(JOBS)), *(box.recover() for _ in range(RECOVERS)))
        took = time.perf_counter() - began
        stop.set()
        await probe
        assert len(box) == 0 and box.state(f"job-{JOBS - 1}") == "acked" and box.healthy
        await box.aclose()
        return lags, took

    lags, took = asyncio.run(scenario())
    ms = sorted(lag * 1000 for lag in lags)
    p50, p99 = statistics.median(ms), statistics.quantiles(ms, n=100, method="inclusive")[98]
    print(
        f"\nloop lag with fsync +{FSYNC_S}s, {JOBS} puts + {JOBS} acks + {RECOVERS} recovers in {took:.1f}s: "
        f"{len(ms)} wake-ups, p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {ms[-1]:.1f} ms"
    )
    assert len(ms) > 100  # the probe really ran through the disk work
    assert p99 < 100.0, f"the event loop stalled: p99 lag {p99:.1f} ms (max {ms[-1]:.1f} ms)"
