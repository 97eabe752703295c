"""Crash safety: SIGKILL at chosen points of a job's life, restart, and check the books."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.crash import CrashCampaign


def _check(report_points: int, tmp_path: Path, seed: int) -> None:
    report = CrashCampaign(tmp_path, kill_points=report_points, seed=seed).run()
    summary = report.summary()
    print(f"\ncrash safety: {summary}")
    assert report.ok(), summary
    assert report.kill_points == report_points and "missed" not in report.phases, summary
    assert report.states == {"COMPLETED": report.jobs}, summary
    # The proxy-held points are reached every time; the log-triggered ones land near their aim.
    assert report.phases.get("during_submit", 0) >= 1 and report.phases.get("after_submit", 0) >= 1, summary
    assert report.replays >= report.phases["after_submit"], summary


def test_sigkill_at_each_phase_loses_nothing_and_doubles_nothing(tmp_path: Path) -> None:
    """Eight SIGKILLs (each phase twice) then restarts: every job COMPLETED once, one verified receipt each, outbox empty."""
    _check(8, tmp_path, seed=7)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_two_hundred_sigkills_lose_nothing_and_double_nothing(tmp_path: Path) -> None:
    """200 SIGKILLs at random phases: no job lost, none stuck, none with two accepted results."""
    _check(200, tmp_path, seed=2024)
