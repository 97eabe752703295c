"""Logging set-up: structlog to stdout, JSON off a TTY, the console renderer on one.

:func:`configure_logging` is called by the CLI at start-up, never at import. Every line
of a job carries ``job_id`` and ``model`` through :func:`job_context` (contextvars, so
concurrent jobs never mix). Registered secrets (the API key) are replaced by ``***`` in
any string value, as a last line of defence: the code never logs them on purpose.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any, Iterator, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Mask ``value`` wherever it would appear in a log line (values under 6 chars are ignored)."""
    if value and len(value) >= 6:
        _secrets.add(value)


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        for secret in _secrets:
            if secret in value:
                value = value.replace(secret, "***")
        return value
    if isinstance(value, dict):
        return {k: _redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact(v) for v in value)
    return value


def redact_secrets(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: mask registered secrets in every value."""
    if not _secrets:
        return event_dict
    return {k: _redact(v) for k, v in event_dict.items()}


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog for the process.

    ``fmt``: ``auto`` (JSON unless ``stream`` is a TTY), ``json`` or ``console``.
    """
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False) if fmt == "console" else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Libraries (httpx, uvicorn) log through the standard library, whose default (no
    # handlers: warnings and worse to stderr) is kept; per-request INFO lines stay silent.


def safe_text(value: str | None, limit: int = 128) -> str | None:
    """``value`` fit for a log line: at most ``limit`` characters, unencodable ones escaped."""
    if value is None:
        return None
    text = value[:limit] + ("..." if len(value) > limit else "")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@contextlib.contextmanager
def job_context(job_id: str, model: str | None) -> Iterator[None]:
    """Bind ``job_id`` and ``model`` to every log line written inside the block."""
    with structlog.contextvars.bound_contextvars(job_id=safe_text(job_id), model=safe_text(model)):
        yield


def preview(text: str | None, limit: int = 0) -> str:
    """What may be logged of a prompt or output: its length only (``limit`` chars when > 0)."""
    if text is None:
        return "<none>"
    if limit > 0:
        return f"{text[:limit]!r}... ({len(text)} chars)" if len(text) > limit else repr(text)
    return f"<{len(text)} chars>"
