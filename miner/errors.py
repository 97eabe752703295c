"""The error tree of aitbc-miner.

The type of an error says what happens next::

    MinerError
    ├── ConfigError              a bad or missing setting: start-up stops with one line (exit 2)
    ├── JobError(code, message)  one job fails with that code; the daemon goes on
    ├── CoordinatorError         talking to the coordinator went wrong
    │   ├── CoordinatorUnavailable   connection refused/reset, timeout, 5xx, unreadable answer:
    │   │                            retried with jittered exponential backoff
    │   ├── RateLimited              429: retried after `retry_after` seconds
    │   ├── NotRegistered            404 "miner not registered" on heartbeat: register again
    │   ├── AuthenticationFailed     401/403: the API key is wrong; retried slowly, loudly logged
    │   └── CoordinatorRejected      any other 4xx: this request will never succeed as sent
    ├── StateError               the state folder (key, outbox) cannot be read or written:
    │                            stop claiming until it recovers
    └── DeviceError              the GPU is unusable: fail in-flight jobs, exit non-zero so
                                 systemd restarts the process

Library errors are translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations


class MinerError(Exception):
    """Base class of every error aitbc-miner raises on purpose."""


class ConfigError(MinerError):
    """A setting is missing or wrong. The message names the setting and the fix."""


class JobError(MinerError):
    """One job cannot be completed; it is failed with ``code`` and the daemon goes on.

    ``code`` is one of the upper-case codes in :class:`ErrorCode`; ``message`` is safe to
    send to the coordinator (it never quotes the prompt).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ErrorCode:
    """Job error codes sent as ``error_code`` in ``/fail``."""

    INVALID_PAYLOAD = "INVALID_PAYLOAD"
    INVALID_PARAMETERS = "INVALID_PARAMETERS"
    MODEL_NOT_SERVED = "MODEL_NOT_SERVED"
    CONSTRAINTS_UNMET = "CONSTRAINTS_UNMET"
    INSUFFICIENT_VRAM = "INSUFFICIENT_VRAM"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    CANCELLED = "CANCELLED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    BACKEND_UNAVAILABLE = "BACKEND_UNAVAILABLE"
    DEVICE_ERROR = "DEVICE_ERROR"
    RUNNER_ERROR = "RUNNER_ERROR"
    SHUTDOWN = "SHUTDOWN"
    INTERNAL_ERROR = "INTERNAL_ERROR"


class CoordinatorError(MinerError):
    """A coordinator request failed. ``endpoint`` names the call (``poll``, ``result``...)."""

    def __init__(self, message: str, *, endpoint: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.status = status


class CoordinatorUnavailable(CoordinatorError):
    """Transient: connection error, timeout, 5xx or an answer we cannot read. Retry."""


class RateLimited(CoordinatorError):
    """429: wait ``retry_after`` seconds before the next call to that endpoint."""

    def __init__(self, message: str, *, retry_after: float, endpoint: str = "") -> None:
        super().__init__(message, endpoint=endpoint, status=429)
        self.retry_after = retry_after


class NotRegistered(CoordinatorError):
    """The coordinator does not know this miner (404 on heartbeat): register again."""


class AuthenticationFailed(CoordinatorError):
    """401/403: the API key or miner id is refused."""


class CoordinatorRejected(CoordinatorError):
    """Any other 4xx: the request as sent will not succeed (e.g. 409 job not held)."""


class StateError(MinerError):
    """The state folder cannot be written or read; delivery cannot be guaranteed."""


class DeviceError(MinerError):
    """The device is unusable; the process exits non-zero so its supervisor restarts it."""
