"""Where settings come from: errors that name the variable, unknown variables, and `aitbc-miner config`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from miner.cli.main import CONFIG_ENV as CLI_CONFIG_ENV
from miner.cli.main import main
from miner.daemon.settings import CONFIG_ENV, Origin, known_env_variables, load_settings
from miner.wire.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

BASE = """miner_id = "rig-src"
state_dir = "{state}"
concurrency = 2
[coordinator]
url = "http://127.0.0.1:8011"
api_key_file = "{key}"
[gpus]
devices = [0]
[[models]]
name = "llama2"
runner = "openai"
base_url = "http://engine-user:engine-pass@127.0.0.1:8000/v1"
api_key = "sk-engine-secret"
"""


@pytest.fixture(autouse=True)
def _no_miner_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from an environment with no AITBC_MINER_* variable and no systemd credential."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("AITBC_MINER_"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    key = tmp_path / "api-key"
    key.write_text("coordinator-secret-key\n")
    path = tmp_path / "miner.toml"
    path.write_text(BASE.format(state=tmp_path / "state", key=key))
    return path


def _error(config: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_bad_value_from_a_variable_names_the_variable_not_the_file(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """concurrency is fine in the file; the variable that overrides it is what the line blames."""
    monkeypatch.setenv("AITBC_MINER_CONCURRENCY", "lots")
    message = _error(config)
    assert "fix or unset AITBC_MINER_CONCURRENCY" in message
    assert f"fix concurrency in {config}" not in message


def test_a_bad_nested_value_from_a_variable_names_it(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """coordinator.url from AITBC_MINER_COORDINATOR__URL: the variable is named."""
    monkeypatch.setenv("AITBC_MINER_COORDINATOR__URL", "ftp://coordinator.example")
    message = _error(config)
    assert message.startswith("config error: coordinator.url:")
    assert "fix or unset AITBC_MINER_COORDINATOR__URL" in message


def test_a_bad_value_in_the_file_still_names_the_file(config: Path) -> None:
    """Without a variable, the file and the variable that could override it are named, as before."""
    config.write_text(config.read_text().replace("concurrency = 2", "concurrency = 0"))
    message = _error(config)
    assert f"fix concurrency in {config} or AITBC_MINER_CONCURRENCY" in message


def test_bad_json_in_a_list_variable_names_the_variable(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AITBC_MINER_GPUS__DEVICES='[0,' is not JSON: the line names that variable, not the TOML file."""
    monkeypatch.setenv("AITBC_MINER_GPUS__DEVICES", "[0,")
    message = _error(config)
    assert message.startswith("config error: AITBC_MINER_GPUS__DEVICES: not valid JSON")
    assert "TOML" not in message and str(config) not in message


def test_a_bad_entry_inside_a_json_variable_names_the_entry_and_the_variable(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AITBC_MINER_MODELS holds the whole list: the entry's setting and the variable are named."""
    monkeypatch.setenv("AITBC_MINER_MODELS", json.dumps([{"name": 7}]))
    message = _error(config)
    assert "models[0].name" in message and "fix models[0].name in AITBC_MINER_MODELS" in message


@pytest.mark.parametrize(
    ("variable", "closest"),
    [
        ("AITBC_MINER_CONCURENCY", "AITBC_MINER_CONCURRENCY"),
        ("AITBC_MINER_COORDINATOR__URLL", "AITBC_MINER_COORDINATOR__URL"),
        ("AITBC_MINER_GPU__DEVICES", "AITBC_MINER_GPUS__DEVICES"),
        ("aitbc_miner_state_dri", "AITBC_MINER_STATE_DIR"),
    ],
)
def test_an_unknown_variable_stops_start_up_naming_the_closest_known_one(
    config: Path, monkeypatch: pytest.MonkeyPatch, variable: str, closest: str
) -> None:
    """A misspelt variable is an error, as an unknown TOML key is, with the name it was probably meant to be."""
    monkeypatch.setenv(variable, "3")
    message = _error(config)
    assert message.startswith(f"config error: {variable}: not a known setting")
    assert f"did you mean {closest}?" in message
    assert "remove" not in message and str(config) not in message


def test_an_unknown_variable_with_no_close_name_is_still_an_error(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AITBC_MINER_ZZZZZZZZZZZZZZZZ", "1")
    message = _error(config)
    assert "AITBC_MINER_ZZZZZZZZZZZZZZZZ: not a known setting;" in message and "did you mean" not in message


def test_known_variables_that_are_not_plain_settings_stay_allowed(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AITBC_MINER_FAKE_NVML (the fake_nvml setting), AITBC_MINER_CONFIG and a lower-case name all load."""
    host = tmp_path / "host.json"
    host.write_text("{}")
    monkeypatch.setenv("AITBC_MINER_FAKE_NVML", str(host))
    monkeypatch.setenv(CONFIG_ENV, str(config))
    monkeypatch.setenv("aitbc_miner_region", "eu-west")
    settings = load_settings(config)
    assert settings.fake_nvml == host and settings.region == "eu-west"
    assert CLI_CONFIG_ENV == CONFIG_ENV


def test_every_variable_the_project_uses_is_known() -> None:
    """The names in the shipped examples, docs, units and code are all known, so none stops a start
    (the docs' own example of a misspelt name, the one followed by its error, aside)."""
    known = set(known_env_variables())
    used: set[str] = set()
    name = re.compile(r"AITBC_MINER_[A-Z0-9_]*[A-Z0-9](?!: not a known setting)\b")
    for folder in ("config", "docs", "systemd", "docker", "miner", "runners"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in {".py", ".md", ".toml", ".example", ".yml", ".yaml", ".service", ""}:
                used.update(name.findall(path.read_text(errors="replace")))
    for dockerfile in ROOT.glob("Dockerfile*"):
        used.update(name.findall(dockerfile.read_text()))
    assert "AITBC_MINER_FAKE_NVML" in used and "AITBC_MINER_COORDINATOR__URL" in used
    assert used - known == set()


def test_origin_says_file_env_or_default(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AITBC_MINER_COORDINATOR__TIMEOUT_S", "20")
    settings = load_settings(config)
    assert settings.origin(("miner_id",)) == Origin("file", str(config))
    assert settings.origin(("coordinator", "timeout_s")) == Origin("env", "AITBC_MINER_COORDINATOR__TIMEOUT_S")
    assert settings.origin(("coordinator", "long_poll_s")) == Origin("default")
    assert settings.origin(("models", 0, "base_url")) == Origin("file", str(config))


def test_config_command_shows_each_source_and_masks_secrets(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Text output: file, env, credential and default rows; no secret appears anywhere."""
    monkeypatch.setenv("AITBC_MINER_PRICE", "0.5")
    assert main(["config", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert rows["price"].split()[1:] == ["0.5", "env", "AITBC_MINER_PRICE"]
    assert rows["miner_id"].split()[1:] == ['"rig-src"', "file", str(config)]
    assert rows["drain_grace_s"].split()[1:] == ["30.0", "default"]
    assert rows["coordinator.api_key"].split()[1:] == ['"***"', "credential", str(config.parent / "api-key")]
    assert rows["models[0].api_key"].split()[1] == '"***"'
    assert "engine-user:***@" in rows["models[0].base_url"]
    for secret in ("coordinator-secret-key", "sk-engine-secret", "engine-pass"):
        assert secret not in out


def test_config_command_json_and_the_systemd_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json, with AITBC_MINER_CONFIG as the --config default and the key from $CREDENTIALS_DIRECTORY."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "api-key").write_text("credential-secret")
    path = tmp_path / "m.toml"
    path.write_text(f'state_dir = "{tmp_path}"\n[[models]]\nname = "m"\nrunner = "fake"\n')
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.setenv(CONFIG_ENV, str(path))
    assert main(["config", "--json"]) == 0
    out = capsys.readouterr().out
    doc = json.loads(out)
    assert doc["config_file"] == str(path)
    by_name = {row["setting"]: row for row in doc["settings"]}
    assert by_name["coordinator.api_key"] == {
        "setting": "coordinator.api_key",
        "value": "***",
        "source": "credential",
        "from": str(creds / "api-key"),
    }
    assert by_name["models[0].runner"]["source"] == "file"
    assert by_name["log.level"] == {"setting": "log.level", "value": "info", "source": "default", "from": ""}
    assert "credential-secret" not in out


def test_config_command_rejects_what_run_rejects(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 2 with the same one line `run` would print."""
    monkeypatch.setenv("AITBC_MINER_CONCURENCY", "4")
    assert main(["config", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("config error: AITBC_MINER_CONCURENCY") and "\n" not in err
