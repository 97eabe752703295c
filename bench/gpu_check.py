"""The whole path on one device: local coordinator, daemon, transformers runner, against raw ``generate``.

Steps, each its own process so that ``bench/gpu_check.sh`` can give each a ``timeout`` and a
failed or killed step costs only its own figures:

``workdir``  print a fresh folder for the model: in ``/dev/shm`` when it has room, else the
             temp folder (the script removes it at the end).
``build``    create a random-weight Llama of the chosen shape directly on the device, in its
             dtype (``llama2-7b``: hidden 4096, 32 layers, 32 heads, intermediate 11008,
             vocab 32000, float16, about 13.5 GB; no download) and save it as safetensors
             with its tokenizer, so the daemon loads it through its normal path.
``path``     start a local coordinator on loopback (:class:`bench.daemonbench.DaemonBench`)
             and the daemon serving that model with ``decode = MODE``, ``concurrency`` and
             ``max_batch_size`` both the largest in-flight count; then, for each in-flight
             count N, submit N jobs (distinct prompts, greedy, ``--new-tokens`` each) at once
             and read from the coordinator's timestamps and the signed results:

             * ``tokens_per_s``: all the jobs' tokens over first claim -> last result;
             * ``tokens_per_s_per_job``: median over jobs of its tokens over its own claim -> result;
             * ``ttft_p50_ms`` / ``ttft_p95_ms``: claim -> first token, over every job timed at N;
             * ``largest_batch``: the largest batch the runner formed.

             With ``--raw`` (the eager step) one raw ``model.generate`` of the same N prompts
             batched (left-padded, same new tokens) alternates with each daemon run, giving
             the same figures for raw ``generate`` (its ``first_token_ms`` is a 1-token
             ``generate`` of the batch), ``daemon_over_raw`` (median of the pairs' time
             ratios), the measured device copy bandwidth and the batch-1 ceiling (bandwidth /
             weight bytes read per token), and batch-1 tokens/s as a fraction of it.
             Figures are written after each N, so a step killed by its timeout keeps what it
             measured; an N that would not fit in ``--budget-s`` is skipped and listed.
``report``   merge the steps' figures into one JSON (``bench/gpu_results.json``): the eager
             whole path, every decode mode's figures with its ratio to eager at each N
             (``modes.<mode>.vs_eager``: tokens/s over eager's; the modes run in separate
             processes, so these ratios are not alternated pairs), or the error that stopped
             it, and each step's exit status. Prints it as a table.

    python bench/gpu_check.py build --shape tiny --device cpu --folder F --part P/build.json
    python bench/gpu_check.py path --shape tiny --device cpu --folder F --decode eager --raw --part P/eager.json
    python bench/gpu_check.py report --parts P --json bench/gpu_results.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.tinybench import (  # noqa: E402
    CANDIDATE_PROMPTS,
    copy_bandwidth,
    job_prompts,
    median,
    percentile,
    pick_prompt,
    raw_generate,
)

SHAPES: dict[str, dict[str, Any]] = {
    "llama2-7b": {"hidden": 4096, "layers": 32, "heads": 32, "intermediate": 11008, "vocab": 32000, "dtype": "float16"},
    "tiny": {"hidden": 256, "layers": 4, "heads": 4, "intermediate": 688, "vocab": 16384, "dtype": "float32"},
}
MODES = ("eager", "static", "continuous")
MODEL = "m"


def parameter_count(shape: dict[str, Any]) -> int:
    """Parameters of a Llama of ``shape``: per layer attention 4h^2 and MLP 3hi, plus embeddings and head 2vh."""
    h, i = shape["hidden"], shape["intermediate"]
    return shape["layers"] * (4 * h * h + 3 * h * i) + 2 * shape["vocab"] * h


def weight_bytes(shape: dict[str, Any]) -> int:
    return parameter_count(shape) * (4 if shape["dtype"] == "float32" else 2)


def parse_counts(text: str, name: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"error: {name} must be integers separated by commas, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise SystemExit(f"error: {name} needs at least one count >= 1, got {text!r}")
    return counts


def check_device(device: str) -> None:
    if device != "cpu" and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise SystemExit(f"error: --device must be cpu or cuda:N, got {device!r}")
    if device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("error: --device asks for CUDA but no CUDA device is visible; use --dry-run on a CPU")


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` atomically, so a step killed mid-write leaves the previous figures."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def error_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


# --- workdir and build --------------------------------------------------------------------


def cmd_workdir(args: argparse.Namespace) -> int:
    need = weight_bytes(SHAPES[args.shape]) * 1.2 + 2**28
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > need:
        print(tempfile.mkdtemp(prefix="aitbc-gpu-check-", dir=shm))
    else:
        print(tempfile.mkdtemp(prefix="aitbc-gpu-check-"))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    """Create the random model on the device and save it (see the module docstring)."""
    check_device(args.device)
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from runners.tinyllama import llama_config, train_tokenizer

    shape = SHAPES[args.shape]
    free = shutil.disk_usage(args.folder.parent).free
    if free < weight_bytes(shape) * 1.1:
        raise SystemExit(
            f"error: {args.folder.parent} has {free / 1e9:.1f} GB free, the {args.shape} model needs "
            f"{weight_bytes(shape) / 1e9:.1f} GB; pass a roomier folder"
        )
    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    tokenizer = train_tokenizer(min(shape["vocab"], 16384), "stdlib")
    config = llama_config(
        shape["vocab"],
        hidden=shape["hidden"],
        layers=shape["layers"],
        heads=shape["heads"],
        intermediate=shape["intermediate"],
        max_positions=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.device(args.device):
        model = LlamaForCausalLM._from_config(config, dtype=getattr(torch, shape["dtype"]))
    if not torch.isfinite(model.lm_head.weight).all():
        raise RuntimeError("the random model has non-finite weights")
    model.save_pretrained(args.folder, safe_serialization=True)
    tokenizer.save_pretrained(args.folder)
    figures: dict[str, Any] = {
        "shape": args.shape,
        "device": args.device,
        "dtype": shape["dtype"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    if args.device.startswith("cuda"):
        figures["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    write_json(args.part, figures)
    print(f"built {args.shape} ({figures['parameters'] / 1e9:.2f} B parameters) in {figures['build_seconds']} s")
    return 0


# --- the whole path -------------------------------------------------------------------------


def daemon_summary(runs: list[Any]) -> dict[str, Any]:
    """Figures of the daemon's timed runs at one in-flight count (see ``path`` in the module docstring)."""
    jobs = [job for run in runs for job in run.jobs]
    ttft = [job.claim_to_first_token_s * 1000 for job in jobs]
    return {
        "seconds": round(median([run.seconds for run in runs]), 4),
        "tokens_per_s": round(median([run.tokens / run.seconds for run in runs]), 2),
        "tokens_per_s_per_job": round(median([j.completion_tokens / j.claim_to_result_s for j in jobs]), 2),
        "ttft_p50_ms": round(percentile(ttft, 50), 2),
        "ttft_p95_ms": round(percentile(ttft, 95), 2),
        "largest_batch": max(job.batch_size for job in jobs),
        "tokens": runs[0].tokens,
    }


async def raw_run(loaded: Any, prompts: list[str], new_tokens: int) -> tuple[float, int]:
    """One raw batched greedy generate: (seconds, tokens per row)."""
    started = time.perf_counter()
    per_row = await asyncio.to_thread(raw_generate, loaded, prompts, new_tokens)
    return time.perf_counter() - started, per_row


async def measure_path(args: argparse.Namespace, workdir: Path, part: dict[str, Any]) -> None:
    """Fill ``part`` (written to ``args.part`` as it grows) with the whole path's figures."""
    from bench.daemonbench import DaemonBench

    shape = SHAPES[args.shape]
    counts = parse_counts(args.in_flight, "--in-flight")
    options: dict[str, Any] = {"device": args.device, "dtype": shape["dtype"], "decode": args.decode}
    gpus: dict[str, Any] = {"enabled": False}
    if args.device.startswith("cuda"):
        gpus = {"enabled": True, "devices": [int(args.device.partition(":")[2])]}
    started = time.monotonic()
    bench = DaemonBench(
        workdir, args.folder, slots=max(counts), max_new_tokens=args.new_tokens, model=MODEL,
        model_options=options, gpus=gpus,
    )  # fmt: skip
    async with bench:
        loaded = bench.runner.loaded(MODEL)
        if loaded is None:
            raise RuntimeError("the daemon started without the model loaded")
        part["load_seconds"] = round(time.monotonic() - started, 2)
        part["decode_mode_loaded"] = getattr(loaded, "decode_mode", None)
        part["weight_gb"] = round(loaded.weight_bytes / 1e9, 3)
        try:
            prompt = await pick_prompt(bench.runner, MODEL, args.new_tokens, batch=max(counts))
            part["prompts_run_full_length"] = True
        except RuntimeError:  # rates count the tokens actually generated
            prompt, part["prompts_run_full_length"] = CANDIDATE_PROMPTS[0], False
        write_json(args.part, part)
        if args.raw:
            bandwidth = await asyncio.to_thread(copy_bandwidth, args.device, 2048 if args.device != "cpu" else 512)
            part["copy_bandwidth_gb_s"] = round(bandwidth / 1e9, 1)
            part["ceiling_b1_tokens_per_s"] = round(bandwidth / loaded.weight_bytes, 2)
        part["in_flight"] = {}
        skipped: list[int] = []
        last_seconds = 0.0
        for n in counts:
            elapsed = time.monotonic() - started
            if args.budget_s and elapsed + 1.5 * last_seconds > args.budget_s:
                skipped.append(n)
                continue
            count_started = time.monotonic()
            part["in_flight"][str(n)] = await measure_count(bench, loaded, prompt, n, args)
            last_seconds = time.monotonic() - count_started
            write_json(args.part, part)
        if skipped:
            part["skipped_in_flight"] = skipped
        first = part["in_flight"].get("1")
        if args.raw and first is not None:
            ceiling = part["ceiling_b1_tokens_per_s"]
            part["daemon_b1_fraction_of_ceiling"] = round(first["daemon"]["tokens_per_s"] / ceiling, 4)
            part["raw_b1_fraction_of_ceiling"] = round(first["raw"]["tokens_per_s"] / ceiling, 4)
        write_json(args.part, part)


async def measure_count(bench: Any, loaded: Any, prompt: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Daemon (and with ``--raw`` raw generate, alternating) at ``n`` jobs in flight."""
    prompts = job_prompts(prompt, n)
    payloads = [bench.payload(p) for p in prompts]
    await bench.run_batch(payloads)  # warm-up at this count (and compiles, for a compiled mode)
    if args.raw:
        await raw_run(loaded, prompts, args.new_tokens)
    runs, raw_times, raw_first, pairs, per_row = [], [], [], [], 0
    for _ in range(args.repeats):
        if args.raw:
            seconds, per_row = await raw_run(loaded, prompts, args.new_tokens)
            raw_times.append(seconds)
            raw_first.append((await raw_run(loaded, prompts, 1))[0])
        runs.append(await bench.run_batch(payloads))
        if args.raw:
            pairs.append(runs[-1].seconds / raw_times[-1])
    figures: dict[str, Any] = {"daemon": daemon_summary(runs)}
    if args.raw:
        figures["raw"] = {
            "seconds": round(median(raw_times), 4),
            "tokens_per_s": round(median([n * per_row / s for s in raw_times]), 2),
            "tokens_per_s_per_job": round(median([per_row / s for s in raw_times]), 2),
            "first_token_ms": round(median(raw_first) * 1000, 2),
            "tokens": n * per_row,
        }
        figures["daemon_over_raw"] = round(median(pairs), 4)
    return figures


def cmd_path(args: argparse.Namespace) -> int:
    check_device(args.device)
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    part: dict[str, Any] = {"decode": args.decode, "new_tokens": args.new_tokens, "repeats": args.repeats}
    with tempfile.TemporaryDirectory(prefix="aitbc-gpu-path-") as tmp:
        try:
            asyncio.run(measure_path(args, Path(tmp), part))
        except Exception as exc:  # the error goes into the figures; the script goes on with the next step
            part["error"] = error_line(exc)
            write_json(args.part, part)
            traceback.print_exc()
            return 1
    print(f"decode = {args.decode!r}: {len(part.get('in_flight', {}))} in-flight counts measured")
    return 0


# --- report ---------------------------------------------------------------------------------


def read_part(parts: Path, name: str) -> dict[str, Any] | None:
    path = parts / f"{name}.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data


def parse_status(text: str) -> dict[str, dict[str, Any]]:
    """``name=rc:seconds,...`` (what the script passes) as ``{name: {"rc": rc, "seconds": s}}``."""
    steps: dict[str, dict[str, Any]] = {}
    for item in filter(None, text.split(",")):
        name, _, rest = item.partition("=")
        rc, _, seconds = rest.partition(":")
        steps[name] = {"rc": int(rc) if rc.lstrip("-").isdigit() else rc, "seconds": int(seconds or 0)}
    return steps


def step_error(step: dict[str, Any] | None) -> str:
    if step is None:
        return "the step did not run"
    if step["rc"] == "skipped":
        return "skipped: the script's time budget was spent"
    if step["rc"] in (124, 137):
        return f"killed by its timeout after {step['seconds']} s"
    return f"the step exited {step['rc']} without figures"


def summarize(parts: Path, steps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The merged figures (see ``report`` in the module docstring)."""
    build = read_part(parts, "build") or {}
    results: dict[str, Any] = {**build, "steps": steps}
    eager = read_part(parts, "eager")
    if eager is not None:
        for key in ("new_tokens", "repeats", "weight_gb", "copy_bandwidth_gb_s", "ceiling_b1_tokens_per_s"):
            if key in eager:
                results[key] = eager[key]
        for key in ("daemon_b1_fraction_of_ceiling", "raw_b1_fraction_of_ceiling"):
            if key in eager:
                results[key] = eager[key]
        results["in_flight"] = eager.get("in_flight", {})
    modes: dict[str, Any] = {}
    eager_rates = {n: f["daemon"]["tokens_per_s"] for n, f in (eager or {}).get("in_flight", {}).items()}
    for mode in MODES:
        part = read_part(parts, mode)
        if part is None:
            modes[mode] = {"error": step_error(steps.get(mode))}
            continue
        summary: dict[str, Any] = {
            k: part[k] for k in ("decode_mode_loaded", "load_seconds", "error", "skipped_in_flight") if k in part
        }
        if "error" not in summary and steps.get(mode, {}).get("rc") not in (None, 0):
            summary["error"] = step_error(steps[mode])
        counts = part.get("in_flight", {})
        summary["tokens_per_s"] = {n: f["daemon"]["tokens_per_s"] for n, f in counts.items()}
        summary["ttft_p50_ms"] = {n: f["daemon"]["ttft_p50_ms"] for n, f in counts.items()}
        if mode != "eager":
            summary["vs_eager"] = {
                n: round(rate / eager_rates[n], 3) for n, rate in summary["tokens_per_s"].items() if eager_rates.get(n)
            }
        modes[mode] = summary
    results["modes"] = modes
    return results


def flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows.extend(flatten(value, name + "."))
        else:
            rows.append((name, value))
    return rows


def cmd_report(args: argparse.Namespace) -> int:
    results = summarize(args.parts, parse_status(args.status))
    results["dry_run"] = args.dry_run
    if args.json is not None:
        write_json(args.json, results)
    print("| figure | value |\n|---|---|")
    for key, value in flatten(results):
        print(f"| {key} | {value} |")
    if args.json is not None:
        print(f"\nwritten to {args.json}")
    eager = results["modes"]["eager"]
    return 0 if "error" not in eager and results.get("in_flight") else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    workdir = sub.add_parser("workdir", help="print a fresh folder for the model")
    workdir.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    build = sub.add_parser("build", help="build the random model on the device and save it")
    path = sub.add_parser("path", help="the whole path (coordinator + daemon) at each in-flight count")
    for step in (build, path):
        step.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
        step.add_argument("--device", default="cuda:0", help="cuda:N or cpu")
        step.add_argument("--folder", type=Path, required=True, help="the model's folder")
        step.add_argument("--part", type=Path, required=True, help="where this step writes its figures (JSON)")
    path.add_argument("--decode", choices=MODES, default="eager", help="the model's decode option")
    path.add_argument("--raw", action="store_true", help="alternate raw generate runs with the daemon's")
    path.add_argument("--in-flight", default="1,8,32,64", help="jobs in flight, comma-separated")
    path.add_argument("--new-tokens", type=int, default=64)
    path.add_argument("--repeats", type=int, default=2, help="timed runs per count, after one warm-up")
    path.add_argument("--budget-s", type=float, default=0, help="skip counts that would end past this (0: none)")
    report = sub.add_parser("report", help="merge the steps' figures, print them, write the JSON")
    report.add_argument("--parts", type=Path, required=True)
    report.add_argument("--status", default="", help="name=rc:seconds,... of the script's steps")
    report.add_argument("--json", type=Path, default=None)
    report.add_argument("--dry-run", action="store_true", help="mark the figures as a CPU dry run")
    args = parser.parse_args(argv)
    if getattr(args, "repeats", 1) < 1 or getattr(args, "new_tokens", 1) < 1:
        parser.error("--repeats and --new-tokens must be at least 1")
    commands = {"workdir": cmd_workdir, "build": cmd_build, "path": cmd_path, "report": cmd_report}
    return commands[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
