"""``aitbc-miner coordinator``: defaults on loopback, keys from options and environment, refusal beyond loopback."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from coordinator.server import CLIENT_KEYS_ENV, MINER_KEYS_ENV, collect_keys, serve_from_cli
from miner.cli.main import build_parser
from miner.wire.net import is_loopback_host
from tests.servers import free_port

REPO = Path(__file__).resolve().parents[2]


def test_refuses_to_listen_beyond_loopback_without_keys(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Without keys, a non-loopback host is refused with one line on stderr and exit code 2."""
    args = build_parser().parse_args(["coordinator", "--host", "0.0.0.0", "--db", str(tmp_path / "c.db")])
    assert serve_from_cli(args, environ={}) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--client-key" in err and MINER_KEYS_ENV in err
    assert not (tmp_path / "c.db").exists()


def test_keys_come_from_options_and_environment() -> None:
    """Keys are the repeated options plus the comma-separated environment variable, blanks and repeats dropped."""
    environ = {CLIENT_KEYS_ENV: "env-1, env-2,,", MINER_KEYS_ENV: ""}
    assert collect_keys(["cli-1", "env-1"], CLIENT_KEYS_ENV, environ) == ["cli-1", "env-1", "env-2"]
    assert collect_keys([], MINER_KEYS_ENV, environ) == []


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                                ("127.8.9.10", True), ("[::1]", True), ("LOCALHOST", True),
                                                ("0.0.0.0", False), ("192.168.1.5", False), ("example.org", False)])
def test_loopback_detection(host: str, loopback: bool) -> None:
    """Only loopback addresses count as loopback."""
    assert is_loopback_host(host) is loopback


def test_coordinator_command_starts_with_defaults(tmp_path: Path) -> None:
    """`aitbc-miner coordinator` without keys generates and prints one of each, serves with them, stops on SIGTERM."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in (CLIENT_KEYS_ENV, MINER_KEYS_ENV)}
    env["PYTHONPATH"] = str(REPO)
    process = subprocess.Popen(
        [sys.executable, "-m", "miner", "coordinator", "--port", str(port), "--db", str(tmp_path / "c.db"),
         "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(5)]
        text = "".join(lines)
        client_key = re.search(r"client key: (\S+)", text)
        miner_key = re.search(r"miner key:\s+(\S+)", text)
        receipt_key = re.search(r"coordinator receipt key_id: (\S+)", text)
        assert client_key and miner_key and receipt_key, text
        assert (tmp_path / "c.db.receipt-key").exists()
        url = f"http://127.0.0.1:{port}"
        pause = threading.Event()
        for _ in range(200):
            try:
                response = httpx.post(f"{url}/v1/jobs", json={"payload": {"prompt": "x"}},
                                      headers={"X-Api-Key": client_key.group(1)})
                break
            except httpx.ConnectError:
                pause.wait(0.05)
        assert response.status_code == 201
        registered = httpx.post(f"{url}/v1/miners/register", json={"capabilities": {}},
                                headers={"X-Api-Key": miner_key.group(1), "X-Miner-ID": "m"})
        assert registered.status_code == 200
        assert httpx.get(f"{url}/v1/receipts/key").json()["key_id"] == receipt_key.group(1)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=20)
        if process.stdout is not None:
            process.stdout.close()
    assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown


def test_parser_accepts_quirks_option() -> None:
    """The coordinator subcommand takes --quirks reference and --no-rate-limits."""
    args = build_parser().parse_args(["coordinator", "--quirks", "reference", "--no-rate-limits"])
    assert isinstance(args, argparse.Namespace)
    assert args.quirks == "reference" and args.no_rate_limits is True
