"""Throughput of the transformers runner on one device, against raw ``generate``.

Builds a random-weight Llama of the chosen shape directly on the device (``llama2-7b``:
hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32000, float16 -- about
13.5 GB, no download), saves it with ``save_pretrained`` (to ``/dev/shm`` when it has
room) so the runner loads it through its normal path, then reports tokens/s at each batch
size through the runner and through raw ``generate``, and batch-1 tokens/s as a fraction
of the memory-bandwidth ceiling (measured device copy bandwidth / weight bytes).

    python bench/gpu_check.py                          # Llama-2-7B shape on cuda:0
    python bench/gpu_check.py --shape tiny --device cpu  # the CPU-checkable dry run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.tinybench import copy_bandwidth, median, raw_generate  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "llama2-7b": {"hidden": 4096, "layers": 32, "heads": 32, "intermediate": 11008, "vocab": 32000, "dtype": "float16"},
    "tiny": {"hidden": 256, "layers": 4, "heads": 4, "intermediate": 688, "vocab": 16384, "dtype": "float32"},
}
PROMPT = "def read_config(path):\n    "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    parser.add_argument("--device", default="cuda:0", help="cuda:N or cpu")
    parser.add_argument("--batches", default="1,8,32", help="batch sizes, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per figure after one warm-up")
    parser.add_argument("--workdir", type=Path, default=None, help="where to save the model (default /dev/shm or tmp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batches must be integers separated by commas, got {args.batches!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        parser.error("--batches needs at least one size >= 1")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        parser.error(f"--device must be cpu or cuda:N, got {args.device!r}")
    return args


def workdir_for(args: argparse.Namespace, need_bytes: int) -> Path:
    if args.workdir is not None:
        return args.workdir
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > need_bytes * 1.2:
        return Path(tempfile.mkdtemp(prefix="aitbc-gpu-check-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="aitbc-gpu-check-"))


def build_on_device(folder: Path, shape: dict[str, Any], device: str) -> float:
    """Create the random model on ``device`` in its dtype and save it; returns seconds taken."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from runners.tinyllama import llama_config, train_tokenizer

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
    dtype = getattr(torch, shape["dtype"])
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    if not torch.isfinite(model.lm_head.weight).all():
        raise RuntimeError("the random model has non-finite weights")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return time.perf_counter() - started


async def measure(args: argparse.Namespace, folder: Path, shape: dict[str, Any]) -> dict[str, Any]:
    from runners.base import Job, ModelSpec, RunnerContext
    from runners.params import parse_text_payload
    from runners.transformers import TransformersRunner

    options = {
        "path": str(folder),
        "device": args.device,
        "dtype": shape["dtype"],
        "max_batch_size": max(args.batch_sizes),
        "max_new_tokens": args.new_tokens,
    }
    started = time.perf_counter()
    runner = TransformersRunner([ModelSpec(name="m", runner="transformers", **options)], RunnerContext())
    await runner.start()
    figures: dict[str, Any] = {"load_seconds": round(time.perf_counter() - started, 2)}
    loaded = runner.loaded("m")
    params = {"max_new_tokens": args.new_tokens, "temperature": 0}

    async def through_runner(n: int) -> tuple[float, int, int]:
        jobs = [
            Job(f"j{i}", parse_text_payload({"model": "m", "prompt": PROMPT, "parameters": params})) for i in range(n)
        ]
        t0 = time.perf_counter()
        results = await asyncio.gather(*(runner.run(job) for job in jobs))
        seconds = time.perf_counter() - t0
        return seconds, sum(r.completion_tokens for r in results), max(r.extra["batch_size"] for r in results)

    async def raw(n: int) -> tuple[float, int, int]:
        t0 = time.perf_counter()
        per_row = await asyncio.to_thread(raw_generate, loaded, PROMPT, args.new_tokens, n)
        return time.perf_counter() - t0, per_row * n, n

    try:
        for n in args.batch_sizes:
            for label, fn in (("runner", through_runner), ("raw", raw)):
                await fn(n)  # warm-up
                runs = [await fn(n) for _ in range(args.repeats)]
                seconds = median([r[0] for r in runs])
                figures[f"{label}_b{n}_tokens_per_s"] = round(runs[0][1] / seconds, 1)
                figures[f"{label}_b{n}_batch"] = runs[0][2]
        bandwidth = await asyncio.to_thread(copy_bandwidth, args.device, 2048 if args.device != "cpu" else 512)
        ceiling = bandwidth / loaded.weight_bytes
        figures["copy_bandwidth_gb_s"] = round(bandwidth / 1e9, 1)
        figures["weight_gb"] = round(loaded.weight_bytes / 1e9, 2)
        figures["ceiling_b1_tokens_per_s"] = round(ceiling, 1)
        first = args.batch_sizes[0]
        figures["runner_b1_fraction_of_ceiling"] = round(figures[f"runner_b{first}_tokens_per_s"] / first / ceiling, 3)
        figures["raw_b1_fraction_of_ceiling"] = round(figures[f"raw_b{first}_tokens_per_s"] / first / ceiling, 3)
    finally:
        await runner.aclose()
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device visible; use --shape tiny --device cpu for a dry run", file=sys.stderr)
        return 2
    shape = SHAPES[args.shape]
    params = 12 * shape["hidden"] ** 2 * shape["layers"] + 2 * shape["vocab"] * shape["hidden"]
    workdir = workdir_for(args, params * (2 if shape["dtype"] != "float32" else 4))
    folder = workdir / args.shape
    try:
        build_s = build_on_device(folder, shape, args.device)
        figures = {"shape": args.shape, "device": args.device, "build_seconds": round(build_s, 1)}
        if args.device.startswith("cuda"):
            figures["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
        figures.update(asyncio.run(measure(args, folder, shape)))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print("| figure | value |\n|---|---|")
    for key, value in figures.items():
        print(f"| {key} | {value} |")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
