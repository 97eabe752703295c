"""Shared pieces of the transformers benchmarks: the model, prompts, raw generate, bandwidth.

Nothing here is timed against a target; :mod:`bench.run` and :mod:`bench.gpu_check` turn
the measurements into ratios and rates.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

# The "tiny" benchmark model: 11.6 M parameters with a 16,384-entry tokenizer.
TINY_SHAPE: dict[str, Any] = {
    "hidden": 256,
    "layers": 4,
    "heads": 4,
    "intermediate": 688,
    "vocab_size": 16384,
    "corpus": "stdlib",
}
NEW_TOKENS = 64
CANDIDATE_PROMPTS = [
    "def read_config(path):\n    ",
    "The quick brown fox jumps over the lazy dog.",
    "class Cache:\n    def __init__(self, size):\n",
    "import os\nimport sys\n\n",
    "Once upon a time",
    "for i in range(10):",
]


def build(folder: Path, **shape: Any) -> Path:
    """Build the benchmark model (``TINY_SHAPE`` unless overridden) into ``folder``."""
    from runners.tinyllama import build_tiny_llama

    return build_tiny_llama(folder, **{**TINY_SHAPE, **shape})


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, linearly interpolated; ValueError when empty."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def job_prompts(prompt: str, n: int) -> list[str]:
    """``n`` distinct prompts built on ``prompt``: one per job of a batch (no two jobs share a prompt)."""
    return [f"# job {i}\n{prompt}" for i in range(n)]


def payload(model: str, prompt: str, new_tokens: int) -> dict[str, Any]:
    """A greedy text job for ``model``: what a client would POST as the payload."""
    return {"model": model, "prompt": prompt, "parameters": {"max_new_tokens": new_tokens, "temperature": 0}}


def raw_generate(loaded: Any, prompts: str | list[str], new_tokens: int, batch: int = 1) -> int:
    """One plain greedy ``model.generate`` on the runner's loaded model; returns tokens generated per row.

    ``prompts`` is one prompt (repeated ``batch`` times) or the batch's prompts, padded on the
    left by the runner's tokenizer as the runner pads them.
    """
    import torch

    texts = [prompts] * batch if isinstance(prompts, str) else list(prompts)
    tok = loaded.tokenizer
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = loaded.model.generate(
            input_ids=enc["input_ids"].to(loaded.device),
            attention_mask=enc["attention_mask"].to(loaded.device),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=loaded.pad_id,
        )
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)
    return int(out.shape[1] - enc["input_ids"].shape[1])


def copy_bandwidth(device: str = "cpu", mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second moved by a large tensor copy (read + write), best of ``repeats``."""
    import torch

    n = mib * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        dst.copy_(src)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    del src, dst
    return 2 * n * 4 / best


async def pick_prompt(runner: Any, model: str, new_tokens: int, batch: int = 1) -> str:
    """The first candidate prompt whose greedy continuations all run the full ``new_tokens`` (no EOS).

    With ``batch`` > 1 the check runs the batch's :func:`job_prompts` together through the
    runner, so a batched figure compares the same number of tokens on both sides.
    RuntimeError when no candidate qualifies.
    """
    import asyncio

    from runners.base import Job
    from runners.params import parse_text_payload

    for prompt in CANDIDATE_PROMPTS:
        texts = [prompt] if batch <= 1 else job_prompts(prompt, batch)
        jobs = [Job(f"pick{i}", parse_text_payload(payload(model, t, new_tokens))) for i, t in enumerate(texts)]
        results = await asyncio.gather(*(runner.run(job) for job in jobs))
        if all(r.completion_tokens == new_tokens for r in results):
            return prompt
    raise RuntimeError("every candidate prompt hits EOS early on this model; add a prompt")
