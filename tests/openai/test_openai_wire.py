"""The OpenAI wire format: server-sent events, engine error bodies, finish reasons."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from miner.wire.errors import ErrorCode, JobError
from runners.openai_wire import Generation, engine_error, finish_reason, fold_chunk, iter_sse_data


def test_sse_reader_handles_comments_event_lines_multiline_data_and_crlf() -> None:
    """Only data fields are yielded, multi-line data is joined, and a last event without a blank line counts."""
    raw = b": keep-alive\r\nevent: message\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\nid: 7\ndata:[DONE]"

    async def collect() -> list[str]:
        return [payload async for payload in iter_sse_data(httpx.Response(200, content=raw))]

    assert asyncio.run(collect()) == ['{"a":\n1}', "[DONE]"]


@pytest.mark.parametrize(
    ("status", "body", "code", "words"),
    [
        (404, b'{"error": {"message": "The model `x` does not exist."}}', ErrorCode.MODEL_NOT_SERVED, "does not serve"),
        (400, b'{"object": "error", "message": "maximum context length is 4096 tokens"}',
         ErrorCode.INVALID_PARAMETERS, "context length"),
        (422, b'{"error": "Input validation error: `stop` supports up to 4 stop sequences", "error_type": "validation"}',
         ErrorCode.INVALID_PARAMETERS, "up to 4 stop"),
        (401, b'{"error": "invalid key sk-abc"}', ErrorCode.BACKEND_UNAVAILABLE, "API key"),
        (503, b"<html>Service Unavailable</html>", ErrorCode.BACKEND_UNAVAILABLE, "HTTP 503"),
        (429, b"", ErrorCode.BACKEND_UNAVAILABLE, "HTTP 429"),
        (307, b"", ErrorCode.BACKEND_UNAVAILABLE, "redirect"),
    ],
)  # fmt: skip
def test_engine_error_bodies_map_to_job_codes(status: int, body: bytes, code: str, words: str) -> None:
    """Each engine refusal shape (vLLM, TGI, llama.cpp, plain text) maps to its job error code."""
    error = engine_error(status, body, base_url="http://e/v1", served_model="m", inputs=["hello"])
    assert error.code == code and words in error.message
    assert "sk-abc" not in error.message  # a 401 body is never repeated


@pytest.mark.parametrize(("raw", "expected"), [("stop", "stop"), ("eos_token", "stop"), ("length", "length"), (None, "stop")])
def test_finish_reasons_are_normalised(raw: str | None, expected: str) -> None:
    """Engine-specific finish reasons become "stop" or "length"."""
    assert finish_reason(raw, stop_cut=False) == expected


def test_aborted_generation_and_in_stream_errors_fail_the_job() -> None:
    """finish_reason "abort" and an error event inside a stream are BACKEND_UNAVAILABLE."""
    with pytest.raises(JobError) as aborted:
        finish_reason("abort", stop_cut=False)
    with pytest.raises(JobError) as in_stream:
        fold_chunk(Generation(), '{"error": {"message": "engine overloaded"}}', chat=False)
    assert aborted.value.code == in_stream.value.code == ErrorCode.BACKEND_UNAVAILABLE
    assert "engine overloaded" in in_stream.value.message


def test_in_stream_error_quoting_the_prompt_is_withheld() -> None:
    """An error event that repeats the job's input is reported without it."""
    prompt = "the confidential launch plan for project nightingale"
    with pytest.raises(JobError) as info:
        event = f'{{"error": {{"message": "cannot tokenize: {prompt[4:40]}"}}}}'
        fold_chunk(Generation(), event, chat=False, inputs=[prompt])
    assert "nightingale" not in str(info.value) and "confidential" not in str(info.value)
    assert "withheld" in info.value.message
