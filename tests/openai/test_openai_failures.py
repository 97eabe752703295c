"""The openai runner when the engine misbehaves: down, slow, failing, dropping, cancelled."""

from __future__ import annotations

import asyncio

import pytest
import structlog

from miner.wire.errors import ErrorCode, JobError
from runners.openai import OpenAIRunner
from tests.openai.conftest import Engine
from tests.openai.helpers import make_job, make_runner, wait_until

NO_EOS = {"ignore_eos": True}
SECRET_PROMPT = "my private prompt about the quarterly numbers of ACME corp"


async def _failure(runner: OpenAIRunner, **job_kwargs) -> JobError:
    await runner.start()
    try:
        with pytest.raises(JobError) as info:
            await runner.run(make_job(**job_kwargs))
        return info.value
    finally:
        await runner.aclose()


def test_engine_down_at_start_is_not_fatal(free_port_url: str) -> None:
    """With the engine down, start() succeeds, nothing is ready, one line says so, and jobs fail BACKEND_UNAVAILABLE."""

    async def scenario():
        runner = make_runner(free_port_url)
        with structlog.testing.capture_logs() as logs:
            await runner.start()
        try:
            ready = runner.ready_models()
            with pytest.raises(JobError) as info:
                await runner.run(make_job())
            return ready, info.value, logs
        finally:
            await runner.aclose()

    ready, error, logs = asyncio.run(scenario())
    assert ready == []
    assert [e["event"] for e in logs] == ["engines_checking", "engine_unavailable"]  # the wait, then one line
    assert logs[1]["log_level"] == "warning" and "not reachable" in logs[1]["problem"]
    assert logs[1]["models"] == ["llama2"]
    assert error.code == ErrorCode.BACKEND_UNAVAILABLE and "is it running?" in error.message


def test_engine_going_away_and_coming_back_is_followed(engine: Engine) -> None:
    """An engine restart takes the model out of ready_models() and puts it back, without crashing the runner."""

    async def scenario():
        runner = make_runner(engine.base_url, recheck_interval_s=0.05, extra_body=NO_EOS)
        await runner.start()
        try:
            assert runner.ready_models() == ["llama2"]
            engine.stop()
            gone = await wait_until(lambda: runner.ready_models() == [])
            with pytest.raises(JobError) as info:
                await runner.run(make_job(max_new_tokens=3))
            engine.restart()
            back = await wait_until(lambda: runner.ready_models() == ["llama2"])
            result = await runner.run(make_job(max_new_tokens=3))
            return gone, info.value, back, result
        finally:
            await runner.aclose()

    gone, error, back, result = asyncio.run(scenario())
    assert gone and back
    assert error.code == ErrorCode.BACKEND_UNAVAILABLE
    assert result.completion_tokens == 3


def test_failed_connection_unadvertises_at_once(engine: Engine) -> None:
    """A job that finds the engine gone removes its models from ready_models() before the next re-check."""

    async def scenario():
        runner = make_runner(engine.base_url, recheck_interval_s=3600)
        await runner.start()
        try:
            engine.stop()
            with pytest.raises(JobError):
                await runner.run(make_job(max_new_tokens=3))
            return runner.ready_models()
        finally:
            await runner.aclose()

    assert asyncio.run(scenario()) == []


def test_model_dropped_by_the_engine_fails_model_not_served(engine: Engine) -> None:
    """An engine that no longer serves the model answers 404: MODEL_NOT_SERVED, and it stops being advertised."""

    async def scenario():
        runner = make_runner(engine.base_url, recheck_interval_s=3600)
        await runner.start()
        try:
            assert runner.ready_models() == ["llama2"]
            engine.knobs.models = ["another-model"]
            with pytest.raises(JobError) as info:
                await runner.run(make_job(max_new_tokens=3))
            return info.value, runner.ready_models()
        finally:
            await runner.aclose()

    error, ready = asyncio.run(scenario())
    assert error.code == ErrorCode.MODEL_NOT_SERVED and "'tiny-llama'" in error.message
    assert ready == []


def test_slow_engine_hits_the_job_deadline(engine: Engine) -> None:
    """An engine slower than the job's deadline fails the job DEADLINE_EXCEEDED and the request is closed."""
    engine.knobs.delay_s = 60
    error = asyncio.run(_failure(make_runner(engine.base_url), deadline_in=0.3))
    assert error.code == ErrorCode.DEADLINE_EXCEEDED
    assert engine.log.disconnected.wait(5)  # the request was abandoned, not left running


def test_slow_engine_hits_timeout_s(engine: Engine) -> None:
    """Without a job deadline, the model's timeout_s bounds the wait: BACKEND_UNAVAILABLE naming timeout_s."""
    engine.knobs.delay_s = 60
    error = asyncio.run(_failure(make_runner(engine.base_url, timeout_s=0.3)))
    assert error.code == ErrorCode.BACKEND_UNAVAILABLE and "timeout_s=0.3" in error.message


def test_engine_500_is_backend_unavailable(engine: Engine) -> None:
    """An HTTP 500 from the engine fails the job BACKEND_UNAVAILABLE with the engine's message."""
    engine.knobs.fail_status = 500
    engine.knobs.fail_body = {"error": {"message": "CUDA error: an illegal memory access", "type": "InternalError"}}
    error = asyncio.run(_failure(make_runner(engine.base_url)))
    assert error.code == ErrorCode.BACKEND_UNAVAILABLE
    assert "HTTP 500" in error.message and "illegal memory access" in error.message


def test_context_too_long_is_invalid_parameters(engine: Engine) -> None:
    """The engine's context-length refusal fails the job INVALID_PARAMETERS without quoting the prompt."""
    engine.knobs.max_model_len = 24
    error = asyncio.run(_failure(make_runner(engine.base_url), prompt=SECRET_PROMPT, max_new_tokens=16))
    assert error.code == ErrorCode.INVALID_PARAMETERS and "context length" in error.message
    assert "ACME" not in error.message


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (422, {"detail": [{"loc": ["body", "prompt"], "msg": "too odd", "input": SECRET_PROMPT}]}),
        (400, {"error": {"message": f"cannot handle prompt '{SECRET_PROMPT}'"}}),
        (400, {"message": f"bad: {SECRET_PROMPT[10:40]}"}),
    ],
)
def test_engine_messages_never_quote_the_prompt(engine: Engine, status: int, body: dict) -> None:
    """An engine refusal that echoes the input is reported without the prompt text."""
    engine.knobs.fail_status, engine.knobs.fail_body = status, body
    error = asyncio.run(_failure(make_runner(engine.base_url), prompt=SECRET_PROMPT))
    assert error.code == ErrorCode.INVALID_PARAMETERS
    assert "ACME" not in str(error) and "quarterly" not in str(error)


def test_connection_dropped_mid_stream_is_backend_unavailable(engine: Engine) -> None:
    """An engine that drops the connection mid-stream fails the job BACKEND_UNAVAILABLE."""
    engine.knobs.drop_after_chunks = 2
    error = asyncio.run(_failure(make_runner(engine.base_url, extra_body=NO_EOS), max_new_tokens=20))
    assert error.code == ErrorCode.BACKEND_UNAVAILABLE and "mid-answer" in error.message


def test_malformed_answer_is_runner_error(engine: Engine) -> None:
    """An answer that is not an OpenAI completion fails the job RUNNER_ERROR."""
    engine.knobs.fail_status, engine.knobs.fail_body = 200, {"result": "something else"}
    error = asyncio.run(_failure(make_runner(engine.base_url)))
    assert error.code == ErrorCode.RUNNER_ERROR and "malformed" in error.message


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_stopping_mid_stream_closes_it_and_the_engine_stops(engine: Engine, how: str) -> None:
    """A job cancelled (or past its deadline) mid-stream fails at once and the engine sees the connection close."""
    engine.knobs.token_delay_s = 0.05

    async def scenario():
        runner = make_runner(engine.base_url, extra_body=NO_EOS)
        await runner.start()
        try:
            job = make_job(max_new_tokens=200, deadline_in=None if how == "cancel" else 0.5)
            task = asyncio.create_task(runner.run(job))
            assert await asyncio.to_thread(engine.log.first_token_sent.wait, 10)
            if how == "cancel":
                job.cancel()
            with pytest.raises(JobError) as info:
                await task
            return info.value
        finally:
            await runner.aclose()

    error = asyncio.run(scenario())
    assert error.code == (ErrorCode.CANCELLED if how == "cancel" else ErrorCode.DEADLINE_EXCEEDED)
    assert engine.log.disconnected.wait(10)
    assert engine.log.generation_ended.wait(10)
    reason, generated = engine.log.finished[-1]
    assert reason == "abort" and generated < 200


def test_closed_runner_advertises_nothing_and_refuses_jobs(engine: Engine) -> None:
    """After aclose() the runner advertises no model and a job fails RUNNER_ERROR."""

    async def scenario():
        runner = make_runner(engine.base_url)
        await runner.start()
        await runner.aclose()
        with pytest.raises(JobError) as info:
            await runner.run(make_job())
        return runner.ready_models(), info.value

    ready, error = asyncio.run(scenario())
    assert ready == [] and error.code == ErrorCode.RUNNER_ERROR
