"""Reading a secret (an API key) from a file named in the settings.

One helper for every ``*_file`` setting that holds a key, so each refuses the same way:
a :class:`~miner.wire.errors.ConfigError` whose one line names the setting, the path and
the fix. The secret itself never appears in a message.
"""

from __future__ import annotations

from pathlib import Path

from miner.wire.errors import ConfigError

__all__ = ["read_secret_file"]


def read_secret_file(path: Path, setting: str, what: str = "the API key") -> str:
    """The stripped text of ``path``; ConfigError naming ``setting`` if unreadable or empty.

    ``what`` names the secret in the fix, e.g. ``"the engine's API key"``.
    """
    try:
        text = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{setting}: {path} is not UTF-8 text; put {what} in it as one line") from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{setting}: cannot read {path}: {reason}; check the path and its permissions") from exc
    if not text:
        raise ConfigError(f"{setting}: {path} is empty; put {what} in it")
    return text
