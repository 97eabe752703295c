"""Third-party runners: the example plugin installs, is discovered and runs; broken ones are skipped."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from coordinator.client import Client, WaitTimeout
from tests.servers import RunningCoordinator

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "aitbc-miner-echo-runner"


def _python(code: str, *paths: Path) -> dict:
    """Run ``code`` in a fresh interpreter with ``paths`` first on sys.path; return its JSON output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*(str(p) for p in paths), str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def echo_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin pip-installed (offline, no dependencies) into a throwaway folder."""
    work = tmp_path_factory.mktemp("echo-plugin")
    source = work / "src"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = work / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(site), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return site


def _fake_distribution(site: Path, dist: str, entry_points: str, modules: dict[str, str]) -> None:
    """Write a minimal installed distribution: modules plus a dist-info declaring entry points."""
    site.mkdir(parents=True, exist_ok=True)
    for name, source in modules.items():
        (site / f"{name}.py").write_text(source)
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[aitbc_miner.runners]\n{entry_points}\n")


RUN_ECHO_JOB = """
import asyncio, json, runners
from runners.base import Job, ModelSpec, RunnerContext
from runners.params import parse_text_payload

async def main():
    cls = runners.load_runner_class("echo")
    runner = cls([ModelSpec(name="echo-demo", runner="echo", mode="reverse")], RunnerContext())
    await runner.start()
    try:
        job = Job(job_id="j1", request=parse_text_payload({"model": "echo-demo", "prompt": "hello miner"}))
        result = await runner.run(job)
        return cls.__module__, runner.ready_models(), result.output, result.finish_reason
    finally:
        await runner.aclose()

module, ready, output, reason = asyncio.run(main())
print(json.dumps({"target": runners.discover().get("echo"), "status": runners.runner_status(),
                  "module": module, "ready": ready, "output": output, "reason": reason}))
"""


def test_installed_example_plugin_is_discovered_and_runs_a_job(echo_site: Path) -> None:
    """After pip install, "echo" is a runner name: probe status says available and a job runs through it."""
    seen = _python(RUN_ECHO_JOB, echo_site)
    assert seen["target"] == "aitbc_miner_echo_runner:EchoRunner"
    assert seen["status"]["echo"] == "available" and seen["status"]["fake"] == "available"
    assert seen["module"] == "aitbc_miner_echo_runner" and seen["ready"] == ["echo-demo"]
    assert (seen["output"], seen["reason"]) == ("renim olleh", "stop")


def test_without_the_plugin_the_name_is_unknown() -> None:
    """Without the package installed, naming "echo" is a ConfigError listing the known runners."""
    code = (
        "import json, runners\nfrom miner.wire.errors import ConfigError\n"
        "try:\n    runners.load_runner_class('echo')\nexcept ConfigError as exc:\n    print(json.dumps(str(exc)))\n"
    )
    message = _python(code)
    assert "unknown runner 'echo'" in message and "aitbc_miner.runners" in message


BROKEN_STATUS = """
import json, runners
from miner.wire.errors import ConfigError
errors = {}
for name in ("broken", "notarunner", "typo"):
    try:
        runners.load_runner_class(name)
    except ConfigError as exc:
        errors[name] = str(exc)
print(json.dumps({"status": runners.runner_status(), "errors": errors,
                  "fake": runners.discover()["fake"], "echo": runners.load_runner_class("echo").__name__}))
"""


def test_broken_plugins_are_reported_and_skipped(echo_site: Path, tmp_path: Path) -> None:
    """Plugins that raise on import, are not runners, or name a missing class are reported, never fatal."""
    broken = tmp_path / "broken-site"
    _fake_distribution(
        broken,
        "broken-runners",
        "broken = broken_plugin:Runner\nnotarunner = odd_plugin:helper\n"
        "typo = odd_plugin:Missing\nfake = odd_plugin:helper",
        {
            "broken_plugin": "raise RuntimeError('this plugin is broken on purpose')\n",
            "odd_plugin": "def helper():\n    return None\n",
        },
    )
    seen = _python(BROKEN_STATUS, echo_site, broken)
    status = seen["status"]
    assert status["broken"] == "unavailable: RuntimeError: this plugin is broken on purpose"
    assert status["notarunner"].startswith("unavailable: not a runner")
    assert status["typo"].startswith("unavailable: ImportError") and "Missing" in status["typo"]
    assert status["echo"] == "available" and status["fake"] == "available"
    assert seen["fake"] == "runners.fake:FakeRunner"  # a plugin cannot take a built-in's name
    assert seen["echo"] == "EchoRunner"
    assert "RuntimeError" in seen["errors"]["broken"]
    assert "does not implement the runner protocol" in seen["errors"]["notarunner"]
    assert "Missing" in seen["errors"]["typo"]


def test_probe_shows_plugin_models_and_survives_a_broken_plugin(echo_site: Path, tmp_path: Path) -> None:
    """`aitbc-miner probe --json` advertises a model served by the plugin and reports a broken plugin's model."""
    broken = tmp_path / "broken-site"
    modules = {"broken_plugin": "raise RuntimeError('no')\n"}
    _fake_distribution(broken, "broken-runners", "broken = broken_plugin:Runner", modules)
    config = tmp_path / "miner.toml"
    config.write_text(
        f'miner_id = "plugin-test"\nstate_dir = "{tmp_path / "state"}"\n[gpus]\nenabled = false\n'
        '[[models]]\nname = "echo-demo"\nrunner = "echo"\nmode = "reverse"\n'
        '[[models]]\nname = "broken-model"\nrunner = "broken"\n'
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(echo_site), str(broken), str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-m", "miner", "probe", "--json", "--config", str(config)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    states = {m["name"]: m["runner_status"] for m in report["models"]}
    assert states["echo-demo"] == "available"
    assert states["broken-model"] == "unavailable: RuntimeError: no"
    assert report["capabilities"]["models"] == ["echo-demo"]


def test_daemon_runs_a_job_on_the_installed_plugin(
    echo_site: Path, tmp_path: Path, coordinator: RunningCoordinator, coordinator_client: Client
) -> None:
    """`aitbc-miner run` with a [[models]] entry naming the plugin's runner completes a job through it."""
    key_file = tmp_path / "miner-key"
    key_file.write_text(coordinator.miner_key)
    key_file.chmod(0o600)
    config = tmp_path / "miner.toml"
    config.write_text(
        f'miner_id = "echo-miner"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[coordinator]\nurl = "{coordinator.url}"\napi_key_file = "{key_file}"\nlong_poll_s = 1\n'
        '[gpus]\nenabled = false\n[metrics]\nenabled = false\n'
        '[[models]]\nname = "echo-demo"\nrunner = "echo"\nmode = "reverse"\n'
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(echo_site), str(REPO), env.get("PYTHONPATH", "")])
    miner = subprocess.Popen(
        [sys.executable, "-m", "miner", "run", "--config", str(config), "--max-jobs", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    final: dict[str, Any] = {"state": "not reached in time"}
    try:
        job = coordinator_client.submit_job({"model": "echo-demo", "prompt": "hello miner"})
        with contextlib.suppress(WaitTimeout):  # the assertion below shows the miner's log instead
            final = coordinator_client.wait(job["job_id"], timeout=60)
        if final["state"] == "COMPLETED":
            output = coordinator_client.get_job_result(job["job_id"])["result"]["output"]
            exit_code = miner.wait(timeout=60)
    finally:
        if miner.poll() is None:
            miner.kill()
        logs = miner.communicate()[0].decode(errors="replace")
    assert final["state"] == "COMPLETED", logs[-2000:]
    assert output == "renim olleh"
    assert exit_code == 0, logs[-2000:]
