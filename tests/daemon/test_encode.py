"""A runner's answer is checked once and its result body encoded once: every bad answer is a clean JobError."""

from __future__ import annotations

import json
from typing import Any

import pytest

from miner.daemon.encode import DEFAULT_MAX_RESULT_BYTES, MAX_EXTRA_DEPTH, check_run_result, encode_body
from miner.wire.errors import ErrorCode, JobError
from runners.base import RunResult

SECRET = "do-not-quote-me"


class Explosive:
    """A runner-provided object every one of whose dunders raises."""

    def __str__(self) -> str:
        raise RuntimeError(SECRET)

    def __repr__(self) -> str:
        raise RuntimeError(SECRET)

    def __format__(self, spec: str) -> str:
        raise RuntimeError(SECRET)

    def __eq__(self, other: object) -> bool:
        raise RuntimeError(SECRET)

    def __hash__(self) -> int:
        raise RuntimeError(SECRET)

    def __bool__(self) -> bool:
        raise RuntimeError(SECRET)


class SneakyStr(str):
    """A str subclass that passes ``isinstance(x, str)`` but runs code when printed."""

    def __str__(self) -> str:
        raise RuntimeError(SECRET)


class ProxyClass:
    """An object that claims to be a RunResult through ``__class__``."""

    @property
    def __class__(self) -> type:  # type: ignore[override]
        return RunResult


def result(**fields: Any) -> RunResult:
    base: dict[str, Any] = {"output": "hello", "finish_reason": "stop"}
    return RunResult(**{**base, **fields})


def invalid(answer: object) -> JobError:
    with pytest.raises(JobError) as info:
        check_run_result(answer)
    return info.value


def assert_clean(error: JobError, code: str, *names: str) -> None:
    """The error has ``code``, names every one of ``names``, and quotes nothing of the value."""
    assert error.code == code
    for name in names:
        assert name in error.message, error.message
    assert SECRET not in error.message and SECRET not in str(error)
    assert "\n" not in error.message
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)  # nothing chained


def test_a_good_result_comes_back_as_an_equal_fresh_copy() -> None:
    """A valid RunResult is returned equal but as a new object whose extra is not the runner's dict."""
    extra = {"scores": [1, 2.5, None, True, {"nested": "ok"}], "é": "ünïcode"}
    given = result(
        prompt_tokens=3,
        completion_tokens=0,
        ttft_ms=1.5,
        gpu_seconds=0,
        model_revision="abc",
        gpu_uuid="GPU-1",
        device="cuda:0",
        extra=extra,
    )
    checked = check_run_result(given)
    assert checked == given and checked is not given
    assert checked.extra is not extra and checked.extra["scores"][4] is not extra["scores"][4]
    assert type(checked.gpu_seconds) is float


def test_none_instead_of_a_result_is_invalid() -> None:
    """A runner returning None fails with RESULT_INVALID saying so."""
    assert_clean(invalid(None), ErrorCode.RESULT_INVALID, "None", "RunResult")


def test_a_dict_instead_of_a_result_is_invalid() -> None:
    """A dict shaped like a result is not a RunResult: RESULT_INVALID naming the type dict."""
    assert_clean(invalid({"output": SECRET, "finish_reason": "stop"}), ErrorCode.RESULT_INVALID, "dict")


def test_an_object_claiming_to_be_a_result_through_class_is_invalid() -> None:
    """An object whose __class__ lies is judged by its real type and refused."""
    assert_clean(invalid(ProxyClass()), ErrorCode.RESULT_INVALID, "ProxyClass", "not a RunResult")


def test_bytes_output_is_invalid() -> None:
    """Bytes as output name RunResult.output and the type bytes, not the bytes."""
    assert_clean(invalid(result(output=SECRET.encode())), ErrorCode.RESULT_INVALID, "RunResult.output", "bytes")


def test_an_explosive_object_as_output_is_invalid_without_calling_it() -> None:
    """An output whose __str__/__repr__/__eq__/__hash__ raise still gives a clean error naming the type."""
    assert_clean(invalid(result(output=Explosive())), ErrorCode.RESULT_INVALID, "RunResult.output", "Explosive")


def test_a_str_subclass_as_output_is_invalid() -> None:
    """Only an exact str is an output: a subclass that could run code is refused."""
    assert_clean(invalid(result(output=SneakyStr(SECRET))), ErrorCode.RESULT_INVALID, "SneakyStr")


def test_an_explosive_object_in_extra_is_invalid_without_calling_it() -> None:
    """An explosive object inside extra is named by its path and type."""
    error = invalid(result(extra={"detail": [1, Explosive()]}))
    assert_clean(error, ErrorCode.RESULT_INVALID, "RunResult.extra['detail'][1]", "Explosive")


def test_an_explosive_key_in_extra_is_invalid_without_hashing_it() -> None:
    """A non-str key is refused by type (named by position), never hashed or printed."""
    extra: dict[Any, Any] = {"ok": 1}
    extra[(SECRET,)] = 2  # a tuple key: hashable, but not a JSON key
    assert_clean(invalid(result(extra=extra)), ErrorCode.RESULT_INVALID, "[key #1]", "tuple", "str")


def test_a_set_in_extra_is_invalid() -> None:
    """A set inside extra is RESULT_INVALID naming the path and the type set."""
    error = invalid(result(extra={"tags": {SECRET}}))
    assert_clean(error, ErrorCode.RESULT_INVALID, "RunResult.extra['tags']", "set")


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_infinity_in_extra_are_invalid(number: float) -> None:
    """NaN and infinities have no JSON form: RESULT_INVALID naming where they are."""
    error = invalid(result(extra={"stats": {"mean": number}}))
    assert_clean(error, ErrorCode.RESULT_INVALID, "RunResult.extra['stats']['mean']", "NaN or infinite")


@pytest.mark.parametrize("field", ["ttft_ms", "gpu_seconds"])
@pytest.mark.parametrize("number", [float("nan"), float("inf"), -1.0])
def test_timings_must_be_finite_and_not_negative(field: str, number: float) -> None:
    """ttft_ms and gpu_seconds that are NaN, infinite or negative are RESULT_INVALID naming the field."""
    assert_clean(invalid(result(**{field: number})), ErrorCode.RESULT_INVALID, f"RunResult.{field}")


def test_a_string_as_a_timing_is_invalid() -> None:
    """A str in ttft_ms names the field and the type str."""
    assert_clean(invalid(result(ttft_ms=SECRET)), ErrorCode.RESULT_INVALID, "RunResult.ttft_ms", "str")


def test_a_bool_as_completion_tokens_is_invalid() -> None:
    """True is not a token count: RESULT_INVALID naming completion_tokens and bool."""
    error = invalid(result(completion_tokens=True))
    assert_clean(error, ErrorCode.RESULT_INVALID, "RunResult.completion_tokens", "bool")


@pytest.mark.parametrize("count", [-1, 1 << 64])
def test_token_counts_must_be_in_range(count: int) -> None:
    """A negative or oversized prompt_tokens is RESULT_INVALID naming the field."""
    assert_clean(invalid(result(prompt_tokens=count)), ErrorCode.RESULT_INVALID, "RunResult.prompt_tokens", "range")


def test_a_float_token_count_is_invalid() -> None:
    """A float prompt_tokens names the field and the type float."""
    assert_clean(invalid(result(prompt_tokens=3.0)), ErrorCode.RESULT_INVALID, "RunResult.prompt_tokens", "float")


@pytest.mark.parametrize("field", ["output", "finish_reason", "device", "model_revision", "gpu_uuid"])
def test_a_lone_surrogate_in_a_string_field_is_invalid(field: str) -> None:
    """A str UTF-8 cannot encode ("\\ud800") is RESULT_INVALID naming the field."""
    assert_clean(invalid(result(**{field: "ok \ud800"})), ErrorCode.RESULT_INVALID, f"RunResult.{field}", "surrogate")


def test_a_lone_surrogate_in_extra_keys_and_values_is_invalid() -> None:
    """Surrogates inside extra, in a value or in a key, are RESULT_INVALID naming where."""
    assert_clean(invalid(result(extra={"note": "\udfff"})), ErrorCode.RESULT_INVALID, "['note']", "surrogate")
    assert_clean(invalid(result(extra={"\ud800": 1})), ErrorCode.RESULT_INVALID, "[key #0]", "surrogate")


def test_keys_that_do_not_look_like_names_are_shown_by_position() -> None:
    """A key that may be text (spaces, long) is named by its position, never quoted."""
    error = invalid(result(extra={f"{SECRET} words": {1}}))
    assert_clean(error, ErrorCode.RESULT_INVALID, "RunResult.extra[key #0]", "set")


def test_deep_nesting_in_extra_is_invalid() -> None:
    """Containers nested past MAX_EXTRA_DEPTH are RESULT_INVALID, not a RecursionError."""
    deep: Any = SECRET
    for _ in range(10_000):
        deep = [deep]
    assert_clean(invalid(result(extra={"deep": deep})), ErrorCode.RESULT_INVALID, "RunResult.extra", "deeper")


def test_nesting_up_to_the_bound_is_accepted() -> None:
    """extra nested exactly MAX_EXTRA_DEPTH levels (the dict itself counting) is valid."""
    deep: Any = 1
    for _ in range(MAX_EXTRA_DEPTH - 1):
        deep = [deep]
    assert check_run_result(result(extra={"deep": deep})).extra == {"deep": deep}


def test_a_self_referencing_extra_is_invalid() -> None:
    """A list that contains itself is caught by the depth bound."""
    loop: list[Any] = []
    loop.append(loop)
    assert_clean(invalid(result(extra={"loop": loop})), ErrorCode.RESULT_INVALID, "deeper")


@pytest.mark.parametrize("extra", [None, [], Explosive()])
def test_extra_must_be_a_dict(extra: Any) -> None:
    """An extra that is not a dict names RunResult.extra and the type found."""
    assert_clean(invalid(result(extra=extra)), ErrorCode.RESULT_INVALID, "RunResult.extra", type(extra).__name__)


def test_a_deleted_field_is_invalid() -> None:
    """A RunResult with a field deleted after construction names the missing field."""
    broken = result()
    del broken.finish_reason
    assert_clean(invalid(broken), ErrorCode.RESULT_INVALID, "RunResult.finish_reason", "missing")


def test_encode_body_is_compact_utf8_json() -> None:
    """The encoded body is compact JSON, UTF-8, non-ASCII kept as is."""
    data = encode_body({"result": {"output": "héllo", "n": [1, 2]}}, limit=DEFAULT_MAX_RESULT_BYTES)
    assert data == '{"result":{"output":"héllo","n":[1,2]}}'.encode()
    assert json.loads(data) == {"result": {"output": "héllo", "n": [1, 2]}}


def test_a_four_megabyte_output_is_too_large() -> None:
    """A 4 MB output is RESULT_TOO_LARGE naming the size, the limit and the setting."""
    checked = check_run_result(result(output="x" * (4 << 20)))  # valid as a RunResult...
    with pytest.raises(JobError) as info:
        encode_body({"result": {"output": checked.output}}, limit=DEFAULT_MAX_RESULT_BYTES)
    error = info.value
    assert error.code == ErrorCode.RESULT_TOO_LARGE
    size = len(json.dumps({"result": {"output": checked.output}}, separators=(",", ":")))
    assert error.message == (
        f"the result body is {size} bytes; the coordinator accepts at most {1 << 20} (coordinator.max_result_bytes)"
    )
    assert "xxxx" not in error.message


def test_a_body_of_exactly_the_limit_is_accepted() -> None:
    """The limit is inclusive: a body of exactly ``limit`` bytes encodes."""
    body = {"o": "é" * 10}
    size = len(json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode())
    assert len(encode_body(body, limit=size)) == size
    with pytest.raises(JobError) as info:
        encode_body(body, limit=size - 1)
    assert info.value.code == ErrorCode.RESULT_TOO_LARGE


@pytest.mark.parametrize(
    "body",
    [
        {"extra": {SECRET}},
        {"extra": float("nan")},
        {"extra": SECRET.encode()},
        {"extra": Explosive()},
        {"output": f"{SECRET} \ud800"},
        {"n": 10**5000},
    ],
    ids=["set", "nan", "bytes", "explosive", "surrogate", "huge-int"],
)
def test_a_body_that_is_not_json_is_invalid(body: dict[str, Any]) -> None:
    """Anything json.dumps or UTF-8 refuses is RESULT_INVALID naming the failure's type only."""
    with pytest.raises(JobError) as info:
        encode_body(body, limit=DEFAULT_MAX_RESULT_BYTES)
    assert_clean(info.value, ErrorCode.RESULT_INVALID, "cannot be encoded as JSON")


def test_a_deep_body_is_invalid_not_a_crash() -> None:
    """A body nested past the interpreter's recursion limit is RESULT_INVALID."""
    deep: Any = 1
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(JobError) as info:
        encode_body({"deep": deep}, limit=DEFAULT_MAX_RESULT_BYTES)
    assert_clean(info.value, ErrorCode.RESULT_INVALID, "RecursionError")


@pytest.mark.parametrize("limit", [0, -1, 1.5, True])
def test_a_bad_limit_is_a_programming_error(limit: Any) -> None:
    """encode_body refuses a limit that is not a positive int with a ValueError naming the setting."""
    with pytest.raises(ValueError, match="coordinator.max_result_bytes"):
        encode_body({}, limit=limit)
