"""systemd notification: datagrams to $NOTIFY_SOCKET, watchdog timing from the environment."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from miner.ops.notify import Notifier


def _bind(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    return sock


def test_messages_reach_a_path_socket(tmp_path: Path) -> None:
    """ready, watchdog, status and stopping each send one datagram in the sd_notify format."""
    path = tmp_path / "notify.sock"
    receiver = _bind(path)
    try:
        n = Notifier({"NOTIFY_SOCKET": str(path)})
        assert n.enabled
        assert n.ready("serving 2 models")
        assert n.watchdog()
        assert n.status("3 jobs\nin flight")
        assert n.stopping()
        got = [receiver.recv(4096).decode() for _ in range(4)]
    finally:
        receiver.close()
    assert got == ["READY=1\nSTATUS=serving 2 models", "WATCHDOG=1", "STATUS=3 jobs in flight", "STOPPING=1"]


def test_abstract_socket(tmp_path: Path) -> None:
    """An '@name' NOTIFY_SOCKET is the abstract unix namespace."""
    name = f"aitbc-miner-test-{os.getpid()}-{tmp_path.name}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + name)
    receiver.settimeout(5)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.watchdog()
        message = receiver.recv(4096).decode()
    finally:
        receiver.close()
    assert message == "WATCHDOG=1"


def test_unset_socket_is_a_no_op() -> None:
    """Without NOTIFY_SOCKET every call returns False and nothing is opened."""
    n = Notifier({})
    assert not n.enabled
    assert not n.ready() and not n.watchdog() and not n.stopping() and not n.status("x")
    assert n.watchdog_interval() is None


def test_send_errors_never_raise(tmp_path: Path) -> None:
    """A socket path with nobody listening makes sends return False instead of raising."""
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert n.enabled
    assert n.ready() is False
    assert n.watchdog() is False


def test_environment_is_read_at_construction(tmp_path: Path, monkeypatch) -> None:
    """The Notifier reads os.environ when constructed, not at import or at send time."""
    path = tmp_path / "n.sock"
    receiver = _bind(path)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        n = Notifier()
        monkeypatch.delenv("NOTIFY_SOCKET")
        assert n.watchdog()
        assert receiver.recv(100) == b"WATCHDOG=1"
        assert not Notifier().enabled
    finally:
        receiver.close()


def test_watchdog_interval_from_usec_and_pid() -> None:
    """Half of WATCHDOG_USEC is the ping interval, unless WATCHDOG_PID names another process."""
    n = Notifier({"WATCHDOG_USEC": "30000000"})
    assert n.watchdog_interval() == 15.0
    assert Notifier({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_interval() == 2.0
    assert Notifier({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval() is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_interval() is None
    assert Notifier({"WATCHDOG_USEC": "soon"}).watchdog_interval() is None
