"""Fixtures for the openai runner: the tiny Llama behind a real OpenAI-compatible engine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.openai.engine import EngineKnobs, EngineLog, EngineServer, TinyEngine, create_engine_app


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory: pytest.TempPathFactory) -> TinyEngine:
    """The tiny random-weight Llama, built once per session and loaded with transformers."""
    from runners.tinyllama import build_tiny_llama

    return TinyEngine(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model"))


class Engine:
    """A running engine server with its knobs and its log, restartable on the same port."""

    def __init__(self, tiny: TinyEngine) -> None:
        self.knobs = EngineKnobs()
        self.log = EngineLog()
        self.server = EngineServer(create_engine_app(tiny, self.knobs, self.log)).start()

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def stop(self) -> None:
        self.server.stop()

    def restart(self) -> None:
        self.server = EngineServer(self.server.app, port=self.server.port).start()


@pytest.fixture
def engine(tiny_engine: TinyEngine) -> Iterator[Engine]:
    """A fresh engine server on a free loopback port, serving model "tiny-llama"."""
    running = Engine(tiny_engine)
    yield running
    running.stop()


@pytest.fixture
def free_port_url() -> str:
    """An http://127.0.0.1:PORT/v1 URL where nothing listens."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"
