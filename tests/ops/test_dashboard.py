"""The Grafana dashboard queries only metrics the miner exports."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from miner.ops.metrics import MinerMetrics
from runners.base import GpuInfo

DASHBOARD = Path(__file__).resolve().parents[2] / "config" / "grafana-dashboard.json"
METRIC = re.compile(r"\baitbc_miner_[a-z0-9_]+")


def exported_names() -> set[str]:
    """Every sample name MinerMetrics renders once each of its methods has been called."""
    m = MinerMetrics()
    m.job_started(model="llama2")
    m.job_finished(
        model="llama2", outcome="completed", error_code=None, duration_s=1.0, completion_tokens=10, units=1.0,
        energy_j=250.0,
    )
    m.job_finished(model="llama2", outcome="failed", error_code="OUT_OF_MEMORY", duration_s=0.2, completion_tokens=None)
    m.set_inflight(1)
    m.set_job_room(4)
    m.set_outbox_depth(0)
    m.observe_request(endpoint="poll", seconds=0.01, error="429")
    m.heartbeat_ok(time.time())
    m.set_gpu_stats([GpuInfo(0, "GPU-1", "NVIDIA H200", 143771, 1000, None, "12.4", "9.0", 10.0, 40.0, 100.0)])
    m.model_loaded(model="llama2", runner="fake", load_seconds=0.5)
    m.set_loaded_models(["llama2"])
    m.set_gpu_health([], [{"index": 0, "uuid": "GPU-1", "state": "drained", "checks": ["ecc"]}])
    return {s.name for f in text_string_to_metric_families(m.render().decode()) for s in f.samples}


def dashboard_queries() -> list[str]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "query", "definition") and isinstance(value, str):
                    exprs.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(data)
    return exprs


def test_every_queried_metric_is_exported() -> None:
    """Each aitbc_miner_* name in a dashboard query is a sample name MinerMetrics renders."""
    queried = {name for expr in dashboard_queries() for name in METRIC.findall(expr)}
    assert len(queried) >= 10
    missing = queried - exported_names()
    assert not missing, f"dashboard queries metrics the miner does not export: {sorted(missing)}"


def test_dashboard_covers_what_owners_watch() -> None:
    """The dashboard shows jobs, earnings units, tokens/s, errors by code, GPU memory, temperature, health, energy."""
    text = " ".join(dashboard_queries())
    for needle in (
        "aitbc_miner_jobs_total",
        "aitbc_miner_units_total",
        "aitbc_miner_job_tokens_per_second_bucket",
        "by (error_code)",
        "aitbc_miner_gpu_memory_used_bytes",
        "aitbc_miner_gpu_temperature_celsius",
        "aitbc_miner_gpu_serving",
        "aitbc_miner_gpu_trouble",
        "aitbc_miner_energy_joules_total",
    ):
        assert needle in text, needle


def test_panels_do_not_overlap() -> None:
    """Panel grid positions stay inside Grafana's 24 columns and never overlap."""
    panels = json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]
    taken: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, p["title"]
        taken |= cells
    assert len({p["id"] for p in panels}) == len(panels)
