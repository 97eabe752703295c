"""Decode modes (eager, static KV cache, continuous batching) on the tiny Llama (CPU), and the auto choice."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from miner.wire.errors import ErrorCode, JobError
from runners.base import RunnerContext
from runners.hf.decode import CACHE_FILE, MODES, cache_key, measure_tokens_per_s, resolve_decode_mode
from tests.transformers.helpers import job, running, spec

PROMPTS = [
    "hello world",
    "The miner claims a job from the coordinator, runs it on a local GPU and",
    "x",
    "def generate(prompt, max_new_tokens=64):",
]
BATCHING = {"max_batch_size": 8, "batch_wait_ms": 300, "batch_window_ms": 2000}
LONG = 1500  # new tokens: seconds of work on the tiny model, so a cancel lands mid-generation


def raw_greedy(loaded, prompt: str, max_new: int) -> str:
    """Greedy text straight from ``model.generate`` (dynamic cache, no runner code)."""
    ids = loaded.tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = loaded.model.generate(**ids, max_new_tokens=max_new, do_sample=False, pad_token_id=loaded.pad_id)
    new = [t for t in out[0, ids["input_ids"].shape[1] :].tolist() if t not in loaded.eos_ids and t != loaded.pad_id]
    return loaded.tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("mode", MODES)
def test_mode_gives_eager_output_alone_and_batched(tiny_model: Path, mode: str) -> None:
    """Greedy jobs give raw generate's text alone and in a batch of different prompts; seeded ones reproduce."""
    sampled = {"temperature": 1.0, "top_p": 0.95, "top_k": 50, "max_new_tokens": 16}

    async def scenario():
        async with running(spec("tiny", tiny_model, decode=mode, **BATCHING)) as runner:
            loaded = runner.loaded("tiny")
            alone = [await runner.run(job("tiny", p, max_new_tokens=20)) for p in PROMPTS]
            together = await asyncio.gather(*(runner.run(job("tiny", p, max_new_tokens=20)) for p in PROMPTS))
            raw = [raw_greedy(loaded, p, 20) for p in PROMPTS]
            seeded_alone = await runner.run(job("tiny", PROMPTS[3], seed=7, **sampled))
            seeded_batch = await asyncio.gather(
                runner.run(job("tiny", PROMPTS[3], seed=7, **sampled)),
                runner.run(job("tiny", PROMPTS[0], seed=99, **sampled)),
                runner.run(job("tiny", PROMPTS[1], **sampled)),
            )
            # what each mode leaves on the model: a kept continuous-batching manager, a static cache length
            ran = {
                "continuous": getattr(loaded.model, "_cached_continuous_batching_manager", None) is not None,
                "static": getattr(loaded.model, "_previous_max_cache_length", None) is not None,
            }
            return loaded.decode_mode, ran, alone, together, raw, seeded_alone, seeded_batch

    decode_mode, ran, alone, together, raw, seeded_alone, seeded_batch = asyncio.run(scenario())
    assert decode_mode == mode
    assert ran == {"continuous": mode == "continuous", "static": mode == "static"}
    assert [r.extra["batch_size"] for r in together] == [len(PROMPTS)] * len(PROMPTS)
    assert [r.output for r in alone] == raw
    assert [r.output for r in together] == raw
    assert [r.completion_tokens for r in together] == [r.completion_tokens for r in alone]
    assert all(r.gpu_seconds > 0 and r.ttft_ms > 0 for r in together)
    assert seeded_batch[0].extra["batch_size"] == 3
    assert seeded_batch[0].output == seeded_alone.output  # continuous refuses sampling: it runs eager


@pytest.mark.parametrize("mode", MODES)
def test_cancelled_row_stops_early_and_the_mode_keeps_serving(tiny_model: Path, mode: str) -> None:
    """A long row cancelled while its batch runs fails CANCELLED before its end; its companion and the next job finish."""

    async def scenario():
        async with running(spec("tiny", tiny_model, decode=mode, max_new_tokens=LONG, **BATCHING)) as runner:
            victim = job("tiny", PROMPTS[1], max_new_tokens=LONG)
            task = asyncio.create_task(runner.run(victim))
            companion = await runner.run(job("tiny", PROMPTS[0], max_new_tokens=8))
            victim.cancel()
            with pytest.raises(JobError) as info:
                await task
            after = await runner.run(job("tiny", PROMPTS[2], max_new_tokens=6))
            return companion, info.value, after

    companion, error, after = asyncio.run(scenario())
    assert companion.extra["batch_size"] == 2
    assert error.code == ErrorCode.CANCELLED
    found = re.search(r"stopped after (\d+) of (\d+) tokens", error.message)
    assert found is not None and int(found.group(2)) == LONG and int(found.group(1)) < LONG
    assert after.completion_tokens == 6 and after.extra["batch_size"] == 1


def test_stop_string_in_continuous_mode_cuts_like_eager(tiny_model: Path) -> None:
    """A stop string ends a continuous row exactly where eager decoding ends it."""

    async def scenario():
        async with running(spec("tiny", tiny_model, decode="continuous")) as runner:
            full = await runner.run(job("tiny", PROMPTS[1], max_new_tokens=30))
            stop = full.output[len(full.output) // 2 : len(full.output) // 2 + 3]
            cut = await runner.run(job("tiny", PROMPTS[1], max_new_tokens=30, stop=[stop]))
            return full, stop, cut

    full, stop, cut = asyncio.run(scenario())
    assert stop and cut.finish_reason == "stop"
    assert cut.output == full.output[: full.output.find(stop)]
    assert cut.completion_tokens < full.completion_tokens


def test_auto_choice_is_measured_once_and_cached(tiny_model: Path, tmp_path: Path) -> None:
    """auto measures through ``measure``, keeps the fastest in the state folder, and a restart reuses it."""
    calls: list[tuple[str, int]] = []
    speeds = {"eager": 100.0, "static": 300.0, "continuous": 150.0}

    def fake(loaded, mode: str, batch: int) -> float:
        calls.append((mode, batch))
        return speeds[mode] * batch

    def never(loaded, mode: str, batch: int) -> float:
        raise AssertionError("a cached choice must not be measured again")

    async def scenario():
        context = RunnerContext(state_dir=tmp_path)
        async with running(spec("tiny", tiny_model, max_batch_size=4), context=context) as runner:
            loaded = runner.loaded("tiny")
            on_cpu = loaded.decode_mode
            first = resolve_decode_mode("auto", loaded, tmp_path, measure=fake)
            again = resolve_decode_mode("auto", loaded, tmp_path, measure=never)
            cached_only = resolve_decode_mode("auto", loaded, tmp_path, bench=False, measure=never)
            options = loaded.entry.options.model_copy(update={"max_batch_size": 2})
            other = dataclasses.replace(loaded, entry=dataclasses.replace(loaded.entry, options=options))
            unmeasured = resolve_decode_mode("auto", other, tmp_path, bench=False, measure=never)
            real = resolve_decode_mode("auto", loaded, None, measure=measure_tokens_per_s)
            return on_cpu, first, again, cached_only, unmeasured, real, cache_key(loaded), cache_key(other)

    on_cpu, first, again, cached_only, unmeasured, real, key, other_key = asyncio.run(scenario())
    assert on_cpu == "eager"  # auto on the CPU without a measure: eager, nothing measured
    assert first == again == cached_only == "static"
    assert sorted(calls) == sorted((m, b) for m in MODES for b in (1, 4))
    saved = json.loads((tmp_path / CACHE_FILE).read_text())["choices"]
    assert list(saved) == [key] and saved[key]["mode"] == "static"
    assert saved[key]["figures"]["static"] == {"1": 300.0, "4": 1200.0}
    parts = json.loads(key)
    assert set(parts) == {"model_revision", "dtype", "device", "torch", "transformers", "max_batch_size"}
    assert parts["max_batch_size"] == 4 and parts["model_revision"].startswith("local-")
    assert other_key != key and unmeasured == "eager"  # another max_batch_size is not the cached choice
    assert real in MODES


def test_explicit_modes_are_taken_as_given(tiny_model: Path, tmp_path: Path) -> None:
    """An explicit decode option is used as is, measures nothing and writes no cache."""

    async def scenario():
        async with running(spec("tiny", tiny_model)) as runner:
            loaded = runner.loaded("tiny")
            return [resolve_decode_mode(m, loaded, tmp_path, measure=None) for m in MODES]

    assert asyncio.run(scenario()) == list(MODES)
    assert not (tmp_path / CACHE_FILE).exists()
