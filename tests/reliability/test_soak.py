"""Soak: thousands of fake jobs through the real daemon; resources stay flat, nothing is lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.soak import SoakReport, run_soak

CONCURRENCY = 4


def _check(report: SoakReport) -> None:
    summary = report.summary()
    assert report.ok(), summary
    assert report.max_outbox <= CONCURRENCY, summary  # outcomes wait in the outbox only until acknowledged
    start, end, peak = report.start, report.end, report.peak
    assert end["fds"] <= start["fds"] + 4 and peak["fds"] <= start["fds"] + 8, summary
    assert peak["tasks"] <= start["tasks"] + 2 * CONCURRENCY + 2, summary
    assert end["rss_kib"] <= 1.25 * start["rss_kib"], summary


def test_short_soak_keeps_resources_flat_and_loses_nothing(tmp_path: Path) -> None:
    """20 s of back-to-back fake jobs on four slots: every job COMPLETED once, fds and tasks flat, RSS bounded, outbox drained."""
    report = run_soak(tmp_path, seconds=20, interval=1.0, concurrency=CONCURRENCY)
    print(f"\nsoak: {report.summary()}")
    _check(report)


@pytest.mark.slow
@pytest.mark.timeout(1000)
def test_ten_minute_soak_shows_no_growth(tmp_path: Path) -> None:
    """Ten minutes of back-to-back fake jobs: no lost job, and after warm-up no growth in fds, tasks, threads or outbox (slope ~0), RSS slope under 1 % of its size per minute."""
    report = run_soak(tmp_path, seconds=600, interval=5.0, concurrency=CONCURRENCY)
    print(f"\nsoak: {report.summary()}")
    _check(report)
    slopes = report.slope_per_min
    assert abs(slopes["fds"]) < 0.5 and abs(slopes["tasks"]) < 0.5 and abs(slopes["threads"]) < 0.5, slopes
    assert slopes["rss_kib"] < 0.01 * report.start["rss_kib"], slopes
