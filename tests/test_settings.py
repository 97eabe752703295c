"""Settings: TOML, environment overrides, secrets from files, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from miner.daemon.settings import load_settings
from miner.wire.errors import ConfigError

BASE = """
miner_id = "rig-01"
state_dir = "{state}"
[coordinator]
url = "http://127.0.0.1:8011"
api_key_file = "{key}"
[[models]]
name = "llama2"
runner = "fake"
delay_s = 0.2
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    key = tmp_path / "api-key"
    key.write_text("miner-secret\n")
    path = tmp_path / "miner.toml"
    path.write_text(BASE.format(state=tmp_path / "state", key=key))
    return path


def test_toml_file_loads_with_runner_options_in_the_model_table(config: Path) -> None:
    """The issue's example config loads; runner options stay with their model."""
    settings = load_settings(config)
    assert settings.miner_id == "rig-01"
    assert settings.models[0].name == "llama2" and settings.models[0].options() == {"delay_s": 0.2}
    assert settings.api_key() == "miner-secret"
    assert settings.concurrency is None  # no cap: claiming follows what the runners can take


def test_environment_overrides_the_file(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AITBC_MINER_ variables with __ nesting win over the TOML file."""
    monkeypatch.setenv("AITBC_MINER_COORDINATOR__URL", "https://coord.example:8443/")
    monkeypatch.setenv("AITBC_MINER_CONCURRENCY", "3")
    settings = load_settings(config)
    assert settings.coordinator.url == "https://coord.example:8443"
    assert settings.concurrency == 3


def test_api_key_from_systemd_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a key setting, $CREDENTIALS_DIRECTORY/api-key is used."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "api-key").write_text("from-credential")
    path = tmp_path / "m.toml"
    path.write_text('[[models]]\nname = "m"\nrunner = "fake"\n')
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert load_settings(path).api_key() == "from-credential"


def test_missing_api_key_says_every_way_to_set_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No key anywhere: one line naming the setting, the env variable and the credential."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    path = tmp_path / "m.toml"
    path.write_text('[[models]]\nname = "m"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path).api_key()
    message = str(info.value)
    assert "coordinator.api_key" in message and "AITBC_MINER_COORDINATOR__API_KEY" in message and "\n" not in message


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ('miner_id = "x"\n', ["no models configured", "[[models]]"]),
        ('minr_id = "x"\n[[models]]\nname = "m"\n', ["minr_id", "not a known setting"]),
        (
            '[coordinator]\nurl = "ftp://x"\n[[models]]\nname = "m"\n',
            ["coordinator.url", "AITBC_MINER_COORDINATOR__URL"],
        ),
        ('concurrency = 0\n[[models]]\nname = "m"\n', ["concurrency", "greater than or equal to 1"]),
        ('[[models]]\nname = "m"\n[[models]]\nname = "m"\n', ["appears twice"]),
        ('[metrics]\nlisten = "9477"\n[[models]]\nname = "m"\n', ["metrics.listen", "HOST:PORT"]),
        ("miner_id = \n", ["not valid TOML"]),
    ],
)
def test_bad_settings_stop_with_one_line_naming_the_setting(tmp_path: Path, text: str, fragments: list[str]) -> None:
    """Each bad setting gives a single line that names it and the fix."""
    path = tmp_path / "m.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_explicit_missing_config_file_is_an_error(tmp_path: Path) -> None:
    """--config naming a file that does not exist stops with the path in the message."""
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
