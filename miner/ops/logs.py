"""Logging set-up: one handler on stdout, JSON off a TTY, the console renderer on one.

:func:`configure_logging` is called by the CLI at start-up, never at import. structlog
and the standard library's loggers (httpx, uvicorn, asyncio, Python warnings) go through
the same ``ProcessorFormatter`` on one root handler, so every line off a TTY is one JSON
object, a traceback included (in its ``exception`` field). Every line of a job carries
``job_id`` and ``model`` through :func:`job_context` (contextvars, so concurrent jobs never
mix). Registered secrets (the API key) are replaced by ``***`` in any string value, as a
last line of defence: the code never logs them on purpose.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any, TextIO

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
        # Longest first: a secret that contains another is masked whole, not left half shown.
        for secret in sorted(_secrets, key=len, reverse=True):
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
    """Route structlog and the standard library's loggers to one handler on ``stream``.

    ``fmt``: ``auto`` (JSON unless ``stream`` is a TTY), ``json`` or ``console``. Lines of
    libraries (httpx, uvicorn, asyncio, Python warnings) are rendered like ours, tracebacks
    in the ``exception`` field; below WARNING they are dropped unless ``level`` is ``debug``.
    Calling it again replaces the handler, never adds a second one.
    """
    if level not in _LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(_LEVELS)}: pick one of those")
    if fmt not in ("auto", "json", "console"):
        raise ValueError(f"log format {fmt!r} is not auto, json or console: pick one of those")
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    threshold = _LEVELS[level]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    handler = _RootHandler(stream)
    handler.addFilter(_LibraryFilter(threshold if level == "debug" else max(threshold, logging.WARNING)))
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=_stamp_processors(),
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redact_secrets,  # after format_exc_info: tracebacks are masked too
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    _remove_handlers(root)
    root.addHandler(handler)
    root.setLevel(threshold)
    for name in _SELF_HANDLED:  # libraries that install plain-text handlers of their own
        library = logging.getLogger(name)
        for own in list(library.handlers):
            library.removeHandler(own)
        library.propagate = True
        library.disabled = False
        library.setLevel(logging.NOTSET)  # our handler filters library lines by level
    logging.captureWarnings(True)
    structlog.configure(
        processors=[
            *_stamp_processors(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )


# Loggers that uvicorn's default log config and transformers give handlers of their own,
# with propagation off: their lines would bypass the root handler.
_SELF_HANDLED = ("uvicorn", "uvicorn.error", "uvicorn.access", "transformers")


def reset_logging() -> None:
    """Undo :func:`configure_logging`: remove its handler, structlog back to its defaults."""
    root = logging.getLogger()
    _remove_handlers(root)
    root.setLevel(logging.WARNING)
    logging.captureWarnings(False)
    structlog.reset_defaults()


class _RootHandler(logging.StreamHandler[TextIO]):
    """The root handler :func:`configure_logging` installs (found again by its type)."""


class _LibraryFilter(logging.Filter):
    """Passes every structlog line; a standard-library line only at ``threshold`` or above."""

    def __init__(self, threshold: int) -> None:
        super().__init__()
        self.threshold = threshold

    def filter(self, record: logging.LogRecord) -> bool:
        # wrap_for_formatter hands structlog's event dict over as the record's msg; the
        # bound logger has already filtered it by level.
        from_structlog = isinstance(record.msg, dict) and hasattr(record, "_logger")
        return from_structlog or record.levelno >= self.threshold


def _stamp_processors() -> list[Any]:
    """What every line gets, ours and the libraries': job context, level, logger, time."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def _remove_handlers(root: logging.Logger) -> None:
    for old in [h for h in root.handlers if isinstance(h, _RootHandler)]:
        root.removeHandler(old)
        old.close()


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
