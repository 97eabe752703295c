"""``aitbc-miner verify-job``: a spot-check of one job's result that anyone can run.

The input is the JSON answer of ``GET /v1/jobs/{id}/result`` as the buyer saved it, with the
job's submitted ``payload`` added as a top-level key. The checks, each reported on one line:

1. ``signature``: the miner's receipt verifies (against ``--public-key`` when given, else
   against its embedded key, which proves integrity only);
2. ``output``, ``prompt``, ``params``, ``model``: the delivered output's sha256 is the
   receipt's ``output_sha256``, the payload's prompt (or messages) hashes to
   ``prompt_sha256``, its parsed parameters to ``params_sha256``, and it names the
   receipt's ``model``;
3. with a configuration (``--config``), the job is run again on this machine with the model
   that configuration serves under that name, started through the daemon's own runtime
   (GPUs as the settings say): ``revision`` and ``dtype`` (what the runner reports for the
   re-run) must be the receipt's, then ``rerun``: the new output's sha256 must be the
   receipt's; on a difference the first differing token is named, with its position.

A job sampled without a seed cannot be re-run to compare: the ``reproducible`` check says
so. Exit status (:data:`EXIT_OK` ...): 0 everything matches, 1 something does not (the
failed checks are named), 2 the file cannot be read, lacks the receipt, output or payload,
or the configuration does not load, 3 the signature and hashes match but the job was
sampled without a seed. Neither the prompt nor the output is ever printed in full: at most
a few tokens around the first difference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from miner.wire.errors import ConfigError, JobError, MinerError, ReceiptVerificationError
from miner.wire.receipts import key_id, params_sha256, prompt_sha256, sha256_hex, verify_receipt
from runners.params import TextRequest, parse_text_payload

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_UNREADABLE = 2
EXIT_UNREPRODUCIBLE = 3

CONFIG_ENV = "AITBC_MINER_CONFIG"  # miner.daemon.settings.CONFIG_ENV, without importing the settings
EXCERPT_TOKENS = 3  # tokens of context shown before the first difference
EXCERPT_CHARS = 24  # a token longer than this is cut in the report


@dataclass
class Check:
    """One line of the report. ``ok`` is ``None`` for a check that was skipped."""

    check: str
    ok: bool | None
    detail: str


@dataclass
class Report:
    """The checks in the order they ran, and the exit status they add up to."""

    checks: list[Check] = field(default_factory=list)
    unreadable: bool = False
    unreproducible: bool = False

    def add(self, check: str, ok: bool | None, detail: str) -> bool | None:
        self.checks.append(Check(check, ok, detail))
        return ok

    @property
    def failed(self) -> list[str]:
        return [c.check for c in self.checks if c.ok is False]

    @property
    def exit(self) -> int:
        if self.unreadable:
            return EXIT_UNREADABLE
        if self.failed:
            return EXIT_MISMATCH
        return EXIT_UNREPRODUCIBLE if self.unreproducible else EXIT_OK

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.exit == EXIT_OK, "checks": [asdict(c) for c in self.checks], "exit": self.exit}

    def render_text(self) -> str:
        marks = {True: "OK  ", False: "FAIL", None: "SKIP"}
        lines = [f"{marks[c.ok]} {c.check}: {c.detail}" for c in self.checks]
        code = self.exit
        if code == EXIT_OK:
            lines.append("verified: every check matches")
        elif code == EXIT_MISMATCH:
            lines.append(f"MISMATCH: {', '.join(self.failed)}")
        elif code == EXIT_UNREPRODUCIBLE:
            lines.append("NOT REPRODUCIBLE: the receipt and hashes match, but the job was sampled without a seed")
        else:
            lines.append("UNREADABLE: nothing was verified")
        return "\n".join(lines)


@dataclass(frozen=True)
class SavedResult:
    """What a buyer saved: the delivered output, the miner's receipt and the submitted payload."""

    output: str
    receipt: dict[str, Any]
    payload: dict[str, Any]


class UnreadableResult(ValueError):
    """The file is not a saved result with a miner receipt, an output and a payload."""


def read_saved_result(path: str) -> SavedResult:
    """Read FILE (``-``: stdin); :class:`UnreadableResult` with one line saying what is missing."""
    where = "stdin" if path == "-" else path
    try:
        data = json.loads(sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UnreadableResult(f"cannot read JSON from {where}: {exc}") from exc
    if not isinstance(data, dict):
        raise UnreadableResult(f"{where} is not a JSON object; save the answer of GET /v1/jobs/{{id}}/result")
    raw_result = data.get("result")
    result: dict[str, Any] = raw_result if isinstance(raw_result, dict) else {}
    receipt = next(
        (
            r
            for r in (data.get("receipt"), result.get("receipt"))
            if isinstance(r, dict) and r.get("signer") != "coordinator"
        ),
        None,
    )
    if receipt is None:
        raise UnreadableResult(f"{where} holds no miner receipt (receipt or result.receipt)")
    output = result.get("output")
    if not isinstance(output, str):
        raise UnreadableResult(f"{where} holds no delivered output (result.output)")
    payload = data.get("payload")
    if not isinstance(payload, dict):
        raise UnreadableResult(
            f"{where} has no payload; add the job's submitted payload as a top-level \"payload\" key"
        )
    return SavedResult(output=output, receipt=receipt, payload=payload)


def _short(value: Any, chars: int = 16) -> str:
    text = str(value)
    return text if len(text) <= chars else text[:chars] + "..."


def _hash_check(report: Report, check: str, what: str, actual: str, expected: Any) -> bool:
    if expected is None:
        report.add(check, False, f"the receipt carries no {what}; it cannot be checked")
        return False
    if actual == expected:
        report.add(check, True, f"sha256 {_short(actual)} is the receipt's")
        return True
    report.add(check, False, f"sha256 {_short(actual)} is not the receipt's {_short(expected)}")
    return False


def check_receipt(saved: SavedResult, report: Report, public_key: str | None) -> TextRequest | None:
    """Checks 1 and 2 into ``report``; the parsed payload when the payload parses."""
    receipt = saved.receipt
    try:
        key = verify_receipt(receipt, public_key)
    except ReceiptVerificationError as exc:
        report.add("signature", False, str(exc))
    else:
        if public_key:
            report.add("signature", True, f"signed by {key_id(key)}, the key given with --public-key")
        else:
            report.add(
                "signature",
                True,
                f"intact, signed by its embedded key {key_id(key)} (integrity only: pass --public-key "
                "with the miner's registered key_id to check who signed it)",
            )
    _hash_check(report, "output", "output_sha256", sha256_hex(saved.output), receipt.get("output_sha256"))
    try:
        request = parse_text_payload(saved.payload)
    except JobError as exc:
        report.add("payload", False, f"the payload does not parse as a text job: {exc.message}")
        return None
    messages = list(request.messages) if request.messages is not None else None
    prompt_digest = prompt_sha256(request.prompt, messages)
    _hash_check(report, "prompt", "prompt_sha256", prompt_digest, receipt.get("prompt_sha256"))
    params_digest = params_sha256(request.params.canonical())
    _hash_check(report, "params", "params_sha256", params_digest, receipt.get("params_sha256"))
    if request.model == receipt.get("model"):
        report.add("model", True, f"the payload's model {request.model!r} is the receipt's")
    else:
        report.add("model", False, f"the payload names {request.model!r}, the receipt {receipt.get('model')!r}")
    return request


def first_difference(expected: Sequence[str], actual: Sequence[str]) -> int | None:
    """The index of the first token that differs (or where one sequence ends), ``None`` if equal."""
    for i, (a, b) in enumerate(zip(expected, actual, strict=False)):
        if a != b:
            return i
    return None if len(expected) == len(actual) else min(len(expected), len(actual))


def _token(tokens: Sequence[str], i: int) -> str:
    if i >= len(tokens):
        return "(end of output)"
    return repr(_short(tokens[i], EXCERPT_CHARS))


def describe_difference(delivered: str, rerun: str, tokenize: Callable[[str], list[str]] | None) -> str:
    """Where the re-run's output first departs from the delivered one, with a few tokens before it."""
    unit = "token"
    if tokenize is not None:
        try:
            old, new = tokenize(delivered), tokenize(rerun)
        except Exception:  # a runner's tokenizer must not hide the verdict: fall back to words
            tokenize = None
    if tokenize is None:
        unit, old, new = "word", delivered.split(), rerun.split()
    i = first_difference(old, new)
    if i is None:
        return f"the outputs differ only in whitespace between {unit}s"
    before = "".join(_short(t, EXCERPT_CHARS) for t in old[max(0, i - EXCERPT_TOKENS) : i])
    context = f" after {before!r}" if before else ""
    return f"first difference at {unit} {i}{context}: delivered {_token(old, i)}, re-run {_token(new, i)}"


def _same(report: Report, check: str, receipt_value: Any, rerun_value: Any, fix: str) -> bool:
    here, there = ("none given" if v is None else str(v) for v in (rerun_value, receipt_value))
    if receipt_value == rerun_value:
        report.add(check, True, f"{here} here, as in the receipt")
        return True
    report.add(check, False, f"this configuration serves {here}, the receipt says {there}; {fix}")
    return False


async def rerun_job(config: Path, saved: SavedResult, request: TextRequest, report: Report) -> None:
    """Check 3: run the job again with the model ``config`` serves under its name, and compare."""
    from miner.daemon.runtime import start_runtime
    from miner.daemon.settings import load_settings
    from runners import runner_version
    from runners.base import Job

    receipt = saved.receipt
    settings = load_settings(config)
    spec = next((s for s in settings.models if s.name == request.model), None)
    if spec is None:
        report.add(
            "rerun",
            False,
            f"{config} serves no model called {request.model!r}; add a [[models]] table with that name",
        )
        return
    runtime = await start_runtime(settings.model_copy(update={"models": [spec]}))
    try:
        runner = runtime.runners_by_model[spec.name]
        job = Job(job_id=str(receipt.get("job_id") or "verify-job"), request=request)
        try:
            result = await runner.run(job)
        except MinerError as exc:
            report.add("rerun", False, f"the job did not run again here: {exc}")
            return
        except Exception as exc:  # a runner bug; its message may quote the prompt, so only its type
            report.add("rerun", False, f"the job did not run again here: the runner raised {type(exc).__name__}")
            return
        revision_ok = _same(
            report,
            "revision",
            receipt.get("model_revision"),
            result.model_revision,
            f"serve that revision under models[name={spec.name!r}] to compare",
        )
        dtype_ok = _same(
            report, "dtype", receipt.get("dtype"), result.dtype, f"set models[name={spec.name!r}].dtype to match"
        )
        if not (revision_ok and dtype_ok):
            report.add("rerun", None, "not compared: the re-run must use the receipt's model revision and dtype")
            return
        here = f"{result.device} with {runner.name} {runner_version(runner) or '?'}"
        there = " ".join(str(receipt.get(k, "?")) for k in ("device_kind", "runner", "runner_version"))
        there = there.replace(" ", " with ", 1)
        digest = sha256_hex(result.output)
        if digest == receipt.get("output_sha256"):
            report.add("rerun", True, f"same output (sha256 {_short(digest)}) re-run on {here}; receipt: {there}")
            return
        tokenizer = getattr(runner, "tokenize", None)
        tokenize = (lambda text: list(tokenizer(spec.name, text))) if callable(tokenizer) else None
        where = describe_difference(saved.output, result.output, tokenize)
        report.add("rerun", False, f"different output re-run on {here} (receipt: {there}); {where}")
    finally:
        await runtime.aclose()


def verify_job(path: str, config: Path | None = None, public_key: str | None = None) -> Report:
    """Every check on the saved result at ``path`` (see the module docstring); never raises for its content."""
    report = Report()
    try:
        saved = read_saved_result(path)
    except UnreadableResult as exc:
        report.add("file", False, str(exc))
        report.unreadable = True
        return report
    request = check_receipt(saved, report, public_key)
    if request is None or report.failed:
        report.add("rerun", None, "skipped: the checks above must pass first")
        return report
    sampling = saved.receipt.get("sampling") or request.params.sampling
    if sampling == "unseeded":
        report.unreproducible = True
        report.add(
            "reproducible",
            None,
            "no: the job was sampled (temperature > 0) without a seed, so a re-run cannot be compared; "
            "submit with parameters.seed, or temperature 0, to get jobs that can be spot-checked",
        )
        return report
    seed = f", seed {request.params.seed}" if sampling == "seeded" else ""
    report.add("reproducible", True, f"yes: {sampling} decoding{seed}")
    if config is None:
        report.add("rerun", None, "skipped: pass --config with a miner.toml serving this model to run the job again")
        return report
    try:
        asyncio.run(rerun_job(config, saved, request, report))
    except ConfigError as exc:  # the settings do not load, or the runner refuses them
        report.add("config", False, str(exc))
        report.unreadable = True
    except MinerError as exc:  # the runtime did not start (a device, a runner plugin)
        report.add("rerun", False, f"the model did not start here: {exc}")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``verify-job``."""
    parser.add_argument(
        "--result",
        required=True,
        metavar="FILE",
        help="the saved answer of GET /v1/jobs/{id}/result with the job's payload added as \"payload\"; - for stdin",
    )
    env_config = os.environ.get(CONFIG_ENV)
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(env_config) if env_config else None,
        metavar="FILE",
        help=f"a miner.toml serving the job's model: run the job again and compare (env: {CONFIG_ENV}; "
        "default: no re-run)",
    )
    parser.add_argument(
        "--public-key",
        default=None,
        metavar="KEY_ID",
        help="the miner's registered key_id: the receipt must be signed by it (default: its embedded key, "
        "integrity only)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON: ok, checks [{check, ok, detail}], exit")


def verify_job_command(args: argparse.Namespace) -> int:
    """Run :func:`verify_job` and print its report (text, or JSON with ``--json``); its exit status."""
    from miner.ops.logs import configure_logging

    configure_logging("warning", "auto", stream=sys.stderr)  # stdout is the report
    report = verify_job(args.result, args.config, args.public_key)
    print(json.dumps(report.to_json(), indent=2, sort_keys=True) if args.json else report.render_text())
    return report.exit
