"""Real servers on loopback for tests: the local coordinator under uvicorn in a thread.

``run_coordinator`` starts ``coordinator.app.create_app`` on a free 127.0.0.1 port and
yields a :class:`RunningCoordinator`. ``stop()`` frees the port; ``start()`` starts a new
server on the same port and the same SQLite file (restart durability, "coordinator down
for a while" tests).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from coordinator.app import create_app
from coordinator.server import ws_protocol

START_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningCoordinator:
    """A coordinator serving on ``url`` from ``db_path``; ``stop``/``start`` restart it."""

    db_path: Path
    port: int
    client_key: str
    miner_key: str
    lease_seconds: float
    app_options: dict[str, Any] = field(default_factory=dict)
    extra_client_keys: tuple[str, ...] = ()
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Start a new server (a fresh app) on this port and database."""
        if self._server is not None:
            raise RuntimeError("the coordinator is already running")
        app = create_app(
            self.db_path,
            client_keys=[self.client_key, *self.extra_client_keys],
            miner_keys=[self.miner_key],
            lease_seconds=self.lease_seconds,
            **self.app_options,
        )
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
                                ws=ws_protocol(), timeout_graceful_shutdown=1)
        server = uvicorn.Server(config)
        errors: list[BaseException] = []

        def serve() -> None:
            try:
                asyncio.run(server.serve())
            except BaseException as exc:  # surfaced to the starting thread below
                errors.append(exc)

        thread = threading.Thread(target=serve, name=f"coordinator-{self.port}", daemon=True)
        thread.start()
        stopper = threading.Event()
        waited = 0.0
        while not server.started and thread.is_alive() and waited < START_TIMEOUT_S:
            stopper.wait(0.01)
            waited += 0.01
        if not server.started:
            server.should_exit = True
            thread.join(5)
            raise RuntimeError(f"the coordinator did not start on port {self.port}: {errors or 'timeout'}")
        self._server, self._thread = server, thread

    def stop(self) -> None:
        """Stop the server and wait until the port is free."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(15)
        if thread.is_alive():
            server.force_exit = True
            thread.join(5)


@contextmanager
def run_coordinator(
    db_path: Path,
    *,
    client_key: str = "client-key",
    miner_key: str = "miner-key",
    lease_seconds: float = 60.0,
    port: int | None = None,
    extra_client_keys: tuple[str, ...] = (),
    **app_options: Any,
) -> Iterator[RunningCoordinator]:
    """Run a coordinator on loopback for the ``with`` block (``app_options`` go to ``create_app``;
    ``extra_client_keys`` are further client keys, e.g. to show clients see only their own jobs)."""
    running = RunningCoordinator(
        db_path=Path(db_path),
        port=port or free_port(),
        client_key=client_key,
        miner_key=miner_key,
        lease_seconds=lease_seconds,
        app_options=app_options,
        extra_client_keys=tuple(extra_client_keys),
    )
    running.start()
    try:
        yield running
    finally:
        running.stop()
