"""``make bench``: the transformers runner's figures, measured in one run on one model.

Builds the "tiny" Llama (random weights, 16,384-entry tokenizer trained on the standard
library; :data:`bench.tinybench.TINY_SHAPE`) offline, then measures on the CPU:

* ``daemon_over_raw``: one 64-token job, claim -> run -> sign -> result accepted, through
  the real daemon and the local coordinator, over raw ``model.generate`` (target <= 1.05);
* ``daemon_batched_over_raw_batched_8`` / ``_32``: N jobs (distinct prompts) submitted
  together through the daemon (``concurrency`` = the model's ``max_batch_size`` = the largest
  N, so all N are in flight at once), first claim -> last result, over one raw
  ``model.generate`` of the same N prompts batched, left-padded, same new tokens (target
  <= 1.10). What it costs to batch through the daemon instead of by hand;
* ``batched_over_sequential_8`` / ``_32`` (informational, no target): the N jobs together
  over N times the one-job daemon time: what batching saves;
* ``warm_claim_to_first_token_ms``: claim (coordinator assignment) -> first token of a job
  on the loaded model (target < 50 ms);
* ``b1_fraction_of_ceiling``: batch-1 tokens/s through the runner over the memory-bandwidth
  ceiling (measured copy bandwidth / weight bytes read per token);
* the same without the daemon (``runner_*``: the runner called directly), for reference.

Every ratio is the median of pairs in which a baseline run and a measured run alternate,
so the drift of a shared machine cancels out; nothing is a timed assertion. The prompts
are checked first to run the full 64 tokens without EOS, alone and as a batch of N, so
both sides of a ratio generate the same tokens.

Prints a table and writes ``bench/results.json``. ``--no-daemon`` measures the runner only.

    .venv/bin/python bench/run.py [--repeats 5] [--sizes 8,32] [--no-daemon] [--out bench/results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.tinybench import (  # noqa: E402
    NEW_TOKENS,
    TINY_SHAPE,
    build,
    copy_bandwidth,
    job_prompts,
    median,
    payload,
    pick_prompt,
    raw_generate,
)

TARGETS = {
    "daemon_over_raw": ("<=", 1.05),
    "daemon_batched_over_raw_batched_8": ("<=", 1.10),
    "daemon_batched_over_raw_batched_32": ("<=", 1.10),
    "warm_claim_to_first_token_ms": ("<", 50.0),
}


def tiny_payload(prompt: str) -> dict[str, Any]:
    return payload("tiny", prompt, NEW_TOKENS)


async def raw_seconds(loaded: Any, prompts: str | list[str]) -> float:
    """Seconds for one raw greedy ``generate`` of ``prompts`` (one prompt, or a left-padded batch)."""
    started = time.perf_counter()
    await asyncio.to_thread(raw_generate, loaded, prompts, NEW_TOKENS)
    return time.perf_counter() - started


async def runner_figures(runner: Any, prompt: str, repeats: int, sizes: list[int]) -> dict[str, float]:
    """Raw generate vs the runner called directly (no daemon), on the runner's loaded model.

    Baseline and measured runs alternate and ratios are medians of the pairs, so the drift
    of a shared machine cancels out.
    """
    from runners.base import Job
    from runners.params import parse_text_payload

    loaded = runner.loaded("tiny")
    await raw_seconds(loaded, prompt)  # warm-up
    raw, ratios, ttft = [], [], []
    for _ in range(3 * repeats):  # single jobs are cheap: more pairs, steadier medians
        raw.append(await raw_seconds(loaded, prompt))
        started = time.perf_counter()
        result = await runner.run(Job("bench", parse_text_payload(tiny_payload(prompt))))
        ratios.append((time.perf_counter() - started) / raw[-1])
        ttft.append(result.ttft_ms)
    out = {
        "raw_b1_seconds": median(raw),
        "raw_b1_tokens_per_s": NEW_TOKENS / median(raw),
        "runner_b1_tokens_per_s": NEW_TOKENS / (median(raw) * median(ratios)),
        "runner_over_raw": median(ratios),
        "runner_ttft_ms": median(ttft),
    }
    for n in sizes:
        prompts = job_prompts(prompt, n)
        await raw_seconds(loaded, prompts)  # warm-up at this batch size
        pairs = []
        for _ in range(repeats):
            baseline = await raw_seconds(loaded, prompts)
            jobs = [Job(f"b{i}", parse_text_payload(tiny_payload(p))) for i, p in enumerate(prompts)]
            started = time.perf_counter()
            await asyncio.gather(*(runner.run(job) for job in jobs))
            pairs.append((time.perf_counter() - started) / baseline)
        out[f"runner_batched_over_raw_batched_{n}"] = median(pairs)
    weights = loaded.weight_bytes
    bandwidth = await asyncio.to_thread(copy_bandwidth, "cpu" if loaded.device.type == "cpu" else str(loaded.device))
    out["copy_bandwidth_gb_s"] = bandwidth / 1e9
    out["weight_mb"] = weights / 1e6
    out["ceiling_tokens_per_s"] = bandwidth / weights
    out["b1_fraction_of_ceiling"] = out["runner_b1_tokens_per_s"] / out["ceiling_tokens_per_s"]
    return out


async def daemon_figures(bench: Any, prompt: str, repeats: int, sizes: list[int]) -> dict[str, float]:
    """The whole daemon path; raw generate runs (alone or batched) alternate with the daemon's jobs."""
    loaded = bench.runner.loaded("tiny")
    await bench.run_one(tiny_payload(prompt))  # warm the whole path once
    path, ratios, first_token = [], [], []
    for _ in range(3 * repeats):
        raw = await raw_seconds(loaded, prompt)
        seconds, to_first = await bench.run_one(tiny_payload(prompt))
        path.append(seconds)
        ratios.append(seconds / raw)
        first_token.append(to_first)
    out = {
        "daemon_b1_seconds": median(path),
        "daemon_over_raw": median(ratios),
        "warm_claim_to_first_token_ms": median(first_token) * 1000,
    }
    for n in sizes:
        prompts = job_prompts(prompt, n)
        await raw_seconds(loaded, prompts)  # warm-up at this batch size, both sides
        await bench.run_batch([tiny_payload(p) for p in prompts])
        pairs, together_s, raw_s, largest = [], [], [], 0
        for _ in range(repeats):
            raw_s.append(await raw_seconds(loaded, prompts))
            run = await bench.run_batch([tiny_payload(p) for p in prompts])
            if run.tokens != n * NEW_TOKENS:
                raise RuntimeError(f"the daemon generated {run.tokens} tokens for {n} jobs, not {n * NEW_TOKENS}")
            together_s.append(run.seconds)
            largest = max([largest] + [j.batch_size for j in run.jobs])
            pairs.append(together_s[-1] / raw_s[-1])
        out[f"raw_batched_seconds_{n}"] = median(raw_s)
        out[f"daemon_batched_seconds_{n}"] = median(together_s)
        out[f"daemon_largest_batch_{n}"] = float(largest)
        out[f"daemon_batched_over_raw_batched_{n}"] = median(pairs)
        out[f"batched_over_sequential_{n}"] = median(together_s) / (n * out["daemon_b1_seconds"])
    return out


async def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    folder = build(workdir / "tiny")
    results: dict[str, Any] = {"model": {**TINY_SHAPE, "build_seconds": round(time.perf_counter() - started, 2)}}
    sizes = [int(s) for s in args.sizes.split(",") if s]
    slots = max(sizes + [1])
    if args.no_daemon:
        from runners.base import ModelSpec, RunnerContext
        from runners.transformers import TransformersRunner

        options = {"path": str(folder), "max_batch_size": slots, "max_new_tokens": NEW_TOKENS}
        runner = TransformersRunner([ModelSpec(name="tiny", runner="transformers", **options)], RunnerContext())
        await runner.start()
        try:
            prompt = await pick_prompt(runner, "tiny", NEW_TOKENS, batch=slots)
            results.update(await runner_figures(runner, prompt, args.repeats, sizes))
        finally:
            await runner.aclose()
        return results
    from bench.daemonbench import DaemonBench

    # concurrency and max_batch_size are both `slots`: the largest N is in flight in one batch.
    async with DaemonBench(workdir, folder, slots=slots, max_new_tokens=NEW_TOKENS) as bench:
        prompt = await pick_prompt(bench.runner, "tiny", NEW_TOKENS, batch=slots)
        results.update(await runner_figures(bench.runner, prompt, args.repeats, sizes))
        results.update(await daemon_figures(bench, prompt, args.repeats, sizes))
    return results


def table(results: dict[str, Any]) -> str:
    lines = ["| figure | value | target |", "|---|---|---|"]
    for key, value in results.items():
        if key == "model":
            continue
        op, target = TARGETS.get(key, ("", None))
        verdict = ""
        if target is not None:
            ok = value <= target if op == "<=" else value < target
            verdict = f"{op} {target:g} {'ok' if ok else 'MISSED'}"
        lines.append(f"| {key} | {value:,.3f} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed pairs per batched figure (median); 3x that for one job"
    )
    parser.add_argument("--sizes", default="8,32", help="batch sizes (jobs in flight) for the batched figures")
    parser.add_argument("--no-daemon", action="store_true", help="measure the runner alone")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results.json")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory(prefix="aitbc-bench-") as tmp:
        results = asyncio.run(measure(args, Path(tmp)))
    results = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in results.items()}
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
