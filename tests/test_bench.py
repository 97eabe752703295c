"""The benchmark scripts' own logic: percentiles, the GPU check's merged report, and its dry run.

Figures are never asserted against times: these tests check what the scripts compute and
record from given measurements, and (slow) that the GPU check's CPU dry run completes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.gpu_check import parse_status, summarize
from bench.tinybench import job_prompts, percentile

REPO = Path(__file__).resolve().parents[1]


def _count(tokens_per_s: float, ttft_p50_ms: float) -> dict[str, Any]:
    daemon = {
        "seconds": 1.0,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_job": tokens_per_s,
        "ttft_p50_ms": ttft_p50_ms,
        "ttft_p95_ms": ttft_p50_ms * 2,
        "largest_batch": 1,
        "tokens": 16,
    }
    return {"daemon": daemon}


def _write(parts: Path, name: str, data: dict[str, Any]) -> None:
    (parts / f"{name}.json").write_text(json.dumps(data))


def test_percentile_interpolates_between_ranks_and_refuses_no_values() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)
    assert percentile([7.0], 95) == 7.0
    assert percentile([1.0, 9.0], 0) == 1.0 and percentile([1.0, 9.0], 100) == 9.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_job_prompts_are_distinct_and_keep_the_base_prompt() -> None:
    prompts = job_prompts("def f():", 32)
    assert len(set(prompts)) == 32
    assert all(p.endswith("def f():") for p in prompts)


def test_parse_status_reads_exit_codes_seconds_and_skips() -> None:
    assert parse_status("tests=0:7,static=124:90,continuous=skipped:0") == {
        "tests": {"rc": 0, "seconds": 7},
        "static": {"rc": 124, "seconds": 90},
        "continuous": {"rc": "skipped", "seconds": 0},
    }
    assert parse_status("") == {}


def test_report_compares_each_mode_with_eager_and_records_why_a_mode_has_no_figures(tmp_path: Path) -> None:
    _write(tmp_path, "build", {"shape": "tiny", "device": "cpu", "build_seconds": 1.5})
    eager = {
        "decode": "eager",
        "decode_mode_loaded": "eager",
        "load_seconds": 3.0,
        "new_tokens": 16,
        "ceiling_b1_tokens_per_s": 500.0,
        "daemon_b1_fraction_of_ceiling": 0.2,
        "in_flight": {"1": {**_count(100.0, 20.0), "daemon_over_raw": 1.05}, "4": _count(300.0, 40.0)},
    }
    _write(tmp_path, "eager", eager)
    # static was killed by its timeout after measuring one count; continuous never wrote a part
    _write(
        tmp_path,
        "static",
        {"decode": "static", "decode_mode_loaded": "static", "in_flight": {"1": _count(150.0, 10.0)}},
    )
    steps = parse_status("tests=0:5,build=0:8,eager=0:20,static=124:90,continuous=1:4")

    report = summarize(tmp_path, steps)

    assert report["shape"] == "tiny" and report["steps"] == steps
    assert report["in_flight"] == eager["in_flight"]
    assert report["daemon_b1_fraction_of_ceiling"] == 0.2
    modes = report["modes"]
    assert "error" not in modes["eager"] and "vs_eager" not in modes["eager"]
    assert modes["eager"]["tokens_per_s"] == {"1": 100.0, "4": 300.0}
    assert modes["static"]["vs_eager"] == {"1": 1.5}
    assert modes["static"]["ttft_p50_ms"] == {"1": 10.0}
    assert modes["static"]["error"] == "killed by its timeout after 90 s"
    assert modes["continuous"] == {"error": "the step exited 1 without figures"}


def test_report_keeps_the_error_a_mode_recorded_itself(tmp_path: Path) -> None:
    _write(tmp_path, "eager", {"in_flight": {"1": _count(100.0, 20.0)}})
    _write(tmp_path, "continuous", {"decode": "continuous", "error": "RuntimeError: paged attention unavailable"})
    report = summarize(tmp_path, parse_status("eager=0:20,continuous=1:9,static=skipped:0"))
    assert report["modes"]["continuous"]["error"] == "RuntimeError: paged attention unavailable"
    assert report["modes"]["continuous"]["vs_eager"] == {}
    assert report["modes"]["static"] == {"error": "skipped: the script's time budget was spent"}


def test_path_step_records_a_daemon_that_cannot_start_and_exits_non_zero(tmp_path: Path) -> None:
    part = tmp_path / "static.json"
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "path", "--shape", "tiny", "--device", "cpu", "--folder",
         str(tmp_path / "no-model"), "--decode", "static", "--in-flight", "1", "--new-tokens", "4", "--part", str(part)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    recorded = json.loads(part.read_text())
    assert recorded["decode"] == "static"
    assert recorded["error"].startswith("ConfigError: models[name='m'].path")


@pytest.mark.slow
def test_gpu_check_dry_run_measures_the_whole_path_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "dry.json"
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["dry_run"] is True and results["shape"] == "tiny"
    assert sorted(results["in_flight"], key=int) == ["1", "4"]
    for n, figures in results["in_flight"].items():
        assert figures["daemon"]["tokens"] == int(n) * 16
        assert figures["raw"]["tokens"] == int(n) * 16
        assert figures["daemon"]["ttft_p95_ms"] >= figures["daemon"]["ttft_p50_ms"] > 0
    assert results["daemon_b1_fraction_of_ceiling"] > 0
    assert set(results["modes"]) == {"eager", "static", "continuous"}
    assert all(step["rc"] in (0, 5) for name, step in results["steps"].items() if name in ("tests", "build", "eager"))
