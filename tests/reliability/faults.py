"""The faults the proxy injects, and what it records: shared by the proxy and the plans.

A :class:`Fault` says what to do with one request (see :mod:`tests.reliability.faultproxy`
for the kinds); a *plan* is any callable ``Request -> Fault``; every exchange leaves a
:class:`Record`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

ENDPOINTS = ("register", "heartbeat", "poll", "result", "fail")

# What a buggy or hostile coordinator might send instead of the documented answer.
WRONG_SHAPES: dict[str, Sequence[Any]] = {
    "poll": ({"job_id": 42, "payload": "not an object"}, ["job"], {"job_id": None}, "job-1", {"job_id": ""}),
    "heartbeat": ({"status": 1, "cancelled_jobs": {"a": 1}}, [], {"cancelled_jobs": "all"}, 17),
    "register": ([], "ok", {"status": None, "session_token": 5}),
    "result": ("ok", [1, 2], 3.5),
    "fail": ("ok", [None], 0),
}


@dataclass(frozen=True)
class Fault:
    """One injected fault (the kinds are listed in :mod:`tests.reliability.faultproxy`)."""

    kind: str = "pass"
    status: int = 503
    retry_after: str | None = None
    delay_s: float = 0.0
    forward: bool = False
    rewrite: Callable[[bytes], bytes] | None = None  # applied to a forwarded 2xx answer's body

    def label(self) -> str:
        if self.kind == "status":
            return f"{self.status}{' after forward' if self.forward else ''}"
        if self.kind == "rate":
            return "429 Retry-After" if self.retry_after is not None else "429 no Retry-After"
        if self.kind == "pass" and self.delay_s:
            return "delay"
        if self.kind in ("garbage", "wrong") and self.forward:
            return f"{self.kind} after forward"
        return self.kind


PASS = Fault()


@dataclass
class Request:
    """A parsed request as the plan sees it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    endpoint: str
    job_id: str | None
    number: int  # 1-based count of requests to this endpoint so far

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except ValueError:
            return None


@dataclass
class Record:
    """One exchange: what was asked, what was injected, what each side saw."""

    at: float
    endpoint: str
    job_id: str | None
    fault: str
    upstream_status: int | None = None  # the coordinator's answer, when forwarded
    sent_status: int | None = None  # what the miner received (None: no answer)
    receipt_id: str | None = None
    error_code: str | None = None
    retry_after: str | None = None  # the Retry-After header of an injected 429
    upstream_body: Any = None


Plan = Callable[[Request], Fault]


def parse_endpoint(path: str) -> tuple[str, str | None]:
    """``/v1/miners/poll`` → ``("poll", None)``; ``/v1/miners/J/result`` → ``("result", "J")``."""
    parts = path.split("?", 1)[0].strip("/").split("/")
    if len(parts) == 3 and parts[:2] == ["v1", "miners"]:
        return parts[2], None
    if len(parts) == 4 and parts[:2] == ["v1", "miners"]:
        return parts[3], unquote(parts[2])
    return "other", None


def body_facts(endpoint: str, request: Request) -> dict[str, Any]:
    data = request.json()
    if not isinstance(data, dict):
        return {}
    if endpoint == "result":
        receipt = (data.get("result") or {}).get("receipt") if isinstance(data.get("result"), dict) else None
        if isinstance(receipt, dict) and isinstance(receipt.get("receipt_id"), str):
            return {"receipt_id": receipt["receipt_id"]}
    if endpoint == "fail" and isinstance(data.get("error_code"), str):
        return {"error_code": data["error_code"]}
    return {}
