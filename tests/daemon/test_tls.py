"""TLS to the coordinator: verification stays on, and coordinator.ca_file trusts a private CA."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from miner.daemon.client import CoordinatorClient
from miner.wire.errors import CoordinatorUnavailable

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate"
)


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def _https_heartbeat(cert: Path, key: Path, ca_file: Path | None) -> dict[str, object]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            body = b'{"status": "ok"}'
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
        except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
            pass  # the client refused our certificate
        finally:
            writer.close()

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    client = CoordinatorClient(
        f"https://127.0.0.1:{port}", api_key="key-123456", miner_id="m", ca_file=ca_file, timeout_s=5
    )
    try:
        return await client.heartbeat(0)
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


def test_untrusted_certificate_is_refused(tmp_path: Path) -> None:
    """A coordinator with a certificate nobody vouches for is unavailable: verification is never skipped."""
    cert, key = _self_signed(tmp_path)
    with pytest.raises(CoordinatorUnavailable):
        asyncio.run(_https_heartbeat(cert, key, None))


def test_ca_file_trusts_a_private_coordinator(tmp_path: Path) -> None:
    """With coordinator.ca_file naming the private CA, the same coordinator is reached over verified TLS."""
    cert, key = _self_signed(tmp_path)
    assert asyncio.run(_https_heartbeat(cert, key, cert))["status"] == "ok"
