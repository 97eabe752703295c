"""Signal capture for the daemon: the first SIGTERM/SIGINT asks for a graceful exit, the
second forces it, and the original handlers are restored when the block ends."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def capture_signals(handle_exit: Callable[[int], None]) -> Iterator[None]:
    """Route SIGINT/SIGTERM to ``handle_exit(signum)`` on the running event loop.

    Outside the main thread (where handlers cannot be installed) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(handle_exit, signum)

    original = {sig: signal.signal(sig, on_signal) for sig in HANDLED_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in original.items():
            signal.signal(sig, handler)
