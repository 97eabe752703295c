"""``aitbc-miner run``: load settings, configure logs, serve until told to stop."""

from __future__ import annotations

import argparse
import asyncio
import sys

from miner.daemon.agent import Agent
from miner.daemon.settings import load_settings
from miner.ops.logs import configure_logging
from miner.wire.errors import ConfigError


def run_command(args: argparse.Namespace) -> int:
    """Exit status: 0 clean, 1 forced, a device error or a start-up failure to retry, 2 configuration."""
    settings = load_settings(args.config)
    configure_logging(settings.log.level, settings.log.format)
    if args.max_jobs is not None and args.max_jobs < 1:
        raise ConfigError("--max-jobs must be at least 1")
    agent = Agent(settings, max_jobs=args.max_jobs, exit_when_idle=args.exit_when_idle)
    try:
        return asyncio.run(agent.serve())
    except KeyboardInterrupt:  # a signal before the handlers were installed
        print("interrupted", file=sys.stderr)
        return 130
