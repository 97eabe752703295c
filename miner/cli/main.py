"""The ``aitbc-miner`` command line. Parsing only: each subcommand imports its module
lazily, so ``aitbc-miner probe`` never loads the coordinator, and imports torch only when
it is installed, to report whether it fits the driver."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from miner import __version__
from miner.wire.errors import ConfigError, MinerError


def _cmd_run(args: argparse.Namespace) -> int:
    from miner.cli.run import run_command

    return run_command(args)


def _cmd_probe(args: argparse.Namespace) -> int:
    from miner.cli.probe import probe_command

    return probe_command(args)


def _cmd_keygen(args: argparse.Namespace) -> int:
    from miner.daemon.keyfile import KEY_FILE_NAME, load_or_create_key
    from miner.wire.receipts import key_id

    path = args.out or (args.state_dir / KEY_FILE_NAME)
    if path.exists() and not args.force:
        key = load_or_create_key(path)
        print(f"existing key {path}\nkey_id {key_id(key.verify_key)}")
        return 0
    if path.exists():
        path.unlink()
    key = load_or_create_key(path)
    print(f"new key {path} (mode 0600)\nkey_id {key_id(key.verify_key)}")
    return 0


def _cmd_verify_receipt(args: argparse.Namespace) -> int:
    from miner.wire.receipts import ReceiptVerificationError, verify_receipt

    try:
        data = json.loads(Path(args.file).read_text(encoding="utf-8") if args.file != "-" else sys.stdin.read())
    except (OSError, ValueError) as exc:
        print(f"error: cannot read a JSON receipt from {args.file}: {exc}", file=sys.stderr)
        return 2
    # Accept a bare receipt, a result body ({"receipt": ...}) or a result answer.
    receipt = data.get("receipt", data) if isinstance(data, dict) else data
    public_key = args.public_key
    if args.public_key_file:
        public_key = Path(args.public_key_file).read_text(encoding="utf-8").strip()
    try:
        key = verify_receipt(receipt, public_key)
    except ReceiptVerificationError as exc:
        print(f"INVALID: {exc}", file=sys.stderr)
        return 1
    from miner.wire.receipts import key_id

    pinned = (
        "the given public key"
        if public_key
        else "its embedded key_id (integrity only: pass --public-key to check the signer)"
    )
    print(f"OK: receipt for job {receipt.get('job_id')} signed by {key_id(key)}, verified against {pinned}")
    return 0


def _need_coordinator_extra(command: str) -> None:
    """The local coordinator's web stack is an extra; say how to get it instead of a traceback."""
    missing = [m for m in ("fastapi", "uvicorn", "websockets") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"`aitbc-miner {command}` needs the local coordinator's extra ({', '.join(missing)} missing): "
            "pip install 'aitbc-miner[coordinator]'"
        )


def _cmd_coordinator(args: argparse.Namespace) -> int:
    _need_coordinator_extra("coordinator")
    from coordinator.server import serve_from_cli

    return serve_from_cli(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    _need_coordinator_extra("demo")
    from miner.cli.demo import demo_from_cli

    return demo_from_cli(args)


def _cmd_status(args: argparse.Namespace) -> int:
    from miner.cli.status import status_command

    return status_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aitbc-miner", description="GPU miner worker daemon for the AITBC marketplace"
    )
    parser.add_argument("--version", action="version", version=f"aitbc-miner {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the miner daemon")
    run.add_argument("--config", type=Path, default=None, help="miner.toml (default /etc/aitbc-miner/miner.toml)")
    run.add_argument("--max-jobs", type=int, default=None, metavar="N", help="exit after N jobs end")
    run.add_argument(
        "--exit-when-idle", type=float, default=None, metavar="SECONDS", help="exit after SECONDS with no job"
    )
    run.set_defaults(func=_cmd_run)

    probe = sub.add_parser("probe", help="print what this miner would register (GPUs, models, runners)")
    probe.add_argument("--config", type=Path, default=None)
    probe.add_argument("--json", action="store_true", help="machine-readable output")
    probe.set_defaults(func=_cmd_probe)

    keygen = sub.add_parser("keygen", help="create (or show) the miner's Ed25519 receipt key")
    keygen.add_argument("--state-dir", type=Path, default=Path("/var/lib/aitbc-miner"))
    keygen.add_argument("--out", type=Path, default=None, help="key file (default STATE_DIR/receipt-key.ed25519)")
    keygen.add_argument("--force", action="store_true", help="replace an existing key")
    keygen.set_defaults(func=_cmd_keygen)

    verify = sub.add_parser("verify-receipt", help="verify a signed receipt (JSON file, or - for stdin)")
    verify.add_argument("file")
    verify.add_argument("--public-key", default=None, help="expected signer's key_id (url-safe base64)")
    verify.add_argument("--public-key-file", default=None, help="file holding the expected key_id")
    verify.set_defaults(func=_cmd_verify_receipt)

    coord = sub.add_parser("coordinator", help="run the local coordinator (published Coordinator API)")
    coord.add_argument("--host", default="127.0.0.1")
    coord.add_argument("--port", type=int, default=8011)
    coord.add_argument("--db", type=Path, default=Path("coordinator.db"), help="SQLite file")
    coord.add_argument("--client-key", action="append", default=[], help="client API key (repeatable)")
    coord.add_argument("--miner-key", action="append", default=[], help="miner API key (repeatable)")
    coord.add_argument("--lease-seconds", type=float, default=60.0, help="miner lease without heartbeats")
    coord.add_argument(
        "--quirks",
        choices=["reference"],
        default=None,
        help="emulate the reference service's quirks (PROTOCOL.md section B) for miner tests",
    )
    coord.add_argument("--no-rate-limits", action="store_true", help="turn off the per-client-key rate limits")
    coord.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    coord.set_defaults(func=_cmd_coordinator)

    demo = sub.add_parser("demo", help="run a local coordinator and a miner, submit a job, show the verified receipt")
    demo.add_argument("--runner", choices=["auto", "fake", "transformers"], default="auto")
    demo.add_argument("--prompt", default="The GPU miner says")
    demo.set_defaults(func=_cmd_demo)

    status = sub.add_parser("status", help="summarise a running miner from its metrics endpoint")
    status.add_argument("--url", default="http://127.0.0.1:9477")
    status.set_defaults(func=_cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Before anything imports torch: CUDA then numbers GPUs by PCI bus, as NVML does, so an
    # index means the same GPU to both (GPUs are matched by UUID regardless).
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(str(exc) if str(exc).startswith("config error") else f"config error: {exc}", file=sys.stderr)
        return 2
    except MinerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
