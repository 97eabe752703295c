"""Install a plugin package offline into a folder that tests put on ``PYTHONPATH``.

The same mechanism as the example plugin's tests: ``pip install --no-deps
--no-build-isolation --no-index --target SITE SOURCE``, so nothing is downloaded and the
virtualenv itself is left as it was. :func:`install_offline` is idempotent: a folder
already holding this exact source is reused.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_IGNORED = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
_STAMP = ".installed-from"


def _source_digest(source: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in source.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(source)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def install_offline(source: Path, site: Path) -> Path:
    """Install the package at ``source`` into ``site`` (once per source content); return ``site``."""
    digest = _source_digest(source)
    stamp = site / _STAMP
    if stamp.is_file() and stamp.read_text() == digest:
        return site
    shutil.rmtree(site, ignore_errors=True)
    build = site.with_name(site.name + "-src")
    shutil.rmtree(build, ignore_errors=True)
    shutil.copytree(source, build, ignore=_IGNORED)  # pip writes build/ and *.egg-info next to the source
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(site), str(build)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, f"pip could not install {source.name} offline:\n{done.stderr[-2000:]}"
    stamp.write_text(digest)
    return site


def plugin_env(*sites: Path) -> dict[str, str]:
    """The environment for a miner subprocess that sees the plugins in ``sites``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AITBC_MINER_") and k != "NOTIFY_SOCKET"}
    env["PYTHONPATH"] = os.pathsep.join([*(str(s) for s in sites), str(REPO), env.get("PYTHONPATH", "")])
    return env
