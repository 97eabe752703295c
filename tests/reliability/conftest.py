"""Fixtures of the reliability suite: a coordinator with the fault proxy in front of it.

Every test here is marked ``reliability`` (run the suite alone with ``-m reliability``);
the long versions are also marked ``slow`` and run with ``--run-slow`` (``make test-all``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.faultproxy import FaultProxy
from tests.servers import RunningCoordinator, run_coordinator


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects anything
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test collected from this folder ``reliability``."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.reliability)


@pytest.fixture
def rel_coordinator(tmp_path: Path) -> Iterator[RunningCoordinator]:
    """A local coordinator on a fresh SQLite file, client rate limits off."""
    with run_coordinator(tmp_path / "coordinator.db", rate_limits=None, lease_seconds=60.0) as running:
        yield running


@pytest.fixture
def proxy(rel_coordinator: RunningCoordinator) -> Iterator[FaultProxy]:
    """The fault proxy in front of ``rel_coordinator``, passing everything until given a plan."""
    with FaultProxy(rel_coordinator.url, seed=11) as running:
        yield running
