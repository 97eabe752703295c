"""`aitbc-miner probe`: hardware, models with runner availability, and the capabilities to register."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from miner.cli.probe import gather, render_text
from miner.daemon.keyfile import KEY_FILE_NAME, load_or_create_key
from miner.daemon.settings import DEFAULT_CONFIG
from miner.host.fakenvml import FakeNvml, h200s
from miner.wire.errors import ConfigError
from miner.wire.receipts import key_id

ROOT = Path(__file__).resolve().parents[2]


def write_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "miner.toml"
    path.write_text(
        f"""
miner_id = "rig-07"
state_dir = "{tmp_path / 'state'}"
price = 0.02
region = "eu-west"
{extra}
[[models]]
name = "llama2"
runner = "fake"

[[models]]
name = "mystery"
runner = "no-such-runner"
""",
        encoding="utf-8",
    )
    return path


def test_probe_with_config_builds_registration_capabilities(tmp_path: Path) -> None:
    """With a config, probe lists models with runner status and the capabilities the daemon would register."""
    report = gather(write_config(tmp_path), h200s(2))
    assert [g["index"] for g in report["gpus"]] == [0, 1] and report["cuda"] == "12.4"
    models = {m["name"]: m for m in report["models"]}
    assert models["llama2"]["runner_status"] == "available"
    assert models["mystery"]["runner_status"].startswith("unknown runner 'no-such-runner'")
    caps = report["capabilities"]
    assert caps["models"] == ["llama2"]
    assert caps["gpus"][0]["name"] == "NVIDIA H200" and caps["gpus"][0]["memory_mb"] == 143771
    assert caps["cuda"] == "12.4" and caps["price"] == 0.02 and caps["region"] == "eu-west"
    assert "receipt_key" not in caps and "no receipt key yet" in report["receipt_key"]
    assert not (tmp_path / "state").exists(), "probe never creates the state folder or the key"
    assert report["concurrency"] is None  # no cap set: claiming follows batch room and GPU memory
    text = render_text(report)
    assert "GPU 1: NVIDIA H200" in text and "llama2: runner fake (available)" in text
    assert "jobs in flight as batch room and GPU memory allow" in text


def test_probe_reports_an_existing_key(tmp_path: Path) -> None:
    """When the receipt key exists, its key_id goes into the capabilities."""
    key = load_or_create_key(tmp_path / "state" / KEY_FILE_NAME)
    report = gather(write_config(tmp_path), FakeNvml(init_error="library_not_found"))
    assert report["capabilities"]["receipt_key"] == {"alg": "Ed25519", "key_id": key_id(key.verify_key)}
    assert report["capabilities"]["device"] == "cpu" and report["gpus"] == []


def test_probe_respects_gpu_settings(tmp_path: Path) -> None:
    """gpus.enabled = false skips NVML; a gpus.devices entry that matches nothing is a ConfigError."""
    nvml = h200s(1)
    report = gather(write_config(tmp_path, "[gpus]\nenabled = false"), nvml)
    assert report["gpus"] == [] and nvml.calls == []
    assert "disabled by gpus.enabled = false" in render_text(report)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ConfigError, match="gpus.devices"):
        gather(write_config(other, "[gpus]\ndevices = [3]"), nvml)


@pytest.mark.skipif(DEFAULT_CONFIG.exists(), reason=f"{DEFAULT_CONFIG} exists on this host")
def test_probe_cli_without_config_prints_hardware_as_json(tmp_path: Path) -> None:
    """`aitbc-miner probe --json` with no config prints parseable JSON on stdout; log lines go to stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AITBC_MINER_")}
    proc = subprocess.run(
        [sys.executable, "-m", "miner", "probe", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["capabilities"] is None and isinstance(report["gpus"], list)
    if not report["gpus"]:
        assert "no_nvidia_driver_cpu_mode" in proc.stderr
