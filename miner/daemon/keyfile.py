"""The miner's Ed25519 receipt key on disk: a 32-byte seed, mode 0600, never logged.

A new key is written to a temporary file created with ``O_EXCL`` and mode 0600 (a stale
temporary file from a crash is removed first, so its mode is never inherited), fsynced,
renamed into place, and the folder is fsynced so the key survives a power cut. A key
file readable by group or others is refused: the key signs every receipt.
"""

from __future__ import annotations

import os
from pathlib import Path

from nacl.signing import SigningKey

from miner.outbox.writer import fsync_dir
from miner.wire.errors import ConfigError, StateError

KEY_FILE_NAME = "receipt-key.ed25519"
SEED_BYTES = 32


def load_or_create_key(path: Path) -> SigningKey:
    """Load the seed at ``path``, creating it (mode 0600) if it does not exist yet."""
    try:
        if path.exists():
            return load_key(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        key = SigningKey.generate()
        write_key(path, key)
        return key
    except OSError as exc:
        raise StateError(f"cannot create the receipt key at {path}: {exc.strerror or exc}") from exc


def write_key(path: Path, key: SigningKey) -> None:
    """Write ``key`` to ``path`` atomically and privately (see the module docstring)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a stale one may have any mode; O_EXCL below never reuses it
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask says
        os.write(fd, bytes(key))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def load_key(path: Path) -> SigningKey:
    """Read the seed at ``path``; ConfigError for a readable-by-others or malformed file."""
    try:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(f"receipt key {path} has mode {mode:o}; it must be private: run `chmod 600 {path}`")
        seed = path.read_bytes()
    except OSError as exc:
        raise StateError(f"cannot read the receipt key at {path}: {exc.strerror or exc}") from exc
    if len(seed) != SEED_BYTES:
        raise ConfigError(
            f"receipt key {path} is not a {SEED_BYTES}-byte Ed25519 seed ({len(seed)} bytes); "
            "remove it to make a new one"
        )
    return SigningKey(seed)
