"""systemd service notification (``sd_notify``) without libsystemd.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET`` (a unix datagram socket path, or
``@name`` for an abstract socket) and, with ``WatchdogSec=``, ``$WATCHDOG_USEC`` (and
sometimes ``$WATCHDOG_PID``). The daemon says ``READY=1`` once its models are loaded
(registering follows), ``WATCHDOG=1`` from its watchdog loop, ``STATUS=...`` as a one-line summary for
``systemctl status``, and ``STOPPING=1`` when it starts draining.

Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger("miner.ops.notify")


class Notifier:
    """Sends ``sd_notify`` messages to the socket named by the environment.

    Contract: the environment is read once, when the Notifier is constructed (pass
    ``env`` to use another mapping than ``os.environ``). Every method returns ``True``
    when a datagram was sent and ``False`` otherwise; none raises, so a vanished or
    full socket never takes the daemon down (the first failure is logged once).
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._address = _address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_s = _watchdog_seconds(env)
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True when ``$NOTIFY_SOCKET`` names a socket this class can write to."""
        return self._address is not None

    def watchdog_interval(self) -> float | None:
        """How often to call :meth:`watchdog`: half of ``WatchdogSec`` (``None`` when off)."""
        return None if self._watchdog_s is None else self._watchdog_s / 2

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` (``KEY=value`` each) as one datagram; False if disabled or failed."""
        if self._address is None or not lines:
            return False
        payload = "\n".join(lines).encode("utf-8")
        try:
            # A fresh socket per message, as libsystemd does: nothing to keep open or close.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)  # a full receive queue must not stall the event loop
                sock.sendto(payload, self._address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("systemd_notify_failed", error=str(exc))
            return False
        return True


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        return b"\0" + value[1:].encode("utf-8")  # abstract namespace
    if value.startswith("/"):
        return value
    return None  # unset, or a form we do not speak (e.g. vsock:)


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None  # the watchdog is meant for another process
    return int(usec) / 1_000_000


def _one_line(text: str) -> str:
    return " ".join(text.split())
