"""The package as an owner installs it: an sdist and a wheel built offline, the wheel in a fresh virtualenv.

The sdist is built from a copy of the source tree (the files git would ship, so the checkout
gets no build folders), the wheel from the unpacked sdist (so the sdist is complete), both
through setuptools' own PEP 517 hooks with no network. The fresh virtualenv gets the wheel
with ``pip install --no-index --no-deps``; its dependencies come from this environment,
but only the core ones: a folder of links to the distributions that the wheel's
requirements without extras reach, added by a ``.pth`` file. So the daemon runs there
without the ``coordinator`` extra, without torch and without this checkout's editable
install, and ``pip check`` proves those links are all it needs.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import miner
from coordinator.client import Client
from tests.minerconfig import write_miner_config
from tests.servers import RunningCoordinator, run_coordinator

ROOT = Path(__file__).resolve().parents[2]
_COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", ".demo", ".whl"
)


def _run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _copy_source(dest: Path) -> Path:
    """The files a clone has (tracked and untracked-but-not-ignored), else the tree less build outputs."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, timeout=60
    )
    if listed.returncode != 0:
        shutil.copytree(ROOT, dest, ignore=_COPY_IGNORE)
        return dest
    for name in filter(None, listed.stdout.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def _build(hook: str, source: Path, out: Path) -> tuple[Path, str]:
    """Call setuptools' PEP 517 ``hook`` in ``source``; the artefact and everything the build printed."""
    code = f"from setuptools import build_meta; print(build_meta.{hook}({str(out)!r}))"
    proc = _run([sys.executable, "-W", "default", "-c", code], cwd=source)
    return out / proc.stdout.strip().splitlines()[-1], proc.stdout + proc.stderr


def _core_distributions(requirements: list[str]) -> Iterator[importlib.metadata.Distribution]:
    """Every installed distribution the requirements reach, extras left out."""
    todo, seen = list(requirements), set()
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        dist = importlib.metadata.distribution(req.name)
        key = dist.metadata["Name"].lower()
        if key in seen:
            continue
        seen.add(key)
        todo.extend(dist.requires or [])
        yield dist


def _link_core_dependencies(wheel: Path, deps: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [v for k, v in _headers(zf.read(meta).decode()) if k == "Requires-Dist"]
    site = Path(sysconfig.get_paths()["purelib"])
    deps.mkdir()
    for dist in _core_distributions(requires):
        for top in {Path(str(f)).parts[0] for f in dist.files or () if not str(f).startswith("..")}:
            if (site / top).exists() and not (deps / top).exists():
                (deps / top).symlink_to(site / top)


def _headers(metadata: str) -> Iterator[tuple[str, str]]:
    for line in metadata.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(": ")
        yield key, value


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    base = tmp_path_factory.mktemp("dist")
    source = _copy_source(base / "src")
    out = base / "dist"
    out.mkdir()
    sdist, sdist_log = _build("build_sdist", source, out)
    with tarfile.open(sdist) as tf:
        tf.extractall(base / "unpacked", filter="data")
    unpacked = base / "unpacked" / sdist.name.removesuffix(".tar.gz")
    wheel, wheel_log = _build("build_wheel", unpacked, out)
    return {"sdist": sdist, "wheel": wheel, "log": sdist_log + wheel_log, "base": base}


@pytest.fixture(scope="module")
def fresh_venv(built: dict[str, object]) -> Path:
    base = built["base"]
    assert isinstance(base, Path)
    wheel = built["wheel"]
    assert isinstance(wheel, Path)
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    _link_core_dependencies(wheel, base / "deps")
    (site / "core-deps.pth").write_text(f"{base / 'deps'}\n", encoding="utf-8")
    # This environment's pip installs into the fresh one (--python), offline.
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index", "--no-deps", str(wheel)])
    return env_dir


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("AITBC_MINER_") and k != "NOTIFY_SOCKET"}


def test_sdist_and_wheel_build_without_a_deprecation_banner(built: dict[str, object]) -> None:
    """Both build offline, the wheel from the sdist; PEP 639 license metadata, the version from miner/__init__.py."""
    log = str(built["log"])
    assert "deprecat" not in log.lower() and "!!" not in log, log
    wheel = built["wheel"]
    assert isinstance(wheel, Path)
    assert wheel.name == f"aitbc_miner-{miner.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = dict(_headers(zf.read(next(n for n in names if n.endswith("METADATA"))).decode()))
    assert meta["Version"] == miner.__version__
    assert meta["License-Expression"] == "Apache-2.0"
    assert any(".dist-info/licenses/" in n for n in names), names
    assert not any(n.startswith("tests/") for n in names)


def test_fresh_venv_runs_the_daemon_without_the_coordinator_extra(fresh_venv: Path, tmp_path: Path) -> None:
    """--version, --help, config, check and run (fake runner, one job against a real coordinator) from the wheel alone."""
    exe = str(fresh_venv / "bin" / "aitbc-miner")
    python = str(fresh_venv / "bin" / "python")
    env = _clean_env()
    _run([sys.executable, "-m", "pip", "--python", python, "check"], env=env)
    where = _run([python, "-c", "import miner; print(miner.__file__)"], cwd=tmp_path, env=env).stdout.strip()
    assert Path(where).is_relative_to(fresh_venv), where
    for extra_module in ("fastapi", "uvicorn", "torch"):
        probe = subprocess.run([python, "-c", f"import {extra_module}"], capture_output=True, env=env, timeout=60)
        assert probe.returncode != 0, f"{extra_module} should not be importable in the fresh venv"

    assert _run([exe, "--version"], env=env).stdout.strip() == f"aitbc-miner {miner.__version__}"
    help_text = _run([exe, "--help"], env=env).stdout
    assert "run" in help_text and "config" in help_text and "examples:" in help_text

    with run_coordinator(tmp_path / "coordinator.db", rate_limits=None) as coord:
        config = _miner_config(tmp_path, coord)
        shown = _run([exe, "config", "--config", str(config)], cwd=tmp_path, env=env).stdout
        assert "models[0].runner" in shown and coord.miner_key not in shown
        checked = _run([exe, "check", "--config", str(config), "--json"], cwd=tmp_path, env=env).stdout
        assert json.loads(checked)["ok"] is True, checked  # it would serve: then run it
        with Client(coord.url, coord.client_key) as client:
            job_id = client.submit_job({"model": "llama2", "prompt": "from the wheel"}, ttl_seconds=120)["job_id"]
            proc = subprocess.run(
                [exe, "run", "--config", str(config), "--max-jobs", "1"],
                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
            )
            assert proc.returncode == 0, proc.stdout + proc.stderr
            job = client.get_job(job_id)
    assert job["state"] == "COMPLETED", job


def _miner_config(tmp_path: Path, coord: RunningCoordinator) -> Path:
    return write_miner_config(
        tmp_path / "miner.toml", coord, tmp_path / "state", miner_id="rig-wheel",
        models=[{"name": "llama2", "runner": "fake", "delay_s": 0.01}],
    )
