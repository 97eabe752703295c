"""Memory estimates, the warm cache's LRU eviction and INSUFFICIENT_VRAM refusals."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from miner.wire.errors import ConfigError, ErrorCode, JobError
from runners.base import GpuInfo, RunnerContext
from runners.hf.memory import ModelShape, estimate_bytes
from runners.transformers import TransformersRunner
from tests.transformers.helpers import job, running, spec

LLAMA2_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
}


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer model of ~15 MiB in float32, too big for a 4 MiB budget."""
    from runners.tinyllama import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "wide", hidden=512, layers=1, heads=8)


def test_estimate_of_a_llama2_7b_shape() -> None:
    """The estimate counts 6.74 B parameters and 0.5 MiB of fp16 KV cache per token for Llama-2-7B."""
    shape = ModelShape.from_config(LLAMA2_7B)
    assert shape.parameter_estimate() == 6_738_415_616
    est = estimate_bytes(shape, prompt_tokens=1024, max_new_tokens=3072, batch=1, dtype="float16")
    assert est.weights == 2 * 6_738_415_616
    assert est.kv_cache == 4096 * 512 * 1024  # 2 GiB for 4096 tokens
    assert est.activations > 0 and est.total == est.weights + est.kv_cache + est.activations


def test_estimate_grows_with_batch_and_uses_known_weights() -> None:
    """KV cache scales with batch and tokens; known weight bytes replace the parameter estimate."""
    shape = ModelShape.from_config({**LLAMA2_7B, "num_key_value_heads": 8})  # grouped-query attention
    one = estimate_bytes(shape, prompt_tokens=100, max_new_tokens=100, batch=1, dtype="bfloat16", weight_bytes=123)
    eight = estimate_bytes(
        shape, prompt_tokens=100, max_new_tokens=100, batch=8, dtype="bfloat16", include_weights=False
    )
    assert one.weights == 123 and eight.weights == 0
    assert one.kv_cache == 2 * 32 * 8 * 128 * 200 * 2
    assert eight.kv_cache == 8 * one.kv_cache
    with pytest.raises(ValueError):
        estimate_bytes(shape, prompt_tokens=-1, max_new_tokens=1, batch=1, dtype="float16")


def test_job_too_big_for_the_budget_is_insufficient_vram(tiny_model: Path) -> None:
    """A job whose KV cache cannot fit next to the weights fails INSUFFICIENT_VRAM; a small one runs."""

    async def scenario():
        async with running(spec("tiny", tiny_model, memory_budget_mb=1, max_new_tokens=2000)) as runner:
            with pytest.raises(JobError) as info:
                await runner.run(job("tiny", "hello", max_new_tokens=1500))
            return info.value, await runner.run(job("tiny", "hello", max_new_tokens=50))

    error, small = asyncio.run(scenario())
    assert error.code == ErrorCode.INSUFFICIENT_VRAM and "lower max_new_tokens" in error.message
    assert small.completion_tokens == 50


def test_batch_is_split_to_fit_the_budget(tiny_model: Path) -> None:
    """Jobs that fit one by one but not together run in smaller batches, all completing."""

    async def scenario():
        options = {"memory_budget_mb": 1, "batch_wait_ms": 200, "batch_window_ms": 1000}
        async with running(spec("tiny", tiny_model, **options)) as runner:
            return await asyncio.gather(*(runner.run(job("tiny", "hello", max_new_tokens=150)) for _ in range(4)))

    results = asyncio.run(scenario())
    assert all(r.completion_tokens == 150 for r in results)
    assert max(r.extra["batch_size"] for r in results) < 4


def test_least_recently_used_model_is_evicted(model_copy) -> None:
    """With room for one model, serving another evicts the least recently used and reloads on demand."""
    a, b = model_copy("a"), model_copy("b")

    async def scenario():
        specs = [spec("a", a, memory_budget_mb=1), spec("b", b, memory_budget_mb=1, preload=False)]
        async with running(*specs) as runner:
            states = [(runner.loaded("a") is not None, runner.loaded("b") is not None)]
            await runner.run(job("b", "hi", max_new_tokens=2))
            states.append((runner.loaded("a") is not None, runner.loaded("b") is not None))
            await runner.run(job("a", "hi", max_new_tokens=2))
            states.append((runner.loaded("a") is not None, runner.loaded("b") is not None))
            return states, runner.ready_models()

    states, ready = asyncio.run(scenario())
    assert states == [(True, False), (False, True), (True, False)]
    assert sorted(ready) == ["a", "b"]


def test_model_bigger_than_the_budget(wide_model: Path) -> None:
    """A model whose weights exceed the budget fails its jobs INSUFFICIENT_VRAM, or stops start if preloaded."""

    async def scenario():
        async with running(spec("wide", wide_model, memory_budget_mb=4, preload=False)) as runner:
            with pytest.raises(JobError) as info:
                await runner.run(job("wide", "hello"))
            return info.value, runner.loaded("wide")

    error, loaded = asyncio.run(scenario())
    assert error.code == ErrorCode.INSUFFICIENT_VRAM and "only 4.0 MiB are free" in error.message
    assert loaded is None

    async def preload():
        runner = TransformersRunner([spec("wide", wide_model, memory_budget_mb=4)], RunnerContext())
        with pytest.raises(ConfigError) as info:
            await runner.start()
        return info.value

    assert "cannot load the model" in str(asyncio.run(preload()))


@pytest.mark.gpu
def test_cuda_batched_equals_unbatched(tiny_model: Path) -> None:
    """On CUDA, batched greedy output equals one-by-one output and results name the GPU."""
    prompts = ["hello world", "The miner claims a job", "x"]
    context = RunnerContext(gpus=[GpuInfo(index=0, uuid="GPU-test", name="gpu", memory_total_mb=1)])

    async def scenario():
        options = {"device": "cuda:0", "dtype": "float32", "batch_wait_ms": 200, "batch_window_ms": 1000}
        async with running(spec("tiny", tiny_model, **options), context=context) as runner:
            alone = [await runner.run(job("tiny", p, max_new_tokens=16)) for p in prompts]
            together = await asyncio.gather(*(runner.run(job("tiny", p, max_new_tokens=16)) for p in prompts))
            return alone, together

    alone, together = asyncio.run(scenario())
    assert [r.output for r in together] == [r.output for r in alone]
    assert together[0].extra["batch_size"] == 3
    assert together[0].device == "cuda:0" and together[0].gpu_uuid == "GPU-test"


@pytest.mark.gpu
def test_cuda_free_memory_report_refuses_a_model_that_cannot_fit(wide_model: Path) -> None:
    """When NVML reports almost no free memory, a job for an unloaded model fails INSUFFICIENT_VRAM."""
    context = RunnerContext(free_vram_mb=lambda index: 1)

    async def scenario():
        async with running(
            spec("wide", wide_model, device="cuda:0", dtype="float32", preload=False), context=context
        ) as runner:
            with pytest.raises(JobError) as info:
                await runner.run(job("wide", "hello"))
            return info.value

    assert asyncio.run(scenario()).code == ErrorCode.INSUFFICIENT_VRAM
