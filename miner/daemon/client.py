"""CoordinatorClient: the miner's side of the coordinator's miner API, over one httpx client.

Every failure leaves this module as one of the :mod:`miner.wire.errors` coordinator errors:

=====================================================  ===========================
what happened                                          raised
=====================================================  ===========================
connection refused/reset, timeout, 5xx, an answer       :class:`CoordinatorUnavailable`
that is not JSON or not the expected shape
429 (``retry_after`` from ``Retry-After``)              :class:`RateLimited`
404 to a heartbeat, or "miner not registered" to any   :class:`NotRegistered`
401 / 403                                               :class:`AuthenticationFailed`
any other 4xx                                           :class:`CoordinatorRejected`
=====================================================  ===========================

After a 429 the client remembers, per endpoint, until when it was told to wait, and
refuses calls to that endpoint before then (raising :class:`RateLimited` with the time
left) without touching the network.
"""

from __future__ import annotations

import math
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import structlog

from miner import __version__
from miner.wire.errors import (
    AuthenticationFailed,
    ConfigError,
    CoordinatorError,
    CoordinatorRejected,
    CoordinatorUnavailable,
    NotRegistered,
    RateLimited,
)
from miner.wire.protocol import parse_timestamp

log = structlog.get_logger("miner.daemon.client")

DEFAULT_RETRY_AFTER_S = 60.0
NOT_REGISTERED = "not registered"  # in the 404 detail of any miner call from a coordinator that forgot us
MAX_RETRY_AFTER_S = 3600.0


@dataclass(frozen=True)
class AssignedJob:
    """A job the coordinator handed to this miner by ``poll``.

    ``payload`` and ``constraints`` are as received (not yet validated: admission does
    that). ``payload_error`` is set when the answer named a job but its payload is not an
    object: the job must be failed ``INVALID_PAYLOAD``. ``expires_at`` is aware UTC.
    """

    job_id: str
    payload: Any
    constraints: Any = None
    expires_at: datetime | None = None
    ttl_seconds: float | None = None
    payload_error: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


def parse_retry_after(value: str | None, *, now: float | None = None, default: float = DEFAULT_RETRY_AFTER_S) -> float:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date.

    Missing or garbled values give ``default``; the result is clamped to [0, 1 hour].
    """
    if value is None or not value.strip():
        return default
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return default
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return default
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def parse_assigned_job(data: Any) -> AssignedJob:
    """Validate a poll answer. No usable ``job_id`` → :class:`CoordinatorUnavailable`."""
    if not isinstance(data, dict):
        raise CoordinatorUnavailable(f"poll answer is {type(data).__name__}, not an object", endpoint="poll")
    job_id = data.get("job_id")
    if not isinstance(job_id, str) or not job_id.strip() or len(job_id) > 512:
        raise CoordinatorUnavailable("poll answer has no usable string job_id", endpoint="poll")
    payload = data.get("payload")
    payload_error = None
    if not isinstance(payload, dict):
        payload_error = f"payload must be an object, got {type(payload).__name__}"
    expires_at = None
    raw_expiry = data.get("expires_at")
    if isinstance(raw_expiry, str):
        try:
            expires_at = parse_timestamp(raw_expiry)
        except ValueError:
            log.warning("poll_expires_at_unreadable", job_id=job_id)
    ttl = data.get("ttl_seconds")
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or ttl <= 0:
        ttl = None
    return AssignedJob(
        job_id=job_id,
        payload=payload,
        constraints=data.get("constraints"),
        expires_at=expires_at,
        ttl_seconds=None if ttl is None else float(ttl),
        payload_error=payload_error,
        raw=data,
    )


def _detail(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(data, dict) and "detail" in data:
        return str(data["detail"])[:300]
    return str(data)[:200]


class CoordinatorClient:
    """Async client for ``/v1/miners/*``. One ``httpx.AsyncClient``, closed by :meth:`aclose`.

    Contract: each call either returns the validated answer or raises one of the
    coordinator errors in the module docstring; it never raises an httpx or JSON error.
    Pass ``transport`` (e.g. ``httpx.MockTransport``) or a ready ``client`` in tests.
    ``observe(endpoint, seconds, error_kind)`` is called after every request (metrics).
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str,
        miner_id: str,
        timeout_s: float = 10.0,
        ca_file: Path | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        client: httpx.AsyncClient | None = None,
        observe: Callable[[str, float, str | None], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.miner_id = miner_id
        self.timeout_s = timeout_s
        self._observe = observe
        self._clock = clock
        self._blocked_until: dict[str, float] = {}
        for setting, value in (("coordinator.api_key", api_key), ("miner_id", miner_id)):
            if not value.isascii() or not value.isprintable() or value != value.strip():
                raise ConfigError(
                    f"{setting}: must be printable ASCII without spaces around it (it is sent as an HTTP header)"
                )
        headers = {
            "X-Api-Key": api_key,
            "X-Miner-ID": miner_id,
            "User-Agent": f"aitbc-miner/{__version__}",
        }
        if client is not None:
            client.headers.update(headers)
            self._client = client
        else:
            verify: ssl.SSLContext | bool = True
            if ca_file is not None:
                try:
                    verify = ssl.create_default_context(cafile=str(ca_file))
                except (OSError, ssl.SSLError) as exc:
                    raise ConfigError(
                        f"coordinator.ca_file: cannot load a CA bundle from {ca_file}: {exc}; point it at a PEM file"
                    ) from exc
            self._client = httpx.AsyncClient(
                headers=headers,
                timeout=httpx.Timeout(timeout_s),
                transport=transport,
                verify=verify,
                trust_env=False,
            )

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- the miner calls -------------------------------------------------------------

    async def register(
        self, capabilities: dict[str, Any], concurrency: int, region: str | None, held_jobs: list[str] | None = None
    ) -> dict[str, Any]:
        """Register; ``held_jobs`` names the jobs this miner still holds (not requeued by the coordinator)."""
        body = {
            "capabilities": capabilities,
            "concurrency": concurrency,
            "region": region,
            "held_jobs": held_jobs or [],
        }
        answer = await self._request("register", "/v1/miners/register", body)
        return self._object(answer, "register")

    async def heartbeat(
        self, inflight: int, status: str = "ONLINE", metadata: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Returns the answer; ``cancelled_jobs`` is always present (a list of job ids)."""
        body = {"inflight": inflight, "status": status, "metadata": metadata or {}}
        answer = self._object(await self._request("heartbeat", "/v1/miners/heartbeat", body), "heartbeat")
        cancelled = answer.get("cancelled_jobs")
        if cancelled is None:
            answer["cancelled_jobs"] = []
        elif isinstance(cancelled, list):
            answer["cancelled_jobs"] = [j for j in cancelled if isinstance(j, str)]
        else:
            log.warning("heartbeat_cancelled_jobs_invalid")
            answer["cancelled_jobs"] = []
        return answer

    async def poll(self, max_wait_s: float) -> AssignedJob | None:
        """Claim one job; ``None`` when the coordinator has none (204)."""
        body = {"max_wait_seconds": max(0, math.ceil(max_wait_s))}
        timeout = httpx.Timeout(self.timeout_s + max(0.0, max_wait_s))
        answer = await self._request("poll", "/v1/miners/poll", body, timeout=timeout)
        if answer is None:
            return None
        return parse_assigned_job(answer)

    async def submit_result(self, job_id: str, body: dict[str, Any]) -> dict[str, Any]:
        answer = await self._request("result", f"/v1/miners/{_quote(job_id)}/result", body)
        return self._object(answer, "result")

    async def fail(self, job_id: str, code: str, message: str, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        body = {"error_code": code, "error_message": message or code, "metrics": metrics or {}}
        answer = await self._request("fail", f"/v1/miners/{_quote(job_id)}/fail", body)
        return self._object(answer, "fail")

    # -- plumbing --------------------------------------------------------------------

    def retry_after(self, endpoint: str) -> float:
        """Seconds until ``endpoint`` may be called again after a 429 (0 when free)."""
        return max(0.0, self._blocked_until.get(endpoint, 0.0) - self._clock())

    @staticmethod
    def _object(answer: Any, endpoint: str) -> dict[str, Any]:
        if answer is None:
            return {}
        if not isinstance(answer, dict):
            raise CoordinatorUnavailable(
                f"{endpoint} answer is {type(answer).__name__}, not an object", endpoint=endpoint
            )
        return answer

    def _note(self, endpoint: str, started: float, error: str | None) -> None:
        if self._observe is not None:
            self._observe(endpoint, self._clock() - started, error)

    def _status_error(self, endpoint: str, response: httpx.Response) -> CoordinatorError | None:
        """The error a non-2xx answer stands for (``None`` for 2xx); a 429 also blocks ``endpoint``."""
        status = response.status_code
        if 200 <= status < 300:
            return None
        where = f"{endpoint}: HTTP {status}: {_detail(response)}"
        if status == 429:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            self._blocked_until[endpoint] = self._clock() + retry_after
            return RateLimited(
                f"{endpoint}: rate limited; retry after {retry_after:g}s", retry_after=retry_after, endpoint=endpoint
            )
        if status >= 500:
            return CoordinatorUnavailable(where, endpoint=endpoint, status=status)
        if status in (401, 403):
            return AuthenticationFailed(
                f"{where}; check coordinator.api_key and miner_id", endpoint=endpoint, status=status
            )
        if status == 404 and (endpoint == "heartbeat" or NOT_REGISTERED in _detail(response).lower()):
            return NotRegistered(where, endpoint=endpoint, status=status)
        if status >= 400:
            return CoordinatorRejected(where, endpoint=endpoint, status=status)
        return CoordinatorUnavailable(f"{endpoint}: unexpected HTTP {status}", endpoint=endpoint, status=status)

    async def _request(
        self, endpoint: str, path: str, body: dict[str, Any], *, timeout: httpx.Timeout | None = None
    ) -> Any:
        """POST ``body`` to ``path``; the decoded JSON answer, or ``None`` for an empty 2xx."""
        wait = self.retry_after(endpoint)
        if wait > 0:
            raise RateLimited(f"{endpoint}: rate limited for another {wait:.1f}s", retry_after=wait, endpoint=endpoint)
        started = self._clock()
        try:
            kwargs: dict[str, Any] = {"json": body}
            if timeout is not None:
                kwargs["timeout"] = timeout
            response = await self._client.post(self.base_url + path, **kwargs)
        except httpx.TimeoutException as exc:
            self._note(endpoint, started, "timeout")
            raise CoordinatorUnavailable(f"{endpoint}: timed out ({type(exc).__name__})", endpoint=endpoint) from exc
        except httpx.HTTPError as exc:
            self._note(endpoint, started, "connect")
            raise CoordinatorUnavailable(f"{endpoint}: {type(exc).__name__}: {exc}", endpoint=endpoint) from exc
        error = self._status_error(endpoint, response)
        if error is not None:
            self._note(endpoint, started, _error_kind(response.status_code))
            raise error
        status = response.status_code
        if status == 204 or not response.content.strip():
            self._note(endpoint, started, None)
            return None
        try:
            data = response.json()
        except ValueError as exc:
            self._note(endpoint, started, "bad_answer")
            raise CoordinatorUnavailable(
                f"{endpoint}: the answer is not JSON", endpoint=endpoint, status=status
            ) from exc
        self._note(endpoint, started, None)
        return data


def _error_kind(status: int) -> str:
    """The metrics label of a failed answer."""
    if status == 429:
        return "429"
    if status >= 500:
        return "5xx"
    return "4xx" if status >= 400 else "bad_answer"


def _quote(job_id: str) -> str:
    return quote(job_id, safe="")
