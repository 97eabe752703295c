"""`aitbc-miner check`: one test per problem it must catch (exit 1, one line naming the setting and
the fix), one good configuration (exit 0), settings that do not load (exit 2), and the module run
as a process. Real coordinator, a real tiny Llama, a real OpenAI-compatible engine, a simulated
GPU host from a file."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from miner.cli.main import main
from miner.daemon.keyfile import KEY_FILE_NAME, load_or_create_key
from miner.daemon.statelock import StateLock
from miner.ops.logs import reset_logging
from tests.gpuhost import write_host
from tests.servers import RunningCoordinator, free_port

ROOT = Path(__file__).resolve().parents[2]
PINNED = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    reset_logging()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from runners.tinyllama import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("check-models") / "tiny", hidden=64, layers=2, heads=4)


@pytest.fixture(scope="module")
def engine_url(tiny_model: Path) -> Iterator[str]:
    """A real OpenAI-compatible engine serving the tiny Llama as "tiny-llama"."""
    from tests.openai.engine import EngineKnobs, EngineLog, EngineServer, TinyEngine, create_engine_app

    server = EngineServer(create_engine_app(TinyEngine(tiny_model), EngineKnobs(), EngineLog())).start()
    yield server.base_url
    server.stop()


def _value(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(str(value) if isinstance(value, Path) else value)


def _table(values: Mapping[str, Any]) -> str:
    return "".join(f"{key} = {_value(value)}\n" for key, value in values.items() if value is not None)


def write_config(
    tmp_path: Path,
    coordinator_url: str,
    models: Sequence[Mapping[str, Any]],
    *,
    api_key: str | None = "miner-key",
    metrics_listen: str | None = None,
    gpus: Mapping[str, Any] | None = None,
    **top: Any,
) -> Path:
    """A miner.toml: CPU mode unless ``gpus``, metrics off unless ``metrics_listen``."""
    text = _table({"miner_id": "rig-check", "state_dir": tmp_path / "state", **top})
    text += "\n[coordinator]\n" + _table({"url": coordinator_url, "api_key": api_key, "timeout_s": 5})
    text += "\n[gpus]\n" + _table(gpus if gpus is not None else {"enabled": False})
    metrics = {"enabled": True, "listen": metrics_listen} if metrics_listen else {"enabled": False}
    text += "\n[metrics]\n" + _table(metrics)
    for model in models:
        text += "\n[[models]]\n" + _table(model)
    path = tmp_path / "miner.toml"
    path.write_text(text, encoding="utf-8")
    return path


def check(config: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, list[str]]:
    """Run `aitbc-miner check`; (exit status, stdout, the problem lines)."""
    code = main(["check", "--config", str(config), *extra])
    out = capsys.readouterr().out
    return code, out, [line for line in out.splitlines() if line.startswith("problem: ")]


def one_problem(config: Path, capsys: pytest.CaptureFixture[str]) -> str:
    code, out, problems = check(config, capsys)
    assert code == 1, out
    assert len(problems) == 1, out
    return problems[0]


def tiny(path: Path | str, name: str = "tiny", **options: Any) -> dict[str, Any]:
    return {"name": name, "runner": "transformers", "path": str(path), **options}


@pytest.fixture
def model_copy(tiny_model: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(tiny_model, dest)
    return dest


# -- the good configuration ------------------------------------------------------------------


def test_good_configuration_exits_0(
    coordinator: RunningCoordinator,
    tiny_model: Path,
    engine_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A configuration `run` would serve: every check passes, exit 0, and --json says the same."""
    config = write_config(
        tmp_path,
        coordinator.url,
        [
            tiny(tiny_model, device="cpu"),
            {"name": "tiny-llama", "runner": "openai", "base_url": engine_url},
            {"name": "echo", "runner": "fake"},
        ],
        metrics_listen=f"127.0.0.1:{free_port()}",
    )
    code, out, problems = check(config, capsys)
    assert code == 0, out
    assert problems == []
    assert "all checks passed" in out
    for name in ("api_key", "state_dir", "metrics", "coordinator", "model tiny", "model tiny-llama", "model echo"):
        assert f"ok: {name}: " in out, out
    assert "miner-key" not in out  # the key is never printed

    code, out, _ = check(config, capsys, "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] is True and report["problems"] == []
    assert {p["check"] for p in report["passed"]} >= {"coordinator", "metrics", "model tiny-llama"}
    assert not (tmp_path / "state").exists()  # check creates nothing


# -- the list ---------------------------------------------------------------------


def test_missing_model_path(
    coordinator: RunningCoordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, coordinator.url, [tiny(tmp_path / "no-such-model")])
    line = one_problem(config, capsys)
    assert "models[name='tiny'].path" in line and "no-such-model" in line and "save_pretrained" in line


def test_folder_with_only_pickle_weights(
    coordinator: RunningCoordinator, model_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (model_copy / "model.safetensors").rename(model_copy / "pytorch_model.bin")
    config = write_config(tmp_path, coordinator.url, [tiny(model_copy)])
    line = one_problem(config, capsys)
    assert "models[name='tiny'].path" in line and "pickle" in line and "pytorch_model.bin" in line
    assert "safe_serialization=True" in line


def test_hub_id_without_pinned_revision(
    coordinator: RunningCoordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, coordinator.url, [tiny("example-org/example-model", revision="main")])
    line = one_problem(config, capsys)
    assert "models[name='tiny'].revision" in line and "40 hex" in line and "'main'" in line


def test_pinned_hub_model_missing_from_the_cache_offline(
    coordinator: RunningCoordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF_HUB_OFFLINE with a pinned hub id that is not cached: the start-up fetch would fail."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache (environment, not our code)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = write_config(tmp_path, coordinator.url, [tiny("example-org/example-model", revision=PINNED)])
    line = one_problem(config, capsys)
    assert "models[name='tiny'].path" in line and "HF_HUB_OFFLINE" in line and "local folder" in line


def test_typo_in_a_model_option(
    coordinator: RunningCoordinator, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, coordinator.url, [tiny(tiny_model, max_new_tokns=64)])
    line = one_problem(config, capsys)
    assert "models[name='tiny'].max_new_tokns" in line and "fix it in the [[models]] table" in line


def test_dtype_fp16(
    coordinator: RunningCoordinator, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, coordinator.url, [tiny(tiny_model, dtype="fp16")])
    line = one_problem(config, capsys)
    assert "models[name='tiny'].dtype" in line and "'float16'" in line and "'bfloat16'" in line


def test_no_api_key(
    coordinator: RunningCoordinator,
    tiny_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    config = write_config(tmp_path, coordinator.url, [tiny(tiny_model)], api_key=None)
    line = one_problem(config, capsys)
    assert "coordinator.api_key" in line and "api_key_file" in line and "AITBC_MINER_COORDINATOR__API_KEY" in line


def test_engine_that_cannot_be_reached(
    coordinator: RunningCoordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    config = write_config(tmp_path, coordinator.url, [{"name": "m", "runner": "openai", "base_url": url}])
    line = one_problem(config, capsys)
    assert "models[name='m'].base_url" in line and url in line and "not reachable" in line
    assert "start the engine or fix base_url" in line


def test_engine_that_does_not_serve_the_model(
    coordinator: RunningCoordinator, engine_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = [{"name": "m", "runner": "openai", "base_url": engine_url, "served_model": "llama-70b"}]
    line = one_problem(write_config(tmp_path, coordinator.url, models), capsys)
    assert "models[name='m'].served_model" in line and "'llama-70b'" in line and "tiny-llama" in line


# -- the rest of what check covers ----------------------------------------------------------


def test_model_without_a_tokenizer(
    coordinator: RunningCoordinator, model_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (model_copy / "tokenizer.json").unlink()
    line = one_problem(write_config(tmp_path, coordinator.url, [tiny(model_copy)]), capsys)
    assert "models[name='tiny'].path" in line and "no tokenizer" in line and "save_pretrained" in line


def test_model_that_does_not_fit_its_gpu(
    coordinator: RunningCoordinator, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = write_host(tmp_path / "host.json", count=2, per_gpu={1: {"free_mb": 0}})
    config = write_config(
        tmp_path, coordinator.url, [tiny(tiny_model, devices=[1])], gpus={"enabled": True}, fake_nvml=host
    )
    line = one_problem(config, capsys)
    assert "models[name='tiny'].devices" in line and "GPU 1" in line and "0.0 MiB are available" in line
    assert "devices = [0, 1]" in line


def test_memory_budget_too_small_on_the_cpu(
    coordinator: RunningCoordinator, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(
        tmp_path, coordinator.url, [tiny(tiny_model, device="cpu", memory_budget_mb=1, max_new_tokens=2000)]
    )
    line = one_problem(config, capsys)
    assert "models[name='tiny'].memory_budget_mb" in line and "the CPU" in line and "raise memory_budget_mb" in line


def test_torch_cannot_use_the_gpus(
    coordinator: RunningCoordinator, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """NVML (here a simulated host) sees GPUs that torch cannot use: the start-up error, ahead of time."""
    # A PCI address no real GPU has, so a CUDA build on a GPU host cannot match it either.
    host = write_host(tmp_path / "host.json", count=1, per_gpu={0: {"pci_bus_id": "0000ABCD:FE:1F.0"}})
    config = write_config(tmp_path, coordinator.url, [tiny(tiny_model)], gpus={"enabled": True}, fake_nvml=host)
    line = one_problem(config, capsys)
    # A CPU build cannot use them; a CUDA build here does not see the simulated GPU's UUID.
    assert "torch" in line
    assert ("NVML sees 1 GPU(s)" in line and "pip" in line) or "is not visible to torch" in line


def test_unknown_gpu_in_gpus_devices(
    coordinator: RunningCoordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = write_host(tmp_path / "host.json", count=1)
    config = write_config(
        tmp_path,
        coordinator.url,
        [{"name": "echo", "runner": "fake"}],
        gpus={"enabled": True, "devices": [3]},
        fake_nvml=host,
    )
    line = one_problem(config, capsys)
    assert "gpus.devices" in line and "no GPU 3" in line and "aitbc-miner probe" in line


def test_state_folder_in_use_by_another_miner(
    coordinator: RunningCoordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lock = StateLock(tmp_path / "state")
    lock.acquire()
    try:
        line = one_problem(write_config(tmp_path, coordinator.url, [{"name": "echo", "runner": "fake"}]), capsys)
    finally:
        lock.release()
    assert "state_dir" in line and f"pid {os.getpid()}" in line and "stop that one first" in line


def test_state_folder_that_cannot_be_created(
    coordinator: RunningCoordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    config = write_config(
        tmp_path, coordinator.url, [{"name": "echo", "runner": "fake"}], state_dir=tmp_path / "a-file" / "state"
    )
    line = one_problem(config, capsys)
    assert line.startswith("problem: state_dir: ") and "cannot be created" in line and "writable folder" in line


def test_receipt_key_readable_by_others(
    coordinator: RunningCoordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "state" / KEY_FILE_NAME
    load_or_create_key(key)
    key.chmod(0o644)
    line = one_problem(write_config(tmp_path, coordinator.url, [{"name": "echo", "runner": "fake"}]), capsys)
    assert "state_dir" in line and "mode 644" in line and f"chmod 600 {key}" in line


def test_metrics_port_in_use(
    coordinator: RunningCoordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        listen = f"127.0.0.1:{busy.getsockname()[1]}"
        config = write_config(tmp_path, coordinator.url, [{"name": "echo", "runner": "fake"}], metrics_listen=listen)
        line = one_problem(config, capsys)
    assert "metrics.listen" in line and listen in line and "free that port" in line


def test_coordinator_that_cannot_be_reached(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    line = one_problem(write_config(tmp_path, url, [{"name": "echo", "runner": "fake"}]), capsys)
    assert "coordinator.url" in line and url in line and "coordinator is up" in line


def test_api_key_the_coordinator_refuses(
    coordinator: RunningCoordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, coordinator.url, [{"name": "echo", "runner": "fake"}], api_key="wrong-key-1234")
    code, out, problems = check(config, capsys)
    assert code == 1 and len(problems) == 1, out
    assert "coordinator.api_key" in problems[0] and "401" in problems[0] and "miner API key" in problems[0]
    assert "wrong-key-1234" not in out


def test_unknown_runner(coordinator: RunningCoordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = one_problem(write_config(tmp_path, coordinator.url, [{"name": "m", "runner": "vllmm"}]), capsys)
    assert "models[name='m'].runner" in line and "unknown runner 'vllmm'" in line and "openai" in line


# -- settings that do not load, --json, the module as a process -------------------------


def test_settings_that_do_not_load_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "miner.toml"
    config.write_text('[coordinator]\nurll = "http://127.0.0.1:1"\n[[models]]\nname = "m"\n', encoding="utf-8")
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "coordinator.urll" in err
    assert main(["check", "--config", str(config), "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and "coordinator.urll" in report["problems"][0]["message"]


def test_module_runs_as_a_process_with_json(tmp_path: Path) -> None:
    """`python -m miner.cli.check --config F --json`: scripts read the problems and the exit status."""
    url = f"http://127.0.0.1:{free_port()}"
    config = write_config(tmp_path, url, [{"name": "echo", "runner": "fake", "delay": 1}])
    env = {k: v for k, v in os.environ.items() if not k.startswith("AITBC_MINER_")}
    proc = subprocess.run(
        [sys.executable, "-m", "miner.cli.check", "--config", str(config), "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is False
    assert {p["setting"] for p in report["problems"]} == {"coordinator.url", "models[name='echo'].delay"}
    assert all(len(p["message"].splitlines()) == 1 for p in report["problems"])


def test_probe_points_at_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`probe` stays the "what would be registered" view and names `check` for "would it serve"."""
    config = write_config(tmp_path, "http://127.0.0.1:9", [{"name": "echo", "runner": "fake"}])
    assert main(["probe", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"aitbc-miner check --config {config}" in out
