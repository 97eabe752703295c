"""Shared fixtures: a real local coordinator on a free loopback port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.servers import RunningCoordinator, run_coordinator

if TYPE_CHECKING:
    from coordinator.client import Client


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """Logging is process-wide: a command a test runs in-process (``check``, ``verify-job``)
    configures it, so every test ends with it reset and the next starts from the defaults."""
    yield
    from miner.ops.logs import reset_logging

    reset_logging()


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[RunningCoordinator]:
    """A coordinator on a fresh SQLite file; client rate limits off so tests never hit them."""
    with run_coordinator(tmp_path / "coordinator.db", rate_limits=None) as running:
        yield running


@pytest.fixture
def coordinator_client(coordinator: RunningCoordinator) -> Iterator[Client]:
    """``coordinator.client.Client`` for the ``coordinator`` fixture, with its client key."""
    from coordinator.client import Client

    with Client(coordinator.url, coordinator.client_key) as client:
        yield client



def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` are skipped unless ``--run-slow`` is given (``make test-all``)."""
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
