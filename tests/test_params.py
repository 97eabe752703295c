"""Job payload and parameter validation: clear codes naming the field."""

from __future__ import annotations

import pytest

from miner.wire.errors import ErrorCode, JobError
from runners.params import apply_stop, parse_text_payload


def test_prompt_payload_with_openai_style_parameters() -> None:
    """max_tokens is an alias of max_new_tokens; temperature 0 is greedy; stop may be a string."""
    req = parse_text_payload(
        {
            "model": "llama2",
            "prompt": "hi",
            "parameters": {"max_tokens": 8, "temperature": 0, "stop": "\n", "unknown": 1},
        }
    )
    assert req.params.max_new_tokens == 8 and req.params.greedy and req.params.stop == ("\n",)


def test_chat_payload_is_parsed() -> None:
    """messages with roles and string contents are accepted."""
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    req = parse_text_payload({"model": "m", "messages": messages})
    assert req.prompt is None and req.messages is not None and len(req.messages) == 2


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_tokens": "ten"}, "max_tokens"),
        ({"max_new_tokens": True}, "max_new_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"stop": [1]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"seed": -5}, "seed"),
    ],
)
def test_bad_parameter_fails_with_invalid_parameters_naming_it(params: dict, field: str) -> None:
    """Each known parameter of the wrong type or out of range names itself."""
    with pytest.raises(JobError) as info:
        parse_text_payload({"model": "m", "prompt": "p", "parameters": params})
    assert info.value.code == ErrorCode.INVALID_PARAMETERS and field in info.value.message


@pytest.mark.parametrize(
    "payload",
    [
        None,
        [],
        {"prompt": "p"},
        {"model": "", "prompt": "p"},
        {"model": "m"},
        {"model": "m", "prompt": "p", "messages": [{"role": "user", "content": "x"}]},
        {"model": "m", "prompt": 5},
        {"model": "m", "messages": []},
        {"model": "m", "messages": [{"role": "wizard", "content": "x"}]},
        {"model": "m", "messages": [{"role": "user", "content": {"nested": 1}}]},
    ],
)
def test_malformed_payload_fails_with_invalid_payload(payload: object) -> None:
    """A payload of the wrong shape fails as INVALID_PAYLOAD, never as a crash."""
    with pytest.raises(JobError) as info:
        parse_text_payload(payload)
    assert info.value.code == ErrorCode.INVALID_PAYLOAD


def test_apply_stop_cuts_at_the_earliest_sequence() -> None:
    """The earliest of several stop sequences wins."""
    assert apply_stop("one two. three\nfour", ("\n", ".")) == ("one two", True)
    assert apply_stop("no stop here", ("###",)) == ("no stop here", False)
