"""The owner's guide quotes log lines and metric names the code really produces."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from miner.host.fakenvml import FakeNvml, h200s
from miner.host.nvml import probe_gpus
from miner.ops.metrics import MinerMetrics
from runners.base import GpuInfo

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def quoted_json_lines(page: str) -> list[dict]:
    """Every JSON log line inside ```json blocks of a docs page ("…" placeholders allowed)."""
    text = (DOCS / page).read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```json\n(.*?)```", text, re.S):
        for line in block.strip().splitlines():
            lines.append(json.loads(line))
    return lines


def runtime_events() -> set[str]:
    """Log events only known at run time (formatted with NVML's reason), produced for real."""
    with capture_logs() as logs:
        probe_gpus(FakeNvml(init_error="library_not_found"))
        lost = h200s(2)
        lost.gpus[1].lost = True
        probe_gpus(lost)
    return {e["event"] for e in logs}


def source_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "miner").rglob("*.py"))


def test_troubleshooting_log_lines_exist_in_the_code() -> None:
    """Each event quoted in troubleshooting.md is logged by the miner, word for word."""
    lines = quoted_json_lines("troubleshooting.md")
    assert len(lines) >= 10
    produced, source = runtime_events(), source_text()
    for line in lines:
        event = line["event"]
        assert event in produced or f'"{event}"' in source, f"docs quote a log event the code never writes: {event!r}"


def test_troubleshooting_covers_the_required_cases() -> None:
    """The page has a section for no NVML, OOM, coordinator unreachable and rate limiting."""
    text = (DOCS / "troubleshooting.md").read_text(encoding="utf-8")
    for heading in ("## No NVIDIA driver", "## Out of GPU memory", "## Coordinator unreachable", "## Rate limited"):
        assert heading in text


def test_metrics_page_lists_exactly_the_exported_families() -> None:
    """docs/metrics.md's table names every metric family MinerMetrics exports, and no other."""
    m = MinerMetrics()
    m.job_finished(model="m", outcome="completed", error_code=None, duration_s=1.0, completion_tokens=1)
    m.observe_request(endpoint="poll", seconds=0.1, error="5xx")
    m.set_gpu_stats([GpuInfo(0, "GPU-0", "X", 10, 5, None, None, None, 1.0, 1.0, 1.0)])
    m.model_loaded(model="m", runner="fake", load_seconds=1.0)
    m.heartbeat_ok(time.time())
    families = set()
    for family in text_string_to_metric_families(m.render().decode()):
        if family.name.endswith("_created"):
            continue
        families.add(family.name + ("_total" if family.type == "counter" else ""))
    documented = set(re.findall(r"^\| `(aitbc_miner_[a-z_]+)", (DOCS / "metrics.md").read_text(encoding="utf-8"), re.M))
    assert documented == families
