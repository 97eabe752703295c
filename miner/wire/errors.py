"""The error tree of aitbc-miner, shared by the daemon, the runners and the coordinator.

The type of an error says what happens next::

    MinerError
    ├── ConfigError              a bad or missing setting: start-up stops with one line (exit 2)
    ├── JobError(code, message)  one job fails with that code; the daemon goes on
    ├── CoordinatorError         talking to the coordinator went wrong
    │   ├── CoordinatorUnavailable   connection refused/reset, timeout, 5xx, unreadable answer:
    │   │                            retried with jittered exponential backoff
    │   ├── RateLimited              429: retried after `retry_after` seconds
    │   ├── NotRegistered            404 "miner not registered": register again
    │   ├── AuthenticationFailed     401/403: the API key is wrong; retried slowly, loudly logged
    │   └── CoordinatorRejected      any other 4xx: this request will never succeed as sent
    ├── StateError               the state folder (key, outbox) cannot be read or written:
    │   │                        stop claiming until it recovers
    │   └── StateLocked          another miner holds the state folder: exit 1 at once
    ├── StartupError             start-up failed for a reason outside the configuration (a hub
    │                            or engine that cannot be reached yet): exit 1, the unit restarts it
    ├── DeviceError              the GPU is unusable: fail in-flight jobs, exit non-zero so
    │                            systemd restarts the process
    ├── ConstraintError          a job's constraints object is malformed (also a ValueError)
    └── ReceiptVerificationError a receipt does not verify (also a ValueError)

Library errors are translated at the boundary with ``raise ... from exc``. Messages
never quote a prompt, an output or a secret.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "AuthenticationFailed",
    "ConfigError",
    "ConstraintError",
    "CoordinatorError",
    "CoordinatorRejected",
    "CoordinatorUnavailable",
    "DeviceError",
    "ErrorCode",
    "JobError",
    "MinerError",
    "NotRegistered",
    "RateLimited",
    "ReceiptVerificationError",
    "StartupError",
    "StateError",
    "StateLocked",
]


class MinerError(Exception):
    """Base class of every error aitbc-miner raises on purpose."""


class ConfigError(MinerError):
    """A setting is missing or wrong. The message names the setting and the fix."""


class ErrorCode(StrEnum):
    """Job error codes sent as ``error_code`` in ``/fail`` (``docs/troubleshooting.md``)."""

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
    RESULT_INVALID = "RESULT_INVALID"  # the runner's answer breaks the RunResult contract
    RESULT_TOO_LARGE = "RESULT_TOO_LARGE"  # the result body is over coordinator.max_result_bytes
    SHUTDOWN = "SHUTDOWN"
    INTERNAL_ERROR = "INTERNAL_ERROR"


class JobError(MinerError):
    """One job cannot be completed; it is failed with ``code`` and the daemon goes on.

    ``code`` is an :class:`ErrorCode`; ``message`` is safe to send to the coordinator
    (it never quotes the prompt or the output).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


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


class StateLocked(StateError):
    """Another miner process holds the state folder's lock."""


class StartupError(MinerError):
    """Start-up failed for a reason the configuration cannot fix (exit 1: retried by the unit)."""


class DeviceError(MinerError):
    """The device is unusable; the process exits non-zero so its supervisor restarts it."""


class ConstraintError(MinerError, ValueError):
    """A constraint field has the wrong type or value; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"constraints.{field}: {message}")
        self.field = field


class ReceiptVerificationError(MinerError, ValueError):
    """A receipt does not verify: malformed, wrong algorithm, wrong key, or tampered."""
