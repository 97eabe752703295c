"""The command line: ``run`` exit codes and one-line errors, and ``demo`` end to end."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from miner.cli.main import main
from miner.ops.logs import reset_logging

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    reset_logging()


def _config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "miner.toml"
    path.write_text(body, encoding="utf-8")
    return path


BASE = """miner_id = "rig-cli"
state_dir = "{state}"
[coordinator]
url = "http://127.0.0.1:9"
api_key = "cli-test-key-123"
[gpus]
enabled = false
[metrics]
enabled = false
[[models]]
name = "llama2"
runner = "fake"
"""


def test_missing_config_file_is_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A --config path that does not exist stops with exit 2 and one line naming the fix."""
    assert main(["run", "--config", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope.toml" in err and "--config" in err


def test_bad_runner_option_is_exit_2_naming_the_setting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown option in a [[models]] table fails start-up with exit 2 naming that model and option."""
    config = _config(tmp_path, BASE.format(state=tmp_path / "state") + "delay = 3\n")
    assert main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "llama2" in err and "delay" in err


def test_unknown_runner_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A [[models]] runner that does not exist stops start-up with exit 2 listing the known runners."""
    config = _config(
        tmp_path, BASE.format(state=tmp_path / "state").replace('runner = "fake"', 'runner = "warp-drive"')
    )
    assert main(["run", "--config", str(config)]) == 2
    assert "warp-drive" in capsys.readouterr().err


def test_unusable_state_folder_is_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A state_dir that cannot be created (a file is in the way) stops with exit 1 and says why."""
    blocker = tmp_path / "state"
    blocker.write_text("not a folder")
    config = _config(tmp_path, BASE.format(state=blocker / "inner"))
    assert main(["run", "--config", str(config)]) == 1
    assert "cannot use the state folder" in capsys.readouterr().err  # the lock is the first thing to touch it


def test_max_jobs_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--max-jobs 0 is refused as a configuration error."""
    config = _config(tmp_path, BASE.format(state=tmp_path / "state"))
    assert main(["run", "--config", str(config), "--max-jobs", "0"]) == 2
    assert "--max-jobs" in capsys.readouterr().err


def test_demo_runs_offline_and_verifies_its_receipt() -> None:
    """`python -m miner demo --runner fake` prints the output and a verified receipt and exits 0."""
    done = subprocess.run(
        [sys.executable, "-m", "miner", "demo", "--runner", "fake"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "receipt verified" in done.stdout and '"alg": "Ed25519"' in done.stdout


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("torch", "transformers")), reason="needs the transformers extra"
)
def test_demo_auto_uses_the_transformers_runner_when_installed() -> None:
    """`make demo` (runner auto) serves the job with the transformers runner on a tiny offline Llama."""
    done = subprocess.run(
        [sys.executable, "-m", "miner", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "transformers runner" in done.stdout and "receipt verified" in done.stdout
    assert '"runner": "transformers"' in done.stdout


def _subcommands() -> dict[str, object]:
    from miner.cli.main import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return dict(action.choices or {})


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_command_help_has_defaults_and_an_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`aitbc-miner COMMAND --help`: exit 0, an examples block that uses the command, defaults shown."""
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    examples = text.split("examples:", 1)[1]
    assert f"aitbc-miner {command}" in examples
    if command in {"run", "probe", "config"}:
        assert "env: AITBC_MINER_CONFIG" in text and "/etc/aitbc-miner/miner.toml" in text
    if command in {"keygen", "coordinator", "status"}:
        assert "(default: " in text


def test_help_names_option_defaults_and_variables(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["coordinator", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "listen port (default: 8011)" in text
    assert "env: AITBC_COORDINATOR_MINER_KEYS" in text
    with pytest.raises(SystemExit):
        main(["keygen", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "env: AITBC_MINER_STATE_DIR" in text and "(default: /var/lib/aitbc-miner)" in text


def test_version_comes_from_the_package(capsys: pytest.CaptureFixture[str]) -> None:
    import miner

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"aitbc-miner {miner.__version__}"
