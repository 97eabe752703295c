"""Fault plans for the proxy: a deterministic schedule that covers every fault kind, and the
catalogue of faults the coordinator-faults scenario injects."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence

from tests.reliability.faults import PASS, Fault, Record, Request

# Faults that strike before the coordinator sees the request: safe on every endpoint.
BEFORE = (
    Fault("pass", delay_s=0.4),
    Fault("drop"),
    Fault("reset"),
    Fault("status", 500),
    Fault("status", 502),
    Fault("status", 503),
    Fault("rate", retry_after="1"),
    Fault("rate", retry_after="0"),
    Fault("garbage"),
    Fault("wrong"),
)
# Faults that strike after the coordinator acted: the miner does not learn the answer.
AFTER = (
    Fault("truncate"),
    Fault("drop_answer"),
    Fault("status", 502, forward=True),
    Fault("garbage", forward=True),
)
# A coordinator that forgets the miner answers its heartbeat with 404.
FORGET = Fault("status", 404)


class ScheduledPlan:
    """Fault every ``every``-th request of each endpoint, cycling through that endpoint's list.

    Poll answers are only faulted before forwarding (a poll answer lost after the
    coordinator assigned a job is its own scenario); the heartbeat's cycle includes the
    404 "miner not registered". Deterministic for a given request order, and it covers
    every kind once each endpoint has seen ``every * len(cycle)`` requests.
    """

    def __init__(self, every: int = 2, *, before: Sequence[Fault] = BEFORE, after: Sequence[Fault] = AFTER,
                 forget: Fault | None = FORGET) -> None:
        self.every = every
        self.cycles: dict[str, list[Fault]] = {
            "poll": list(before),
            "heartbeat": [*([forget] if forget else []), *before, *after],
            "register": [*before, *after],
            "result": [*before, *after],
            "fail": [*before, *after],
        }
        self.enabled = True
        self._seen: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, request: Request) -> Fault:
        cycle = self.cycles.get(request.endpoint)
        if not self.enabled or not cycle:
            return PASS
        with self._lock:
            self._seen[request.endpoint] += 1
            n = self._seen[request.endpoint]
        if n % self.every:
            return PASS
        return cycle[(n // self.every - 1) % len(cycle)]


def injected(records: Sequence[Record]) -> Counter[str]:
    """How many faults of each kind were injected (``pass`` without delay not counted)."""
    return Counter(r.fault for r in records if r.fault != "pass")


def retry_after_violations(records: Sequence[Record], slack_s: float = 0.05) -> list[str]:
    """Requests sent to an endpoint sooner than an injected 429's ``Retry-After`` allowed."""
    out = []
    for i, r in enumerate(records):
        if r.sent_status != 429 or r.retry_after is None:
            continue
        wait = float(r.retry_after)
        for later in records[i + 1:]:
            if later.endpoint == r.endpoint and r.at + slack_s < later.at < r.at + wait - slack_s:
                out.append(f"{later.endpoint} {later.at - r.at:.2f}s after a 429 asking for {wait:g}s")
    return out
