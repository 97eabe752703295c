"""The openai runner against a real OpenAI-compatible engine serving the tiny Llama."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import structlog

from miner.wire.errors import ConfigError, ErrorCode, JobError
from runners import load_runner_class
from runners.base import Runner, RunnerContext
from runners.openai import OpenAIRunner
from tests.openai.conftest import Engine
from tests.openai.engine import TinyEngine
from tests.openai.helpers import make_job, make_runner

NO_EOS = {"ignore_eos": True}


def test_registry_resolves_openai_to_a_runner() -> None:
    """The registry name "openai" imports OpenAIRunner, which meets the Runner protocol."""
    cls = load_runner_class("openai")
    assert cls is OpenAIRunner
    assert isinstance(OpenAIRunner([], RunnerContext()), Runner)


def test_prompt_job_streams_real_tokens_and_reads_usage(engine: Engine, tiny_engine: TinyEngine) -> None:
    """A prompt goes to /v1/completions as a stream; text, usage, ttft and revision come back."""

    async def scenario():
        runner = make_runner(engine.base_url, extra_body=NO_EOS)
        await runner.start()
        try:
            assert runner.ready_models() == ["llama2"]
            streamed = await runner.run(make_job(max_new_tokens=8))
        finally:
            await runner.aclose()
        plain = make_runner(engine.base_url, extra_body=NO_EOS, stream=False)
        await plain.start()
        try:
            whole = await plain.run(make_job(max_new_tokens=8))
        finally:
            await plain.aclose()
        return streamed, whole

    streamed, whole = asyncio.run(scenario())
    prompt_ids = tiny_engine.tokenizer("The miner claims a job")["input_ids"]
    assert streamed.output and streamed.output == whole.output  # greedy: the same text either way
    assert (streamed.prompt_tokens, streamed.completion_tokens) == (len(prompt_ids), 8)
    assert streamed.finish_reason == "length" and streamed.device == "remote"
    assert streamed.ttft_ms is not None and streamed.ttft_ms > 0 and whole.ttft_ms is None
    assert streamed.model_revision == "tiny-llama@tiny-engine"
    assert streamed.extra["streamed"] is True and whole.extra["streamed"] is False
    first = engine.log.bodies[0]
    assert engine.log.paths[0] == "/v1/completions"
    assert first["stream"] is True and first["stream_options"] == {"include_usage": True}
    assert first["model"] == "tiny-llama" and first["temperature"] == 0.0 and first["max_tokens"] == 8


def test_chat_job_uses_chat_completions(engine: Engine) -> None:
    """Chat messages go to /v1/chat/completions unchanged and the answer's content is the output."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a GPU."}]

    async def scenario():
        runner = make_runner(engine.base_url, extra_body=NO_EOS)
        await runner.start()
        try:
            return await runner.run(make_job(messages=messages, max_new_tokens=5))
        finally:
            await runner.aclose()

    result = asyncio.run(scenario())
    assert engine.log.paths == ["/v1/chat/completions"]
    assert engine.log.bodies[0]["messages"] == messages and "prompt" not in engine.log.bodies[0]
    assert result.output and result.completion_tokens == 5 and result.prompt_tokens and result.prompt_tokens > 5


def test_job_parameters_are_mapped_capped_and_renamed(engine: Engine) -> None:
    """Sampling parameters reach the engine under its names; max_new_tokens is capped by the model's limit."""

    async def scenario():
        runner = make_runner(
            engine.base_url, max_new_tokens=6, param_names={"repetition_penalty": "repeat_penalty", "top_k": ""}
        )
        await runner.start()
        try:
            params = dict(max_new_tokens=1000, temperature=0.7, top_p=0.9, top_k=5, repetition_penalty=1.1, seed=3)
            first = await runner.run(make_job(stop=["zzz"], **params))
            second = await runner.run(make_job(stop=["zzz"], **params))
            return first, second
        finally:
            await runner.aclose()

    first, second = asyncio.run(scenario())
    body = engine.log.bodies[0]
    assert body["max_tokens"] == 6 and body["temperature"] == 0.7 and body["top_p"] == 0.9
    assert body["repeat_penalty"] == 1.1 and "repetition_penalty" not in body and "top_k" not in body
    assert body["stop"] == ["zzz"] and body["seed"] == 3 and body["n"] == 1
    assert first.output == second.output  # seeded sampling is reproducible through the engine


def test_stop_sequence_cuts_the_output(engine: Engine) -> None:
    """A stop sequence ends the answer before it, with finish_reason "stop"."""

    async def scenario():
        runner = make_runner(engine.base_url, extra_body=NO_EOS)
        await runner.start()
        try:
            full = await runner.run(make_job(max_new_tokens=12))
            stop = full.output[len(full.output) // 2 :][:3]
            cut = await runner.run(make_job(max_new_tokens=12, stop=stop))
            return full.output, stop, cut
        finally:
            await runner.aclose()

    full, stop, cut = asyncio.run(scenario())
    assert stop and cut.output == full[: full.find(stop)]
    assert cut.finish_reason == "stop"


def test_engine_without_stream_options_is_asked_again_and_chunks_counted(engine: Engine) -> None:
    """An engine refusing stream_options gets each request again without it; chunks stand in for usage."""
    engine.knobs.stream_options_supported = False

    async def scenario():
        runner = make_runner(engine.base_url, extra_body=NO_EOS)
        await runner.start()
        try:
            jobs = [runner.run(make_job(max_new_tokens=6)) for _ in range(2)]
            first, second = await asyncio.gather(*jobs)
            return first, second, await runner.run(make_job(max_new_tokens=6))
        finally:
            await runner.aclose()

    first, second, third = asyncio.run(scenario())
    sent = ["stream_options" in b for b in engine.log.bodies]
    assert sorted(sent) == [False, False, False, True, True] and sent[-1] is False  # asked once each, then never
    assert first.output == second.output == third.output and first.prompt_tokens is None
    assert first.completion_tokens is not None and 1 <= first.completion_tokens <= 6


def test_engine_that_does_not_stream_is_read_as_one_answer(engine: Engine) -> None:
    """When the engine answers a streaming request with plain JSON, the runner reads it as one answer."""
    engine.knobs.stream_supported = False

    async def scenario():
        runner = make_runner(engine.base_url, extra_body=NO_EOS)
        await runner.start()
        try:
            return await runner.run(make_job(max_new_tokens=4))
        finally:
            await runner.aclose()

    result = asyncio.run(scenario())
    assert result.output and result.completion_tokens == 4 and result.ttft_ms is None


def test_only_models_the_engine_lists_are_ready(engine: Engine) -> None:
    """ready_models() names configured models the engine lists; one warning says which are not and why."""
    from runners.base import ModelSpec

    specs = [
        ModelSpec(name="llama2", runner="openai", base_url=engine.base_url, served_model="tiny-llama"),
        ModelSpec(name="mistral", runner="openai", base_url=engine.base_url, served_model="mistral-7b"),
    ]

    async def scenario():
        runner = OpenAIRunner(specs, RunnerContext())
        with structlog.testing.capture_logs() as logs:
            await runner.start()
        try:
            return runner.ready_models(), logs
        finally:
            await runner.aclose()

    ready, logs = asyncio.run(scenario())
    assert ready == ["llama2"]
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["event"] == "engine_models_not_listed"
    assert warnings[0]["served_models"] == ["mistral-7b"] and warnings[0]["models"] == ["mistral"]


def test_api_key_is_sent_and_never_logged(engine: Engine, tmp_path: Path) -> None:
    """The key from api_key_file authorises requests; a wrong key leaves nothing ready, and no log shows it."""
    engine.knobs.api_key = "sk-right-key-123"
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("sk-right-key-123\n")
    bad.write_text("sk-wrong-key-456\n")

    async def scenario():
        ok_runner = make_runner(engine.base_url, api_key_file=str(good))
        bad_runner = make_runner(engine.base_url, api_key_file=str(bad))
        with structlog.testing.capture_logs() as logs:
            await ok_runner.start()
            await bad_runner.start()
            try:
                result = await ok_runner.run(make_job(max_new_tokens=3))
                with pytest.raises(JobError) as info:
                    await bad_runner.run(make_job(max_new_tokens=3))
                return ok_runner.ready_models(), bad_runner.ready_models(), result, info.value, logs
            finally:
                await ok_runner.aclose()
                await bad_runner.aclose()

    ok_ready, bad_ready, result, error, logs = asyncio.run(scenario())
    assert ok_ready == ["llama2"] and result.output
    assert bad_ready == [] and error.code == ErrorCode.BACKEND_UNAVAILABLE and "API key" in error.message
    assert any("refused the API key" in str(entry.get("problem")) for entry in logs)
    assert "sk-" not in repr(logs) and "sk-" not in str(error)


@pytest.mark.parametrize(
    ("options", "setting"),
    [
        ({"base_url": "ftp://engine/v1"}, "base_url"),
        ({"base_url": "http://user:secret@engine:8000/v1"}, "base_url"),
        ({"base_url": "http://engine:8000/v1?key=secret"}, "base_url"),
        ({"base_url": "http://engine/v1", "stream": "sometimes"}, "stream"),
        ({"base_url": "http://engine/v1", "param_names": {"temperature": "temp"}}, "param_names"),
        ({"base_url": "http://engine/v1", "api_key_file": "/nonexistent/key"}, "api_key_file"),
        ({"base_url": "http://engine/v1", "bogus": 1}, "bogus"),
    ],
)
def test_bad_options_fail_start_naming_the_setting(options: dict, setting: str) -> None:
    """A wrong option stops start() with a ConfigError naming models[name=...].<setting>."""
    from runners.base import ModelSpec

    runner = OpenAIRunner([ModelSpec(name="llama2", runner="openai", **options)], RunnerContext())
    with pytest.raises(ConfigError) as info:
        asyncio.run(runner.start())
    assert f"models[name='llama2'].{setting}" in str(info.value)
    assert "secret" not in str(info.value)
