"""Hostile job payloads for the fuzzing scenario: hypothesis strategies that carry the outcome
the protocol promises, and raw payloads a less careful coordinator could hand out.

Each strategy draws ``(payload, expected)`` where ``expected`` is ``"COMPLETED"`` or the
``error_code`` the job must fail with (docs/protocol.md: a known parameter of the wrong type or
out of range → ``INVALID_PARAMETERS``; a payload of the wrong shape → ``INVALID_PAYLOAD``;
a model not served → ``MODEL_NOT_SERVED``; unknown parameters are ignored). ``chaos``
draws arbitrary JSON objects whose outcome is only required to be one of those.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

MODEL = "llama2"
PAYLOAD_CODES = ("INVALID_PAYLOAD", "INVALID_PARAMETERS", "MODEL_NOT_SERVED")

# Unicode edge cases that are valid text: NUL, controls, combining marks, RTL marks,
# zero-width joiners, astral-plane emoji, the BOM, noncharacters, a long grapheme.
EDGE_TEXT = st.sampled_from([
    "", "\x00", "a\x00b", "\t\r\n\x0b\x0c", "e\u0301\u0301\u0301", "\u202eevil\u202c", "\u200d\u200b\ufeff",
    "\U0001F600\U0001F469\u200d\U0001F4BB", "\uffff\ufffe", "\U0010FFFF", "\u00e9" * 500, "Z\u0351" * 200,
    "${jndi:ldap://x}", "'; DROP TABLE jobs; --", "<script>alert(1)</script>", "%s%n%x", "../../etc/passwd",
])
TEXT = st.one_of(EDGE_TEXT, st.text(max_size=300), st.text(alphabet=st.characters(codec="utf-8"), max_size=3000))

JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                      st.floats(allow_nan=False, allow_infinity=False), TEXT)


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    return st.recursive(JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                        max_leaves=max_leaves)


NOT_A_STRING = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                         st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))

VALID_PARAMS = st.fixed_dictionaries({}, optional={
    "max_new_tokens": st.integers(1, 64),
    "max_tokens": st.integers(1, 64),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(0, 100),
    "repetition_penalty": st.floats(0.5, 2),
    "seed": st.integers(0, 2**31),
    "stop": st.one_of(st.text(min_size=1, max_size=5), st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=3)),
    "unknown_knob": json_values(6),
    "logit_bias": json_values(6),
})

# One known parameter, wrong: negative, zero, enormous, wrong type.
BAD_PARAM = st.one_of(
    st.tuples(st.sampled_from(["max_new_tokens", "max_tokens"]),
              st.one_of(st.integers(max_value=0), st.integers(min_value=10**7, max_value=10**40), TEXT,
                        st.booleans(), st.floats(0.1, 0.9), st.lists(st.integers(), max_size=2))),
    st.tuples(st.just("temperature"), st.one_of(st.floats(-1e300, -0.001), st.floats(2.001, 1e300), TEXT, st.booleans(),
                                                 st.lists(st.floats(-5, 5), max_size=2))),
    st.tuples(st.just("top_p"), st.one_of(st.floats(-1e300, 0), st.floats(1.001, 1e300), TEXT)),
    st.tuples(st.just("top_k"), st.one_of(st.integers(max_value=-1), TEXT, st.floats(0.1, 0.9))),
    st.tuples(st.just("repetition_penalty"), st.one_of(st.floats(-1e300, 0), st.floats(10.001, 1e300))),
    st.tuples(st.just("seed"), st.one_of(st.integers(max_value=-1), st.integers(min_value=2**64, max_value=2**200), TEXT)),
    st.tuples(st.just("stop"), st.one_of(st.integers(), st.lists(st.integers(), min_size=1, max_size=3),
                                          st.lists(st.text(min_size=1, max_size=2), min_size=17, max_size=20),
                                          st.just(""), st.just([""]), st.text(min_size=257, max_size=300))),
)

MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": TEXT}),
                    min_size=1, max_size=4)
BAD_MESSAGES = st.one_of(
    st.just([]), NOT_A_STRING.filter(lambda v: v is not None and not isinstance(v, list)),
    st.lists(st.one_of(st.integers(), TEXT), min_size=1, max_size=3),
    st.lists(st.fixed_dictionaries({"role": st.text(max_size=6).filter(lambda r: r not in ("system", "user", "assistant", "tool", "developer")),
                                    "content": TEXT}), min_size=1, max_size=2),
    st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": NOT_A_STRING}), min_size=1, max_size=2),
)


@st.composite
def valid(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    payload: dict[str, Any] = {"model": MODEL}
    if draw(st.booleans()):
        payload["prompt"] = draw(TEXT)
    else:
        payload["messages"] = draw(MESSAGES)
    if draw(st.booleans()):
        payload["parameters"] = draw(VALID_PARAMS)
    return payload, "COMPLETED"


@st.composite
def bad_params(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    payload, _ = draw(valid())
    name, value = draw(BAD_PARAM)
    params = {k: v for k, v in dict(payload.get("parameters") or {}).items() if k not in ("max_new_tokens", "max_tokens")}
    params[name] = value
    payload["parameters"] = params
    return payload, "INVALID_PARAMETERS"


@st.composite
def bad_shape(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    kind = draw(st.sampled_from(["prompt_type", "no_prompt", "both", "messages", "model_type", "params_type"]))
    payload: dict[str, Any] = {"model": MODEL, "prompt": draw(TEXT)}
    if kind == "prompt_type":
        payload["prompt"] = draw(NOT_A_STRING.filter(lambda v: v is not None))
    elif kind == "no_prompt":
        del payload["prompt"]
    elif kind == "both":
        payload["messages"] = draw(MESSAGES)
    elif kind == "messages":
        del payload["prompt"]
        payload["messages"] = draw(BAD_MESSAGES)
    elif kind == "model_type":
        payload["model"] = draw(st.one_of(NOT_A_STRING, st.just("")))
    else:
        payload["parameters"] = draw(st.one_of(TEXT, st.integers(), st.lists(st.integers(), min_size=1, max_size=2)))
        return payload, "INVALID_PARAMETERS"
    return payload, "INVALID_PAYLOAD"


@st.composite
def unknown_model(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    payload, _ = draw(valid())
    payload["model"] = draw(st.one_of(TEXT.filter(lambda m: m != MODEL and m != ""), st.just("llama2 "), st.just("LLAMA2"),
                                      st.just("llama2\x00"), st.text(min_size=300, max_size=400)))
    return payload, "MODEL_NOT_SERVED"


@st.composite
def chaos(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """Anything object-shaped, sometimes close to valid: the outcome need only be sound."""
    payload = draw(st.dictionaries(st.sampled_from(["model", "prompt", "messages", "parameters", "extra"]),
                                   json_values(10), max_size=5))
    if draw(st.booleans()):
        payload["model"] = MODEL
    return payload, "ANY"


HOSTILE_JOBS = st.one_of(valid(), bad_params(), bad_shape(), unknown_model(), chaos())


# Payloads the local coordinator refuses at submit but a less careful coordinator could
# hand out: raw JSON text of the payload, and the outcome the miner must reach.
RAW_PAYLOADS: list[tuple[str, str, str]] = [
    ("lone surrogate in the prompt", '{"model": "llama2", "prompt": "a\\ud800b"}', "INVALID_PAYLOAD"),
    ("lone low surrogate in the model name", '{"model": "llama\\udc00", "prompt": "x"}', "MODEL_NOT_SERVED"),
    ("lone surrogate in a chat message", '{"model": "llama2", "messages": [{"role": "user", "content": "\\udfff"}]}', "ANY"),
    ("lone surrogate in a stop sequence", '{"model": "llama2", "prompt": "x", "parameters": {"stop": "\\ud83d"}}', "ANY"),
    ("payload is a string", '"just text"', "INVALID_PAYLOAD"),
    ("payload is null", "null", "INVALID_PAYLOAD"),
    ("payload is a list", '[{"model": "llama2", "prompt": "x"}]', "INVALID_PAYLOAD"),
    ("nesting 40 deep in an unknown parameter", '{"model": "llama2", "prompt": "x", "parameters": {"deep": '
     + "[" * 40 + "]" * 40 + "}}", "COMPLETED"),
    ("nesting 600 deep as the prompt", '{"model": "llama2", "prompt": ' + "[" * 600 + "]" * 600 + "}", "INVALID_PAYLOAD"),
    ("max_new_tokens 10**400", '{"model": "llama2", "prompt": "x", "parameters": {"max_new_tokens": 1' + "0" * 400 + "}}",
     "INVALID_PARAMETERS"),
    ("temperature 1e400 (infinite as a float)", '{"model": "llama2", "prompt": "x", "parameters": {"temperature": 1e400}}',
     "INVALID_PARAMETERS"),
    ("duplicate keys", '{"model": "nope", "model": "llama2", "prompt": "x"}', "COMPLETED"),
]
