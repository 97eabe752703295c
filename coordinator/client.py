"""A small synchronous Python client for the published Coordinator API.

    with Client("http://127.0.0.1:8011", api_key="...") as client:
        job = client.submit_job({"model": "tiny", "prompt": "Hello"}, ttl_seconds=300)
        done = client.wait(job["job_id"], timeout=60)
        answer = client.get_job_result(job["job_id"])   # {"result": {...}, "receipt": {...}}

Every refusal raises a :class:`CoordinatorClientError` subclass carrying the HTTP status
and the server's ``detail``.
"""

from __future__ import annotations

import threading
import time
from typing import Any
from urllib.parse import quote

import httpx

FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "CANCELED", "EXPIRED"})


class CoordinatorClientError(Exception):
    """The coordinator refused a request (``status``, ``detail``) or could not be reached."""

    def __init__(self, message: str, *, status: int | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


class AuthenticationError(CoordinatorClientError):
    """401: the API key is not one of the coordinator's client keys."""


class JobNotFound(CoordinatorClientError):
    """404: no such job for this key (or no payment/receipt for it)."""


class JobNotReady(CoordinatorClientError):
    """425: the job is still QUEUED or RUNNING; wait for it first."""


class JobConflict(CoordinatorClientError):
    """409: the request does not fit the job's state (e.g. cancelling a finished job)."""


class RateLimitExceeded(CoordinatorClientError):
    """429: retry after ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class WaitTimeout(CoordinatorClientError):
    """:meth:`Client.wait` ran out of time before the job reached a final state."""


_BY_STATUS: dict[int, type[CoordinatorClientError]] = {
    401: AuthenticationError, 404: JobNotFound, 409: JobConflict, 425: JobNotReady,
}


class Client:
    """Client of one coordinator with one client API key; use as a context manager."""

    def __init__(self, base_url: str = "http://localhost:8011", api_key: str = "", *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None, bearer: bool = False) -> None:
        """``bearer=True`` sends the key as ``Authorization: Bearer`` instead of ``X-Api-Key``."""
        if not api_key:
            raise ValueError("api_key is required: pass one of the coordinator's client keys")
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if bearer else {"X-Api-Key": api_key}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise CoordinatorClientError(f"{method} {path}: cannot reach {self.base_url}: {exc}") from exc
        if response.status_code < 400:
            return response.json() if response.content else None
        try:
            detail = str(response.json().get("detail"))
        except (ValueError, AttributeError):
            detail = response.text[:200]
        message = f"{method} {path}: HTTP {response.status_code}: {detail}"
        if response.status_code == 429:
            try:
                retry_after = float(response.headers.get("Retry-After", "1"))
            except ValueError:
                retry_after = 1.0
            raise RateLimitExceeded(message, retry_after=retry_after, status=429, detail=detail)
        error = _BY_STATUS.get(response.status_code, CoordinatorClientError)
        raise error(message, status=response.status_code, detail=detail)

    # -- the published SDK calls ----------------------------------------------------------

    def submit_job(self, payload: dict[str, Any], constraints: dict[str, Any] | None = None, ttl_seconds: int = 900,
                   payment_amount: float | None = None, payment_currency: str = "AITBC") -> dict[str, Any]:
        """Submit a job; returns it (``job_id``, ``state: QUEUED``, ...)."""
        body: dict[str, Any] = {"payload": payload, "ttl_seconds": ttl_seconds}
        if constraints is not None:
            body["constraints"] = constraints
        if payment_amount is not None:
            body["payment_amount"] = payment_amount
            body["payment_currency"] = payment_currency
        return self._call("POST", "/v1/jobs", json=body)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{_quote(job_id)}")

    def get_job_result(self, job_id: str) -> dict[str, Any]:
        """``{"result": {"output", "metadata"}, "receipt": {...}}``; :class:`JobNotReady` before the end."""
        return self._call("GET", f"/v1/jobs/{_quote(job_id)}/result")

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{_quote(job_id)}/cancel")

    def get_receipts(self, job_id: str, signer: str | None = None) -> list[dict[str, Any]]:
        """The job's receipts: the miner's, then the coordinator's; ``signer="miner"`` or
        ``"coordinator"`` keeps one kind (a coordinator receipt has ``signer: "coordinator"``)."""
        receipts: list[dict[str, Any]] = self._call("GET", f"/v1/jobs/{_quote(job_id)}/receipts")
        if signer is None:
            return receipts
        return [r for r in receipts if (r.get("signer") == "coordinator") == (signer == "coordinator")]

    def get_receipt(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{_quote(job_id)}/receipt")

    def list_jobs(self, limit: int = 20, offset: int = 0, state: str | None = None) -> dict[str, Any]:
        """``{"items": [...], "total", "limit", "offset"}``: this key's jobs, newest first."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if state is not None:
            params["state"] = state
        return self._call("GET", "/v1/jobs", params=params)

    def get_receipt_key(self) -> dict[str, Any]:
        """``{"alg", "key_id", "signer": "coordinator"}``: the key the coordinator signs its receipts with."""
        return self._call("GET", "/v1/receipts/key")

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health")

    def get_payment(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{_quote(job_id)}/payment")

    def wait(self, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """Poll the job until it reaches a final state; returns it. Raises :class:`WaitTimeout`."""
        deadline = time.monotonic() + timeout
        pause = threading.Event()
        delay = 0.05
        while True:
            try:
                job = self.get_job(job_id)
            except RateLimitExceeded as exc:
                job, delay = None, max(delay, exc.retry_after)
            if job is not None and job["state"] in FINAL_STATES:
                return job
            left = deadline - time.monotonic()
            if left <= 0:
                state = job["state"] if job else "unknown"
                raise WaitTimeout(f"job {job_id} is still {state} after {timeout:g} s")
            pause.wait(min(delay, left))
            delay = min(delay * 2, 0.5)


def _quote(job_id: str) -> str:
    return quote(job_id, safe="")
