"""Compatibility re-export: the error tree lives in :mod:`miner.wire.errors`.

Plugins written against ``miner.errors`` keep working; new code imports
:mod:`runners.api` (plugins) or :mod:`miner.wire.errors` (the project itself).
"""

from miner.wire.errors import *  # noqa: F403
from miner.wire.errors import __all__  # noqa: F401
