"""Which decode mode a loaded model uses: the ``decode`` model option, measured once for ``auto``.

Modes (see :func:`runners.hf.batch.run_batch`): ``eager`` (a dynamic KV cache),
``static`` (a static KV cache; transformers compiles the forward with CUDA graphs on CUDA)
and ``continuous`` (transformers' continuous batching with paged attention,
:mod:`runners.hf.continuous`). Every mode gives the same output.

:func:`resolve_decode_mode` runs in the device's worker thread after the model's warm-up:

- ``eager`` / ``static`` / ``continuous``: that mode (``continuous`` is refused with a
  ConfigError when this transformers version lacks the API: :func:`check_option`);
- ``auto`` on the CPU: ``eager`` (compiling is too slow there to pay off);
- ``auto`` on CUDA: each mode's tokens/s over :data:`BENCH_STEPS` decoding steps at batch 1
  and at the model's ``max_batch_size`` (untimed once first, so compiling is not counted);
  the mode with the best mean ratio to eager wins. The choice and its figures are kept in
  ``<state_dir>/decode_modes.json`` under a key of everything they depend on (model
  revision, dtype, device name, torch and transformers versions, ``max_batch_size``), so a
  restart reuses them without measuring.

The benchmark decodes a fixed text with EOS ignored, never a job's prompt. Imports torch:
use it from runners/hf only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import torch

from miner.wire.errors import ConfigError
from runners.base import Job
from runners.hf import continuous
from runners.hf.batch import Request, Row, run_batch
from runners.hf.model import LoadedModel
from runners.params import GenerationParams, TextRequest

log = structlog.get_logger("runners.transformers")

MODES = ("eager", "static", "continuous")
BENCH_STEPS = 32  # decoding steps per measured batch
BENCH_TEXT = "The miner claims a job from the coordinator and runs it on a local GPU."
CACHE_FILE = "decode_modes.json"

# (loaded model, mode, batch size) -> tokens per second; a test can pass its own.
Measure = Callable[[LoadedModel, str, int], float]


def check_option(name: str, option: str) -> None:
    """ConfigError when ``decode = "continuous"`` is asked of a transformers without continuous batching."""
    if option == "continuous" and not continuous.available():
        import transformers

        raise ConfigError(
            f"models[name={name!r}].decode: transformers {transformers.__version__} has no continuous batching "
            '(ContinuousBatchingManager); upgrade transformers or set decode = "static" or "eager"'
        )


def resolve_decode_mode(
    option: str,
    loaded: LoadedModel,
    state_dir: Path | None,
    bench: bool = True,
    measure: Measure | None = None,
) -> str:
    """The decode mode for ``loaded`` given its ``decode`` option (see the module docstring).

    ``auto`` measures only on CUDA, or on any device when ``measure`` is given (it then
    times the modes instead of :func:`measure_tokens_per_s`). ``bench=False`` never
    measures: ``auto`` takes the cached choice, else ``eager``. Without ``state_dir`` the
    choice is measured but not kept. Logs ``decode_mode_chosen``.
    """
    check_option(loaded.name, option)
    if option != "auto":
        return _chosen(loaded, option, option, "option", None)
    if loaded.device.type != "cuda" and measure is None:
        return _chosen(loaded, option, "eager", "cpu", None)
    key = cache_key(loaded)
    path = state_dir / CACHE_FILE if state_dir is not None else None
    kept = _read_cache(path).get(key) if path is not None else None
    usable = [m for m in MODES if m != "continuous" or continuous.available()]
    if isinstance(kept, dict) and kept.get("mode") in usable:
        return _chosen(loaded, option, str(kept["mode"]), "cache", kept.get("figures"))
    if not bench:
        return _chosen(loaded, option, "eager", "default", None)
    figures = benchmark(loaded, measure or measure_tokens_per_s)
    mode = pick(figures)
    if path is not None:
        _write_cache(path, key, {"mode": mode, "figures": figures, "measured_at": time.time()})
    return _chosen(loaded, option, mode, "measured", figures)


def _chosen(loaded: LoadedModel, option: str, mode: str, source: str, figures: Any) -> str:
    log.info("decode_mode_chosen", model=loaded.name, option=option, mode=mode, source=source, figures=figures)
    return mode


def cache_key(loaded: LoadedModel) -> str:
    """What a measured choice depends on, as one string (the key in the cache file)."""
    import transformers

    device = torch.cuda.get_device_name(loaded.device) if loaded.device.type == "cuda" else loaded.device.type
    parts = {
        "model_revision": loaded.entry.revision,
        "dtype": loaded.entry.dtype,
        "device": device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "max_batch_size": loaded.entry.options.max_batch_size,
    }
    return json.dumps(parts, sort_keys=True)


def benchmark(loaded: LoadedModel, measure: Measure) -> dict[str, dict[str, float | str]]:
    """Tokens/s of each available mode at batch 1 and ``max_batch_size``; a mode that fails has its error type."""
    sizes = sorted({1, loaded.entry.options.max_batch_size})
    modes = [m for m in MODES if m != "continuous" or continuous.available()]
    figures: dict[str, dict[str, float | str]] = {}
    for mode in modes:
        figures[mode] = {}
        for size in sizes:
            try:
                figures[mode][str(size)] = round(float(measure(loaded, mode, size)), 2)
            except Exception as exc:  # a mode that cannot run here is not chosen; eager is the fallback
                figures[mode] = {"error": type(exc).__name__}
                break
    return figures


def pick(figures: dict[str, dict[str, float | str]]) -> str:
    """The mode whose tokens/s over eager's, averaged over the batch sizes, is highest (eager when none beats it)."""
    eager = figures.get("eager", {})
    best, best_score = "eager", 1.0
    for mode, row in figures.items():
        ratios = [
            float(value) / float(eager[size])
            for size, value in row.items()
            if isinstance(value, (int, float)) and isinstance(eager.get(size), (int, float)) and eager[size]
        ]
        if mode != "eager" and ratios and len(ratios) == len(eager):
            score = sum(ratios) / len(ratios)
            if score > best_score:
                best, best_score = mode, score
    return best


def measure_tokens_per_s(loaded: LoadedModel, mode: str, batch: int) -> float:
    """Tokens/s of ``batch`` rows of :data:`BENCH_TEXT` decoding :data:`BENCH_STEPS` tokens in ``mode``.

    Runs twice and times the second run, so compiling and CUDA-graph capture are not counted.
    EOS is ignored (every row decodes all its steps).
    """
    bench = dataclasses.replace(loaded, eos_ids=frozenset())
    ids = list(loaded.tokenizer(BENCH_TEXT, add_special_tokens=True)["input_ids"]) or [loaded.pad_id]
    loop = asyncio.new_event_loop()  # never run: results are queued on it and dropped
    closing = threading.Event()
    try:
        seconds = 0.0
        for _ in range(2):
            rows = [_bench_row(loop, loaded.name, ids) for _ in range(batch)]
            if loaded.device.type == "cuda":
                torch.cuda.synchronize(loaded.device)
            started = time.perf_counter()
            run_batch(bench, rows, closing, None, None, mode=mode)
            if loaded.device.type == "cuda":
                torch.cuda.synchronize(loaded.device)
            seconds = time.perf_counter() - started
        return batch * BENCH_STEPS / max(seconds, 1e-9)
    finally:
        loop.close()


def _bench_row(loop: asyncio.AbstractEventLoop, model: str, ids: list[int]) -> Row:
    request = TextRequest(model=model, prompt=BENCH_TEXT, messages=None, params=GenerationParams(temperature=0))
    job = Job(job_id="decode-benchmark", request=request)
    return Row(Request(job, loop, loop.create_future()), list(ids), BENCH_STEPS)


def _read_cache(path: Path) -> dict[str, Any]:
    """The cache file's choices; empty when it is missing or unreadable (then measured again)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        log.warning("decode_mode_cache_unreadable", path=str(path))
        return {}
    choices = data.get("choices") if isinstance(data, dict) else None
    return choices if isinstance(choices, dict) else {}


def _write_cache(path: Path, key: str, choice: dict[str, Any]) -> None:
    """Add ``choice`` under ``key``, replacing the file atomically; a failure to write is logged, not raised."""
    choices = _read_cache(path)
    choices[key] = choice
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"version": 1, "choices": choices}, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        log.warning("decode_mode_cache_not_written", path=str(path), error_type=type(exc).__name__)
