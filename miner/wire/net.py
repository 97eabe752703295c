"""Checks of network addresses given in settings: ``HOST:PORT`` pairs, HTTP URLs, loopback hosts.

Shared by the daemon's settings, the metrics endpoint, the ``openai`` runner and the local
coordinator, so every one of them accepts and refuses the same spellings. Failures raise
``ValueError`` with a message that says what is wrong and shows a good example; the
caller prefixes the name of the setting.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import SplitResult, urlsplit

__all__ = ["check_http_url", "is_loopback_host", "is_remote_plain_http", "parse_host_port"]

_LOOPBACK_NAMES = frozenset({"localhost", "localhost."})


def parse_host_port(value: str, example: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (``"[::1]:9477"`` for IPv6) -> ``(host, port)`` without brackets.

    ``example`` is a valid value shown in the error, e.g. ``"127.0.0.1:9477"``.
    """
    usage = f"must be HOST:PORT such as {example} (an IPv6 host in brackets: [::1]:PORT)"
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port:
        raise ValueError(f"{value!r} {usage}")
    if not port.isascii() or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: the port {port!r} is not a number from 0 to 65535; it {usage}")
    if host.startswith("[") or host.endswith("]"):
        if not (host.startswith("[") and host.endswith("]")) or not _is_ipv6(host[1:-1]):
            raise ValueError(f"{value!r}: {host!r} is not a bracketed IPv6 address; it {usage}")
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{value!r}: write an IPv6 host in brackets, e.g. [{host}]:{port}")
    if any(ch.isspace() for ch in host):
        raise ValueError(f"{value!r}: the host contains white space; it {usage}")
    return host, int(port)


def check_http_url(value: str, example: str, *, plain: bool = False) -> SplitResult:
    """The parts of ``value`` if it is an ``http://`` or ``https://`` URL with a host.

    ``plain=True`` also refuses credentials, a query and a fragment (for a base URL that
    paths are appended to). ``example`` is a valid URL shown in the error.
    """
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        raise ValueError(
            f"must be an http:// or https:// URL such as {example}; its port is not a number from 0 to 65535"
        ) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL such as {example}")
    if plain and (parts.username or parts.password or parts.query or parts.fragment):
        raise ValueError(f"must be a plain URL such as {example}, without credentials, a query or a fragment")
    return parts


def is_loopback_host(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ``::1`` (brackets allowed); False for any other name."""
    host = host.strip().lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_remote_plain_http(url: str) -> bool:
    """True when ``url`` is ``http://`` to a host that is not loopback (traffic leaves the machine in clear)."""
    parts = urlsplit(url)
    return parts.scheme == "http" and not is_loopback_host(parts.hostname or "")


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True
