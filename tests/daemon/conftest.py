"""Fixtures shared by the daemon tests."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest

from miner.ops.logs import configure_logging, reset_logging


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """The process's log output as JSON lines in a StringIO, reset afterwards."""
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    yield stream
    reset_logging()
