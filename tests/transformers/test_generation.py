"""Generation through the transformers runner on a tiny random Llama (CPU)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from miner.wire.errors import ErrorCode, JobError
from tests.transformers.helpers import job, running, spec

PROMPTS = [
    "hello world",
    "The miner claims a job from the coordinator, runs it on a local GPU and",
    "x",
    "def generate(prompt, max_new_tokens=64):",
    "Numbers 0 1 2 3 4 5",
]


def raw_greedy(runner, name: str, prompt: str, max_new: int) -> str:
    """Greedy text straight from ``model.generate`` on the runner's own loaded model."""
    loaded = runner.loaded(name)
    tok = loaded.tokenizer
    ids = tok(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = loaded.model.generate(**ids, max_new_tokens=max_new, do_sample=False, pad_token_id=loaded.pad_id)
    new = [t for t in out[0, ids["input_ids"].shape[1] :].tolist() if t not in loaded.eos_ids and t != loaded.pad_id]
    return tok.decode(new, skip_special_tokens=True)


def test_load_and_generate_reports_metrics(tiny_model: Path) -> None:
    """A preloaded model serves a prompt and the result carries tokens, timing, revision and device."""

    async def scenario():
        async with running(spec("tiny", tiny_model, max_new_tokens=12)) as runner:
            assert runner.ready_models() == ["tiny"]
            n_prompt = len(runner.loaded("tiny").tokenizer("hello world")["input_ids"])
            return n_prompt, await runner.run(job("tiny", "hello world"))

    n_prompt, result = asyncio.run(scenario())
    assert result.finish_reason in ("length", "stop")
    assert 0 < result.completion_tokens <= 12
    assert result.prompt_tokens == n_prompt
    assert result.model_revision.startswith("local-")
    assert result.device == "cpu" and result.gpu_uuid is None
    assert result.ttft_ms > 0 and result.gpu_seconds > 0
    assert result.extra["tokens_per_s"] > 0 and result.extra["batch_size"] == 1


def test_greedy_output_is_reproducible_and_matches_raw_generate(tiny_model: Path) -> None:
    """Greedy decoding gives the same text twice, equal to plain model.generate's output."""

    async def scenario():
        async with running(spec("tiny", tiny_model)) as runner:
            first = await runner.run(job("tiny", PROMPTS[1], max_new_tokens=20))
            second = await runner.run(job("tiny", PROMPTS[1], max_new_tokens=20, temperature=0))
            return first, second, raw_greedy(runner, "tiny", PROMPTS[1], 20)

    first, second, raw = asyncio.run(scenario())
    assert first.output == second.output == raw
    assert first.completion_tokens == 20 and first.finish_reason == "length"


def test_batched_equals_unbatched_under_greedy(tiny_model: Path) -> None:
    """Prompts of different lengths give token-for-token the same output batched as one by one."""

    async def scenario():
        options = {"max_batch_size": 8, "batch_wait_ms": 200, "batch_window_ms": 1000}
        async with running(spec("tiny", tiny_model, **options)) as runner:
            alone = [await runner.run(job("tiny", p, max_new_tokens=24)) for p in PROMPTS]
            together = await asyncio.gather(*(runner.run(job("tiny", p, max_new_tokens=24)) for p in PROMPTS))
            return alone, together

    alone, together = asyncio.run(scenario())
    assert [r.extra["batch_size"] for r in alone] == [1] * len(PROMPTS)
    assert [r.extra["batch_size"] for r in together] == [len(PROMPTS)] * len(PROMPTS)
    assert [r.output for r in together] == [r.output for r in alone]
    assert [r.completion_tokens for r in together] == [r.completion_tokens for r in alone]


def test_jobs_with_different_lengths_share_a_batch(tiny_model: Path) -> None:
    """Each row of a batch stops at its own max_new_tokens and keeps its own text."""

    async def scenario():
        options = {"batch_wait_ms": 200, "batch_window_ms": 1000}
        async with running(spec("tiny", tiny_model, **options)) as runner:
            short_alone = await runner.run(job("tiny", PROMPTS[0], max_new_tokens=3))
            short, long = await asyncio.gather(
                runner.run(job("tiny", PROMPTS[0], max_new_tokens=3)),
                runner.run(job("tiny", PROMPTS[1], max_new_tokens=30)),
            )
            return short_alone, short, long

    short_alone, short, long = asyncio.run(scenario())
    assert short.extra["batch_size"] == 2
    assert short.completion_tokens == 3 and long.completion_tokens == 30
    assert short.output == short_alone.output


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(tiny_model: Path) -> None:
    """A seed fixes a sampled output, also when the job shares a batch; another seed changes it."""
    params = {"temperature": 1.0, "top_p": 0.95, "top_k": 50, "max_new_tokens": 24}

    async def scenario():
        options = {"batch_wait_ms": 200, "batch_window_ms": 1000}
        async with running(spec("tiny", tiny_model, **options)) as runner:
            a = await runner.run(job("tiny", PROMPTS[3], seed=7, **params))
            b = await runner.run(job("tiny", PROMPTS[3], seed=7, **params))
            c = await runner.run(job("tiny", PROMPTS[3], seed=8, **params))
            batched = await asyncio.gather(
                runner.run(job("tiny", PROMPTS[3], seed=7, **params)),
                runner.run(job("tiny", PROMPTS[0], seed=99, **params)),
                runner.run(job("tiny", PROMPTS[1], **params)),
            )
            return a, b, c, batched

    a, b, c, batched = asyncio.run(scenario())
    assert a.output == b.output
    assert a.output != c.output
    assert batched[0].extra["batch_size"] == 3
    assert batched[0].output == a.output


def test_stop_string_cuts_the_output(tiny_model: Path) -> None:
    """A stop sequence taken from the greedy output ends the text just before it, finish_reason stop."""

    async def scenario():
        async with running(spec("tiny", tiny_model)) as runner:
            full = await runner.run(job("tiny", PROMPTS[1], max_new_tokens=30))
            text = full.output
            stop = text[len(text) // 2 : len(text) // 2 + 3]
            cut = await runner.run(job("tiny", PROMPTS[1], max_new_tokens=30, stop=[stop]))
            return full, stop, cut

    full, stop, cut = asyncio.run(scenario())
    assert stop and cut.finish_reason == "stop"
    assert cut.output == full.output[: full.output.find(stop)]
    assert cut.completion_tokens < full.completion_tokens


def test_chat_messages_use_the_chat_template(tiny_model: Path) -> None:
    """Chat messages are rendered with the tokenizer's template and answered like the same prompt text."""
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]

    async def scenario():
        async with running(spec("tiny", tiny_model)) as runner:
            chat = await runner.run(job("tiny", messages=messages, max_new_tokens=10))
            tok = runner.loaded("tiny").tokenizer
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            n = len(tok(text, add_special_tokens=False)["input_ids"])
            return chat, text, n

    chat, text, n = asyncio.run(scenario())
    assert text.startswith("<s><|system|>\nbe brief</s>") and text.endswith("<|assistant|>\n")
    assert chat.prompt_tokens == n


def test_chat_without_a_template_is_an_invalid_payload(model_copy) -> None:
    """A model whose tokenizer has no chat template refuses messages with INVALID_PAYLOAD."""
    folder = model_copy("plain", drop=("chat_template.jinja",))

    async def scenario():
        async with running(spec("plain", folder)) as runner:
            with pytest.raises(JobError) as info:
                await runner.run(job("plain", messages=[{"role": "user", "content": "hi"}]))
            ok = await runner.run(job("plain", "hi", max_new_tokens=2))
            return info.value, ok

    error, ok = asyncio.run(scenario())
    assert error.code == ErrorCode.INVALID_PAYLOAD and "no chat template" in error.message
    assert ok.completion_tokens == 2


def test_too_long_prompt_is_invalid_parameters(tiny_model: Path) -> None:
    """A prompt over max_prompt_tokens fails INVALID_PARAMETERS naming the field, and others go on."""

    async def scenario():
        async with running(spec("tiny", tiny_model, max_prompt_tokens=8)) as runner:
            with pytest.raises(JobError) as info:
                await runner.run(job("tiny", PROMPTS[1]))
            ok = await runner.run(job("tiny", "hi", max_new_tokens=2))
            return info.value, ok

    error, ok = asyncio.run(scenario())
    assert error.code == ErrorCode.INVALID_PARAMETERS
    assert error.message.startswith("prompt:") and "max_prompt_tokens=8" in error.message
    assert ok.completion_tokens == 2


def test_max_new_tokens_is_clamped_to_the_model_cap(tiny_model: Path) -> None:
    """A job asking for more new tokens than the model's cap gets the cap."""

    async def scenario():
        async with running(spec("tiny", tiny_model, max_new_tokens=5)) as runner:
            return await runner.run(job("tiny", "hello", max_tokens=500))

    result = asyncio.run(scenario())
    assert result.completion_tokens == 5 and result.finish_reason == "length"


def test_unknown_model_is_not_served(tiny_model: Path) -> None:
    """A job for a model this runner does not serve fails MODEL_NOT_SERVED."""

    async def scenario():
        async with running(spec("tiny", tiny_model)) as runner:
            with pytest.raises(JobError) as info:
                await runner.run(job("llama2", "hi"))
            return info.value

    assert asyncio.run(scenario()).code == ErrorCode.MODEL_NOT_SERVED


def test_late_joiner_restarts_a_young_batch(tiny_model: Path) -> None:
    """A job arriving early in a running batch joins it (the batch restarts) and outputs stay unbatched-equal."""

    async def scenario():
        async with running(spec("tiny", tiny_model, max_new_tokens=800, batch_wait_ms=0)) as runner:
            alone = await runner.run(job("tiny", PROMPTS[1], max_new_tokens=800))
            first = asyncio.create_task(runner.run(job("tiny", PROMPTS[1], max_new_tokens=800)))
            await asyncio.sleep(0.02)
            second = await runner.run(job("tiny", PROMPTS[0], max_new_tokens=20))
            return alone, await first, second

    alone, first, second = asyncio.run(scenario())
    assert alone.extra["batch_size"] == 1
    assert first.extra["batch_size"] == second.extra["batch_size"] == 2
    assert first.output == alone.output and second.completion_tokens == 20
