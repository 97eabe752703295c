"""Security settings and safeguards: the private key file, transport to the coordinator, secrets in logs."""

from __future__ import annotations

import io
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest
import structlog
from nacl.signing import SigningKey

from miner.daemon.keyfile import KEY_FILE_NAME, load_key, load_or_create_key, write_key
from miner.daemon.settings import MinerSettings, load_settings
from miner.ops.logs import register_secret
from miner.ops.server import parse_listen
from miner.wire.errors import ConfigError
from miner.wire.net import check_http_url, is_loopback_host, is_remote_plain_http, parse_host_port
from miner.wire.secretfile import read_secret_file

MODELS = [{"name": "m", "runner": "fake"}]


def _settings(**overrides: Any) -> MinerSettings:
    overrides.setdefault("models", MODELS)
    return load_settings(None, **overrides)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# -- the receipt key file -------------------------------------------------------------


def test_stale_world_readable_tmp_does_not_leak_its_mode(tmp_path: Path) -> None:
    """A stale receipt-key tmp file left at mode 0644 is not reused: the new key file is 0600."""
    path = tmp_path / KEY_FILE_NAME
    stale = tmp_path / (KEY_FILE_NAME + ".tmp")
    stale.write_bytes(b"left over from a crash")
    stale.chmod(0o644)
    key = load_or_create_key(path)
    assert _mode(path) == 0o600 and not stale.exists()
    assert bytes(load_key(path)) == bytes(key)


def test_stale_tmp_symlink_is_not_written_through(tmp_path: Path) -> None:
    """A stale tmp that is a symlink to another file is replaced, never followed: that file keeps its bytes."""
    path = tmp_path / KEY_FILE_NAME
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    victim.chmod(0o644)
    (tmp_path / (KEY_FILE_NAME + ".tmp")).symlink_to(victim)
    load_or_create_key(path)
    assert victim.read_bytes() == b"precious" and _mode(victim) == 0o644
    assert not path.is_symlink() and path.stat().st_size == 32 and _mode(path) == 0o600


def test_write_key_replaces_a_key_privately(tmp_path: Path) -> None:
    """write_key over an existing key leaves a 0600 file holding the new seed and no tmp file behind."""
    path = tmp_path / KEY_FILE_NAME
    load_or_create_key(path)
    new = SigningKey.generate()
    write_key(path, new)
    assert bytes(load_key(path)) == bytes(new) and _mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEY_FILE_NAME]


def test_new_key_is_private_under_umask_zero(tmp_path: Path) -> None:
    """With umask 0 the new key file is still 0600 (the mode is set on the descriptor)."""
    previous = os.umask(0)
    try:
        load_or_create_key(tmp_path / "state" / KEY_FILE_NAME)
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "state" / KEY_FILE_NAME) == 0o600


# -- plain HTTP to the coordinator ------------------------------------------------------


@pytest.mark.parametrize("url", ["http://coord.example.net:8011", "http://10.0.0.5", "http://[2001:db8::1]:8011"])
def test_remote_plain_http_is_refused(url: str) -> None:
    """http:// to a host beyond loopback fails validation naming coordinator.url, the risk and both fixes."""
    with pytest.raises(ConfigError) as info:
        _settings(coordinator={"url": url})
    message = str(info.value)
    assert "\n" not in message and "coordinator.url" in message
    assert "API key" in message and "in clear" in message
    assert "https://" in message and "coordinator.allow_insecure_http = true" in message


@pytest.mark.parametrize("url", ["http://127.0.0.1:8011", "http://127.9.8.7", "http://[::1]:8011", "http://localhost:1"])
def test_loopback_http_stays_allowed(url: str) -> None:
    """http:// to 127.0.0.0/8, ::1 or localhost validates, with no transport warning."""
    assert _settings(coordinator={"url": url}).insecure_transport_warning() is None


def test_allowed_insecure_http_gives_one_warning_line() -> None:
    """coordinator.allow_insecure_http = true accepts a remote http:// URL and yields a one-line warning."""
    settings = _settings(coordinator={"url": "http://coord.example.net", "allow_insecure_http": True})
    warning = settings.insecure_transport_warning()
    assert warning is not None and "\n" not in warning
    assert "coord.example.net" in warning and "unencrypted" in warning
    assert _settings(coordinator={"url": "https://coord.example.net"}).insecure_transport_warning() is None


def test_allow_insecure_http_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """AITBC_MINER_COORDINATOR__ALLOW_INSECURE_HTTP=true works like the TOML setting."""
    monkeypatch.setenv("AITBC_MINER_COORDINATOR__URL", "http://coord.example.net")
    monkeypatch.setenv("AITBC_MINER_COORDINATOR__ALLOW_INSECURE_HTTP", "true")
    assert _settings().coordinator.url == "http://coord.example.net"


# -- coordinator.max_result_bytes -----------------------------------------------------


def test_max_result_bytes_default_and_bounds() -> None:
    """coordinator.max_result_bytes defaults to 1 MiB and must lie within 1024 bytes .. 64 MiB."""
    assert _settings().coordinator.max_result_bytes == 1 << 20
    assert _settings(coordinator={"max_result_bytes": 64 << 20}).coordinator.max_result_bytes == 64 << 20
    for bad in (1023, (64 << 20) + 1):
        with pytest.raises(ConfigError, match="coordinator.max_result_bytes"):
            _settings(coordinator={"max_result_bytes": bad})


# -- secrets the settings hold ----------------------------------------------------------


def test_secret_values_lists_every_configured_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """secret_values() holds the coordinator key from each source and every engine key, and no plain option."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "api-key").write_text("credential-key-0001\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    coordinator_file, engine_file = tmp_path / "coordinator.key", tmp_path / "engine.key"
    coordinator_file.write_text("file-key-0002\n")
    engine_file.write_text("sk-engine-file-0003\n")
    models = [
        {"name": "a", "runner": "openai", "base_url": "http://127.0.0.1:8000/v1", "api_key_file": str(engine_file)},
        {"name": "b", "runner": "openai", "base_url": "http://127.0.0.1:8001/v1",
         "extra_body": {"api_key": "inline-api-key-0004", "hf_token": "hf_token_value_0005", "top_k": 5}},
        {"name": "c", "runner": "plugin", "password": "plugin-password-0006", "client_secret": "client-secret-0007",
         "engine_api_key": "engine-api-key-0008", "api_key_file": str(tmp_path / "missing")},
    ]
    settings = _settings(coordinator={"api_key": "inline-key-0000", "api_key_file": str(coordinator_file)},
                         models=models)
    assert sorted(settings.secret_values()) == sorted([
        "inline-key-0000", "file-key-0002", "credential-key-0001", "sk-engine-file-0003",
        "inline-api-key-0004", "hf_token_value_0005", "plugin-password-0006", "client-secret-0007",
        "engine-api-key-0008",
    ])


def test_a_log_line_with_the_engine_key_prints_stars(tmp_path: Path, log_stream: io.StringIO) -> None:
    """Once the daemon registers secret_values(), a log line quoting the engine's API key shows *** instead."""
    engine_file = tmp_path / "engine.key"
    engine_file.write_text("sk-engine-secret-98765\n")
    settings = _settings(models=[{"name": "m", "runner": "openai", "base_url": "http://127.0.0.1:8000/v1",
                                  "api_key_file": str(engine_file)}])
    for value in settings.secret_values():
        register_secret(value)
    structlog.get_logger("t").warning("engine answered", header="Authorization: Bearer sk-engine-secret-98765")
    line = json.loads(log_stream.getvalue().splitlines()[-1])
    assert line["header"] == "Authorization: Bearer ***"
    assert "sk-engine-secret-98765" not in log_stream.getvalue()


def test_a_secret_containing_another_is_masked_whole(log_stream: io.StringIO) -> None:
    """When one registered secret contains another, the longer one is masked entirely."""
    register_secret("nested-secret")
    register_secret("outer-nested-secret-suffix")
    structlog.get_logger("t").info("value outer-nested-secret-suffix")
    assert "suffix" not in log_stream.getvalue() and "outer" not in log_stream.getvalue()


def test_one_reader_for_secret_files(tmp_path: Path) -> None:
    """The coordinator key file and an engine key file are read by one helper with the same one-line errors."""
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError) as info:
        _settings(coordinator={"api_key_file": str(empty)}).api_key()
    assert str(info.value) == f"coordinator.api_key_file: {empty} is empty; put the miner API key in it"
    with pytest.raises(ConfigError) as info:
        read_secret_file(tmp_path / "absent", "models[name='m'].api_key_file", "the engine's API key")
    assert str(info.value).startswith(f"models[name='m'].api_key_file: cannot read {tmp_path / 'absent'}: ")
    assert "check the path" in str(info.value)
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe hidden-bytes")
    with pytest.raises(ConfigError, match="is not UTF-8 text") as info:
        read_secret_file(binary, "coordinator.api_key_file")
    assert "hidden-bytes" not in str(info.value) and "\n" not in str(info.value)


# -- one check for HOST:PORT and URLs ---------------------------------------------------


def test_host_port_helper_and_both_callers_agree() -> None:
    """parse_host_port, metrics.listen validation and parse_listen accept and refuse the same values."""
    assert parse_host_port("[::1]:9477", "x") == ("::1", 9477)
    assert parse_listen("0.0.0.0:0") == ("0.0.0.0", 0)
    for bad, hint in [("9477", "HOST:PORT"), ("::1:9477", "[::1]:9477"), ("host:http", "port 'http'"),
                      ("host:70000", "0 to 65535"), ("[::1:9477", "bracketed IPv6"), ("a b:1", "white space")]:
        with pytest.raises(ValueError, match=rf"metrics\.listen: .*{re.escape(hint)}"):
            parse_listen(bad)
        with pytest.raises(ConfigError) as info:
            _settings(metrics={"listen": bad})
        assert "metrics.listen" in str(info.value) and hint in str(info.value)


def test_url_helper() -> None:
    """check_http_url refuses other schemes, a missing host, a bad port and (plain=True) credentials or a query."""
    assert check_http_url("https://h:8443/v1", "x").port == 8443
    for bad in ("ftp://h", "http://", "h:80", "http://h:99999"):
        with pytest.raises(ValueError, match="http:// or https:// URL such as EXAMPLE"):
            check_http_url(bad, "EXAMPLE")
    for bad in ("http://u:p@h/v1", "http://h/v1?key=k", "http://h/v1#f"):
        with pytest.raises(ValueError, match="without credentials, a query or a fragment"):
            check_http_url(bad, "EXAMPLE", plain=True)
    assert is_loopback_host("127.0.0.1") and is_loopback_host("[::1]") and not is_loopback_host("localhost.example")
    assert is_remote_plain_http("http://example.net") and not is_remote_plain_http("https://example.net")
