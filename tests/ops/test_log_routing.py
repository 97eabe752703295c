"""Logs: the standard library's loggers go through structlog, one JSON object a line, tracebacks inside."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import structlog

from miner.ops.logs import configure_logging, register_secret, reset_logging

ROOT = Path(__file__).resolve().parents[2]

Configure = Callable[..., io.StringIO]


class TtyStream(io.StringIO):
    """A text stream that says it is a terminal, as a console would."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def configure() -> Iterator[Configure]:
    """``configure(level, fmt)`` sets logging up on a fresh stream and returns it; undone after the test."""

    def _configure(level: str = "info", fmt: str = "json", stream: io.StringIO | None = None) -> io.StringIO:
        stream = stream if stream is not None else io.StringIO()
        configure_logging(level, fmt, stream=stream)
        return stream

    yield _configure
    reset_logging()


def _lines(stream: io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if line.strip()]


def _records(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in _lines(stream)]


def _httpx_get(url: str) -> None:
    """One request through httpx on an in-memory transport (httpx logs it at INFO)."""
    with httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(204))) as client:
        client.get(url)


def test_stdlib_warning_is_one_json_object_with_the_standard_fields(configure: Configure) -> None:
    """A warning logged through ``logging.getLogger("httpx")`` is one JSON line with event, level, timestamp, logger."""
    stream = configure()
    logging.getLogger("httpx").warning("connection pool is full, discarding %s", "conn-1")
    (record,) = _records(stream)
    assert record["event"] == "connection pool is full, discarding conn-1"
    assert record["level"] == "warning" and record["logger"] == "httpx"
    assert str(record["timestamp"]).endswith("Z")


def test_structlog_lines_carry_their_logger_name(configure: Configure) -> None:
    """A structlog line says which logger wrote it, like a library line does."""
    stream = configure()
    structlog.get_logger("miner.daemon.jobs").info("job_claimed", job_id="j1")
    (record,) = _records(stream)
    assert record["logger"] == "miner.daemon.jobs" and record["event"] == "job_claimed" and record["job_id"] == "j1"


def test_library_info_lines_are_silent_unless_level_is_debug(configure: Configure) -> None:
    """httpx's per-request INFO line is dropped at level info and comes out as JSON at level debug."""
    quiet = configure("info")
    _httpx_get("http://coordinator.invalid/v1/health")
    assert _lines(quiet) == []
    loud = configure("debug")
    _httpx_get("http://coordinator.invalid/v1/health")
    requests = [r for r in _records(loud) if r["logger"] == "httpx" and r["level"] == "info"]
    assert len(requests) == 1 and "coordinator.invalid" in str(requests[0]["event"])


def test_structlog_exception_is_one_json_line_with_the_traceback(configure: Configure) -> None:
    """``log.exception`` inside ``except`` writes exactly one JSON line whose ``exception`` holds the traceback."""
    stream = configure()
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        structlog.get_logger("miner.test").exception("job_crashed", job_id="j1")
    (line,) = _lines(stream)
    record = json.loads(line)
    assert record["event"] == "job_crashed" and record["level"] == "error"
    assert "Traceback (most recent call last)" in str(record["exception"])
    assert "ZeroDivisionError" in str(record["exception"])


def test_stdlib_exception_is_one_json_line_with_the_traceback(configure: Configure) -> None:
    """``logging.Logger.exception`` writes exactly one valid JSON line whose ``exception`` holds the traceback."""
    stream = configure()
    try:
        raise KeyError("missing")
    except KeyError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    (line,) = _lines(stream)
    record = json.loads(line)
    assert record["event"] == "Exception in ASGI application" and record["level"] == "error"
    assert "Traceback (most recent call last)" in str(record["exception"]) and "KeyError" in str(record["exception"])


def test_registered_secret_in_a_stdlib_line_or_traceback_is_masked(configure: Configure) -> None:
    """A registered secret in a standard-library message, or in a logged traceback, is written as ***."""
    secret = "stdlib-secret-key-4711"
    register_secret(secret)
    stream = configure()
    logging.getLogger("httpx").warning("rejected header X-Api-Key: %s", secret)
    try:
        raise RuntimeError(f"bad key {secret}")
    except RuntimeError:
        logging.getLogger("httpx").exception("request failed")
    text = stream.getvalue()
    assert secret not in text
    message, failure = _records(stream)
    assert message["event"] == "rejected header X-Api-Key: ***" and "bad key ***" in str(failure["exception"])


def test_job_context_reaches_library_lines(configure: Configure) -> None:
    """A library line written inside ``job_context`` carries the job's id and model."""
    from miner.ops.logs import job_context

    stream = configure()
    with job_context("j9", "llama2"):
        logging.getLogger("transformers").warning("generation flags are not valid")
    (record,) = _records(stream)
    assert record["job_id"] == "j9" and record["model"] == "llama2"


def test_configuring_twice_keeps_one_handler(configure: Configure) -> None:
    """A second ``configure_logging`` replaces the first handler: each line is written once, to the new stream."""
    first = configure()
    second = configure()
    logging.getLogger("httpx").warning("once")
    structlog.get_logger("miner.test").warning("once_too")
    assert _lines(first) == []
    assert [r["event"] for r in _records(second)] == ["once", "once_too"]


def test_console_on_a_tty_renders_library_lines_as_text(configure: Configure) -> None:
    """On a TTY a library line and its traceback are rendered by the console renderer, not as JSON."""
    stream = configure("info", "auto", stream=TtyStream())
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("asyncio").exception("Task exception was never retrieved")
    text = stream.getvalue()
    assert not text.lstrip().startswith("{")
    assert "Task exception was never retrieved" in text and "ValueError: boom" in text


def test_bad_level_or_format_is_refused_with_the_choices() -> None:
    """An unknown level or format is refused with a one-line message naming the value and the choices."""
    with pytest.raises(ValueError, match="log level 'verbose' is not one of debug, info, warning, error"):
        configure_logging("verbose", "json", stream=io.StringIO())
    with pytest.raises(ValueError, match="log format 'xml' is not auto, json or console"):
        configure_logging("info", "xml", stream=io.StringIO())


def _python(snippet: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(snippet)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_process_writes_only_json_lines_to_stdout_and_nothing_to_stderr() -> None:
    """In a real process with fmt json, structlog, stdlib, exception and warning lines are all JSON on stdout."""
    done = _python(
        """
        import logging, warnings
        import httpx, structlog
        from miner.ops.logs import configure_logging

        configure_logging("info", "json")
        structlog.get_logger("miner.daemon.agent").info("miner_started", gpus=1)
        logging.getLogger("httpx").warning("plain %s line", "stdlib")
        with httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200))) as client:
            client.get("http://coordinator.invalid/")
        try:
            {}["absent"]
        except KeyError:
            logging.getLogger("uvicorn.error").exception("stdlib traceback")
            structlog.get_logger("miner.daemon.agent").exception("structlog_traceback")
        warnings.warn("a library warning", UserWarning)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["event"] for r in records[:4]] == [
        "miner_started",
        "plain stdlib line",
        "stdlib traceback",
        "structlog_traceback",
    ]
    assert all("KeyError" in str(r["exception"]) for r in records[2:4])
    assert records[4]["logger"] == "py.warnings" and "a library warning" in str(records[4]["event"])
    assert len(records) == 5


def test_importing_the_module_configures_nothing() -> None:
    """Importing ``miner.ops.logs`` adds no handler and leaves structlog unconfigured."""
    done = _python(
        """
        import logging, structlog
        import miner.ops.logs
        assert logging.getLogger().handlers == [], logging.getLogger().handlers
        assert not structlog.is_configured()
        """
    )
    assert done.returncode == 0, done.stderr
