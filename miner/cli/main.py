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


def _cmd_check(args: argparse.Namespace) -> int:
    from miner.cli.check import check_command

    return check_command(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from miner.cli.bench import bench_command

    return bench_command(args)


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
    """Verify a miner's or a coordinator's receipt (same envelope, same verifier).

    Accepts a bare receipt, a body or answer holding ``receipt`` (and ``coordinator_receipt``),
    or a list of receipts (``GET /v1/jobs/{id}/receipts``); a capability benchmark record, a
    list of them (``aitbc-miner bench --json``) or capabilities holding ``benchmarks``. With ``--public-key`` every
    receipt must be signed by that key, except in an answer or a list, where the receipts
    signed by another key are checked for integrity only and at least one must match.
    Exit status: 0 valid, 1 invalid, 2 unreadable.
    """
    from miner.wire.receipts import ReceiptVerificationError, key_id, verify_receipt

    try:
        data = json.loads(Path(args.file).read_text(encoding="utf-8") if args.file != "-" else sys.stdin.read())
    except (OSError, ValueError) as exc:
        print(f"error: cannot read a JSON receipt from {args.file}: {exc}", file=sys.stderr)
        return 2
    if isinstance(data, list):
        receipts = list(data)
    elif isinstance(data, dict) and ("receipt" in data or "coordinator_receipt" in data):
        receipts = [r for r in (data.get("receipt"), data.get("coordinator_receipt")) if r is not None]
        receipts = [r for i, r in enumerate(receipts) if r not in receipts[:i]]
    elif isinstance(data, dict) and isinstance(data.get("benchmarks"), list) and "signature" not in data:
        receipts = list(data["benchmarks"])  # registered capabilities: their benchmark records
    else:
        receipts = [data]
    if not receipts:
        print(f"INVALID: {args.file} holds no receipt", file=sys.stderr)
        return 1
    public_key = args.public_key
    if args.public_key_file:
        public_key = Path(args.public_key_file).read_text(encoding="utf-8").strip()
    several = len(receipts) > 1
    matched = False
    for receipt in receipts:
        signature = receipt.get("signature") if isinstance(receipt, dict) else None
        embedded = signature.get("key_id") if isinstance(signature, dict) else None
        pin = public_key if public_key and (not several or embedded == public_key) else None
        try:
            key = verify_receipt(receipt, pin)
        except ReceiptVerificationError as exc:
            print(f"INVALID: {exc}", file=sys.stderr)
            return 1
        matched |= pin is not None
        signer = "the coordinator" if receipt.get("signer") == "coordinator" else "the miner"
        checked = (
            "the given public key"
            if pin
            else "its embedded key_id (integrity only: pass --public-key to check the signer)"
        )
        what = (
            f"benchmark record for model {receipt.get('model')} on GPU {receipt.get('gpu_uuid')}"
            if receipt.get("kind") == "capability_benchmark"
            else f"receipt for job {receipt.get('job_id')}"
        )
        print(f"OK: {what} from {signer}, signed by {key_id(key)}, verified against {checked}")
    if public_key and not matched:
        print("INVALID: no receipt here is signed by the given public key", file=sys.stderr)
        return 1
    return 0


def _cmd_verify_job(args: argparse.Namespace) -> int:
    from miner.cli.verifyjob import verify_job_command

    return verify_job_command(args)


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


def _cmd_config(args: argparse.Namespace) -> int:
    from miner.cli.config import config_command

    return config_command(args)


CONFIG_ENV = "AITBC_MINER_CONFIG"  # the --config default (miner.daemon.settings.CONFIG_ENV)
STATE_DIR_ENV = "AITBC_MINER_STATE_DIR"
DEFAULT_CONFIG_HELP = "/etc/aitbc-miner/miner.toml if it exists"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Epilogs keep their example lines; each option's help ends with its default when it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or not action.option_strings
            or default in (None, False, argparse.SUPPRESS, [])
            or action.nargs == 0
        ):
            return text
        return f"{text} (default: %(default)s)"


def _env_path(name: str, fallback: Path | None) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else fallback


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    """``--config`` as every command that loads settings takes it, ``AITBC_MINER_CONFIG`` its default."""
    parser.add_argument(
        "--config",
        type=Path,
        default=_env_path(CONFIG_ENV, None),
        metavar="FILE",
        help=f"miner.toml (env: {CONFIG_ENV}; default: {DEFAULT_CONFIG_HELP}); "
        "AITBC_MINER_* variables override it",
    )


def _epilog(*examples: str, note: str = "") -> str:
    lines = ["examples:", *(f"  {e}" for e in examples)]
    return "\n".join(lines + ([f"\n{note}"] if note else []))


_SETTINGS_NOTE = (
    "Every setting can also come from an environment variable: AITBC_MINER_ + its name, __ between\n"
    "levels (AITBC_MINER_COORDINATOR__URL); lists and tables are JSON. `aitbc-miner config` shows\n"
    "where each value came from."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aitbc-miner",
        description="GPU miner worker daemon for the AITBC marketplace",
        formatter_class=_HelpFormatter,
        epilog=_epilog(
            "aitbc-miner probe                                  # what NVML and torch see",
            "aitbc-miner config --config /etc/aitbc-miner/miner.toml",
            "aitbc-miner run --config /etc/aitbc-miner/miner.toml",
            note="`aitbc-miner COMMAND --help` describes each command.\n" + _SETTINGS_NOTE,
        ),
    )
    parser.add_argument("--version", action="version", version=f"aitbc-miner {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, epilog: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, epilog=epilog, formatter_class=_HelpFormatter)

    run = command(
        "run",
        "run the miner daemon",
        _epilog(
            "aitbc-miner run --config /etc/aitbc-miner/miner.toml",
            "AITBC_MINER_COORDINATOR__API_KEY=... aitbc-miner run --config miner.toml --max-jobs 1",
            note="Exit status: 0 clean, 1 forced or a start-up failure worth retrying, 2 configuration.\n"
            + _SETTINGS_NOTE,
        ),
    )
    _add_config_option(run)
    run.add_argument("--max-jobs", type=int, default=None, metavar="N", help="exit after N jobs end (default: never)")
    run.add_argument(
        "--exit-when-idle",
        type=float,
        default=None,
        metavar="SECONDS",
        help="exit after SECONDS with no job (default: never)",
    )
    run.set_defaults(func=_cmd_run)

    check = command(
        "check",
        "check a configuration before going live: settings, state folder, metrics port, coordinator and key, "
        "models' files and memory, engines, torch and the GPUs; loads no weights",
        _epilog(
            "aitbc-miner check --config /etc/aitbc-miner/miner.toml",
            "AITBC_MINER_COORDINATOR__API_KEY=... aitbc-miner check --config miner.toml --json",
            note="Exit status: 0 the miner would serve, 1 a check found a problem (one line each, naming the\n"
            "setting and the fix), 2 the settings do not load (as `run` would refuse them).\n" + _SETTINGS_NOTE,
        ),
    )
    _add_config_option(check)
    from miner.cli.check import add_arguments as add_check_arguments

    add_check_arguments(check)
    check.set_defaults(func=_cmd_check)

    bench = command(
        "bench",
        "measure the signed capability benchmark now (tokens/s at batch 1 and at the model's batch size, time to "
        "first token, per model and GPU), rewrite the cache and print it; stop the running miner first",
        _epilog(
            "aitbc-miner bench --config /etc/aitbc-miner/miner.toml",
            "AITBC_MINER_BENCHMARK__MAX_NEW_TOKENS=64 aitbc-miner bench --config miner.toml",
            "aitbc-miner bench --config miner.toml --json > bench.json && aitbc-miner verify-receipt bench.json",
            note="Loads the models as `run` does (benchmark.max_new_tokens, benchmark.timeout_s apply). Exit status:\n"
            "0 every model measured, 1 one failed or a miner holds the state folder, 2 the settings do not load.\n"
            + _SETTINGS_NOTE,
        ),
    )
    _add_config_option(bench)
    from miner.cli.bench import add_arguments as add_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(func=_cmd_bench)

    probe = command(
        "probe",
        "print what this miner would register (GPUs, models, runners); changes nothing",
        _epilog(
            "aitbc-miner probe",
            "aitbc-miner probe --config /etc/aitbc-miner/miner.toml --json",
            note="With AITBC_MINER_FAKE_NVML=FILE the GPUs come from a simulated host (tests, demos).",
        ),
    )
    _add_config_option(probe)
    probe.add_argument("--json", action="store_true", help="machine-readable output")
    probe.set_defaults(func=_cmd_probe)

    config = command(
        "config",
        "print the effective settings and where each came from (file, env, credential, default); secrets masked",
        _epilog(
            "aitbc-miner config --config /etc/aitbc-miner/miner.toml",
            "AITBC_MINER_CONCURRENCY=2 aitbc-miner config --config miner.toml --json",
            note="Loads the settings exactly as `run` does: a configuration run rejects exits 2 here too.",
        ),
    )
    _add_config_option(config)
    config.add_argument(
        "--json", action="store_true", help="print JSON: config_file and settings [{setting, value, source, from}]"
    )
    config.set_defaults(func=_cmd_config)

    keygen = command(
        "keygen",
        "create (or show) the miner's Ed25519 receipt key",
        _epilog("aitbc-miner keygen --state-dir /var/lib/aitbc-miner", "aitbc-miner keygen --out ./key --force"),
    )
    keygen.add_argument(
        "--state-dir",
        type=Path,
        default=_env_path(STATE_DIR_ENV, Path("/var/lib/aitbc-miner")),
        metavar="DIR",
        help=f"the miner's state folder, as state_dir in miner.toml (env: {STATE_DIR_ENV})",
    )
    keygen.add_argument(
        "--out", type=Path, default=None, metavar="FILE", help="key file (default: DIR/receipt-key.ed25519)"
    )
    keygen.add_argument("--force", action="store_true", help="replace an existing key")
    keygen.set_defaults(func=_cmd_keygen)

    verify = command(
        "verify-receipt",
        "verify a signed receipt or capability benchmark record (JSON file, or - for stdin)",
        _epilog(
            "aitbc-miner verify-receipt result.json --public-key KEY_ID",
            "curl -s .../result | aitbc-miner verify-receipt -",
            note="Exit status: 0 valid, 1 invalid, 2 unreadable.",
        ),
    )
    verify.add_argument("file", help="a receipt, a result body ({\"receipt\": ...}) or a result answer; - for stdin")
    verify.add_argument("--public-key", default=None, help="expected signer's key_id (url-safe base64)")
    verify.add_argument("--public-key-file", default=None, metavar="FILE", help="file holding the expected key_id")
    verify.set_defaults(func=_cmd_verify_receipt)

    verify_job = command(
        "verify-job",
        "spot-check a job: its receipt's signature and hashes, then (with --config) run it again and compare",
        _epilog(
            "aitbc-miner verify-job --result answer.json --public-key KEY_ID",
            "aitbc-miner verify-job --result answer.json --config miner.toml --json",
            note="FILE is the answer of GET /v1/jobs/{id}/result with the submitted payload added as \"payload\".\n"
            "Exit status: 0 everything matches, 1 a check does not (named), 2 the file (or the configuration)\n"
            "cannot be used, 3 the job was sampled without a seed and cannot be re-run to compare.\n"
            + _SETTINGS_NOTE,
        ),
    )
    from miner.cli.verifyjob import add_arguments as add_verify_job_arguments

    add_verify_job_arguments(verify_job)
    verify_job.set_defaults(func=_cmd_verify_job)

    coord = command(
        "coordinator",
        "run the local coordinator (published Coordinator API); needs the 'coordinator' extra",
        _epilog(
            "aitbc-miner coordinator                            # loopback, keys generated and printed",
            "aitbc-miner coordinator --host 0.0.0.0 --client-key CK --miner-key MK --db /srv/coord.db",
        ),
    )
    coord.add_argument("--host", default="127.0.0.1", help="listen address; beyond loopback keys are required")
    coord.add_argument("--port", type=int, default=8011, help="listen port")
    coord.add_argument("--db", type=Path, default=Path("coordinator.db"), metavar="FILE", help="SQLite file")
    coord.add_argument(
        "--client-key",
        action="append",
        default=[],
        metavar="KEY",
        help="client API key, repeatable (env: AITBC_COORDINATOR_CLIENT_KEYS)",
    )
    coord.add_argument(
        "--miner-key",
        action="append",
        default=[],
        metavar="KEY",
        help="miner API key, repeatable (env: AITBC_COORDINATOR_MINER_KEYS)",
    )
    coord.add_argument("--lease-seconds", type=float, default=60.0, help="miner lease without heartbeats")
    coord.add_argument(
        "--quirks",
        choices=["reference"],
        default=None,
        help="emulate the reference service's quirks (docs/protocol.md, section 4) for miner tests",
    )
    coord.add_argument("--no-rate-limits", action="store_true", help="turn off the per-client-key rate limits")
    coord.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="log level"
    )
    coord.set_defaults(func=_cmd_coordinator)

    demo = command(
        "demo",
        "run a local coordinator and a miner, submit a job, show the verified receipt; needs the 'coordinator' extra",
        _epilog("aitbc-miner demo", "aitbc-miner demo --runner fake --prompt 'Hello'"),
    )
    demo.add_argument(
        "--runner",
        choices=["auto", "fake", "transformers"],
        default="auto",
        help="auto: transformers when torch is installed, else fake",
    )
    demo.add_argument("--prompt", default="The GPU miner says", help="the demo job's prompt")
    demo.set_defaults(func=_cmd_demo)

    status = command(
        "status",
        "summarise a running miner from its metrics endpoint",
        _epilog("aitbc-miner status", "aitbc-miner status --url http://10.0.0.5:9477"),
    )
    status.add_argument("--url", default="http://127.0.0.1:9477", help="the miner's metrics.listen, as a URL")
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
