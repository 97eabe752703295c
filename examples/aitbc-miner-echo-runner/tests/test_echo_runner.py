"""The echo runner meets the aitbc-miner runner protocol and behaves as documented."""

from __future__ import annotations

import asyncio

import pytest
from aitbc_miner_echo_runner import EchoRunner

from miner.errors import ConfigError, ErrorCode, JobError
from runners.base import Job, ModelSpec, Runner, RunnerContext
from runners.params import parse_text_payload


def _job(payload: dict) -> Job:
    return Job(job_id="j", request=parse_text_payload({"model": "echo-model", **payload}))


async def _started(**options: object) -> EchoRunner:
    runner = EchoRunner([ModelSpec(name="echo-model", runner="echo", **options)], RunnerContext())
    await runner.start()
    return runner


def test_is_a_runner() -> None:
    """EchoRunner satisfies the Runner protocol."""
    assert isinstance(EchoRunner([], RunnerContext()), Runner)


def test_reverse_mode_and_word_limit() -> None:
    """mode = "reverse" reverses the prompt; max_new_tokens limits the words."""

    async def scenario():
        runner = await _started(mode="reverse")
        return await runner.run(_job({"prompt": "abc def ghi", "parameters": {"max_new_tokens": 2}}))

    result = asyncio.run(scenario())
    assert result.output == "ihg fed" and result.finish_reason == "length"


def test_chat_input_uses_the_last_message() -> None:
    """For chat input the last message is echoed."""

    async def scenario():
        runner = await _started()
        messages = [{"role": "system", "content": "x"}, {"role": "user", "content": "hello there"}]
        return await runner.run(_job({"messages": messages}))

    assert asyncio.run(scenario()).output == "hello there"


def test_cancel_stops_a_slow_job() -> None:
    """A cancelled job ends with CANCELLED."""

    async def scenario():
        runner = await _started(delay_s=60)
        job = _job({"prompt": "slow"})
        job.cancel()
        with pytest.raises(JobError) as info:
            await runner.run(job)
        return info.value.code

    assert asyncio.run(scenario()) == ErrorCode.CANCELLED


def test_bad_option_names_the_setting() -> None:
    """An unknown mode stops start() with a ConfigError naming the option."""
    with pytest.raises(ConfigError, match=r"models\[name='echo-model'\]\.mode"):
        asyncio.run(_started(mode="shout"))
