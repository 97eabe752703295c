"""The fake runner: deterministic output, failure modes, cancellation, and the registry."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from miner.wire.errors import ConfigError, ErrorCode, JobError
from runners import load_runner_class, runner_status
from runners.base import Job, ModelSpec, Runner, RunnerContext
from runners.fake import FakeRunner
from runners.params import parse_text_payload


def _job(prompt: str, model: str = "llama2", **params: object) -> Job:
    return Job(job_id="j", request=parse_text_payload({"model": model, "prompt": prompt, "parameters": params}))


async def _runner(**options: object) -> FakeRunner:
    runner = FakeRunner([ModelSpec(name="llama2", runner="fake", delay_s=0.0, **options)], RunnerContext())
    await runner.start()
    return runner


def test_fake_runner_meets_the_runner_protocol() -> None:
    """The registry resolves "fake" to a class that satisfies the Runner protocol."""
    cls = load_runner_class("fake")
    assert cls is FakeRunner
    assert isinstance(FakeRunner([], RunnerContext()), Runner)


def test_output_is_deterministic_and_respects_max_tokens_and_seed() -> None:
    """Same inputs give the same text; max_new_tokens bounds it; seed changes it."""

    async def scenario() -> tuple[str, str, str, int]:
        runner = await _runner()
        a = await runner.run(_job("hello", max_new_tokens=5))
        b = await runner.run(_job("hello", max_new_tokens=5))
        c = await runner.run(_job("hello", max_new_tokens=5, seed=7))
        return a.output, b.output, c.output, a.completion_tokens or 0

    a, b, c, tokens = asyncio.run(scenario())
    assert a == b and a != c and tokens == 5


@pytest.mark.parametrize(("mode", "code"), [("error", ErrorCode.RUNNER_ERROR), ("oom", ErrorCode.OUT_OF_MEMORY)])
def test_failure_modes_apply_only_to_marked_prompts(mode: str, code: str) -> None:
    """fail_mode with fail_marker fails marked prompts with its code and serves the rest."""

    async def scenario() -> None:
        runner = await _runner(fail_mode=mode, fail_marker="BOOM")
        assert (await runner.run(_job("fine"))).output
        with pytest.raises(JobError) as info:
            await runner.run(_job("please BOOM"))
        assert info.value.code == code

    asyncio.run(scenario())


def test_hanging_job_stops_on_cancel() -> None:
    """A job in fail_mode=hang ends with CANCELLED soon after its cancel flag is set."""

    async def scenario() -> None:
        runner = await _runner(fail_mode="hang")
        job = _job("x")
        task = asyncio.create_task(runner.run(job))
        await asyncio.sleep(0.1)
        assert not task.done()
        job.cancel()
        with pytest.raises(JobError) as info:
            await asyncio.wait_for(task, 2)
        assert info.value.code == ErrorCode.CANCELLED

    asyncio.run(scenario())


def test_deadline_stops_a_job() -> None:
    """A job past its deadline ends with DEADLINE_EXCEEDED."""

    async def scenario() -> None:
        runner = await _runner(fail_mode="hang")
        job = _job("x")
        job.deadline = time.monotonic() + 0.1
        with pytest.raises(JobError) as info:
            await asyncio.wait_for(runner.run(job), 2)
        assert info.value.code == ErrorCode.DEADLINE_EXCEEDED

    asyncio.run(scenario())


def test_bad_runner_option_is_a_one_line_config_error() -> None:
    """An unknown or invalid option names the model and the option."""

    async def scenario() -> None:
        runner = FakeRunner([ModelSpec(name="llama2", runner="fake", delay_s=-1)], RunnerContext())
        with pytest.raises(ConfigError, match=r"models\[name='llama2'\]\.delay_s"):
            await runner.start()

    asyncio.run(scenario())


def test_unknown_runner_lists_the_known_ones() -> None:
    """Naming a runner that does not exist stops start-up with the list of runners."""
    with pytest.raises(ConfigError, match="known runners: .*fake"):
        load_runner_class("nope")


def test_core_and_fake_runner_never_import_torch() -> None:
    """Loading the fake runner and the runner status check leave torch unimported."""
    import subprocess

    code = (
        "import sys, runners, runners.fake, miner.daemon.settings, miner.wire.receipts, miner.wire.protocol\n"
        "runners.runner_status()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert runner_status()["fake"] == "available"
