"""The transformers worker never lets an exception's text (which may quote the prompt) out of the miner."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest

from miner.ops.logs import configure_logging, reset_logging
from miner.wire.errors import DeviceError, ErrorCode, JobError
from runners.hf.worker import describe_fatal, traceback_frames
from tests.transformers.helpers import job, running, spec

PROMPT = "PRIVATE-PROMPT the merger terms of ACME and Globex"


def _fail_with(tiny_model: Path, error: Exception, expected: type[Exception]) -> tuple[Exception, str]:
    """Run one job whose forward pass raises ``error``; return what ``run()`` raised and the rendered log."""
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)

    async def scenario() -> Exception:
        async with running(spec("tiny", tiny_model)) as runner:
            await runner.run(job("tiny", "warm up", max_new_tokens=1))

            def leak(module, args):
                raise error

            runner.loaded("tiny").model.register_forward_pre_hook(leak)
            with pytest.raises(expected) as info:
                await runner.run(job("tiny", PROMPT, max_new_tokens=2))
            return info.value

    try:
        raised = asyncio.run(scenario())
    finally:
        reset_logging()
    return raised, stream.getvalue()


def test_an_exception_quoting_the_prompt_stays_out_of_the_failure_and_the_log(tiny_model: Path) -> None:
    """An exception quoting the prompt fails the job with fixed text; the log has its type and frames only."""
    raised, text = _fail_with(tiny_model, ValueError(f"cannot embed {PROMPT!r}"), JobError)
    assert isinstance(raised, JobError) and raised.code == ErrorCode.RUNNER_ERROR
    assert "ValueError" in raised.message and "PRIVATE-PROMPT" not in raised.message
    assert "PRIVATE-PROMPT" not in text
    assert '"generation_failed"' in text and '"error_type": "ValueError"' in text
    assert "test_worker_privacy.py" in text  # the frames name where it was raised


def test_a_fatal_cuda_error_is_described_by_its_marker_only(tiny_model: Path) -> None:
    """A device-fatal error quoting the prompt marks the device broken by its known marker; the text never leaves."""
    error = RuntimeError(f"CUDA error: an illegal memory access was encountered while reading {PROMPT}")
    raised, text = _fail_with(tiny_model, error, DeviceError)
    assert "illegal memory access" in str(raised) and "PRIVATE-PROMPT" not in str(raised)
    assert '"device_unusable"' in text and "PRIVATE-PROMPT" not in text


def test_frames_and_fatal_description_carry_no_message() -> None:
    """traceback_frames gives file:line:function per frame; describe_fatal gives the type and the marker."""
    try:
        raise RuntimeError(f"cuda error: device-side assert triggered near {PROMPT}")
    except RuntimeError as exc:
        frames, description = traceback_frames(exc), describe_fatal(exc)
    assert len(frames) == 1 and frames[0].endswith(":test_frames_and_fatal_description_carry_no_message")
    assert description == "RuntimeError (device-side assert)"
