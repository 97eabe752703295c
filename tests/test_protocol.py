"""Constraint parsing and matching: both spellings, the reference rules, timestamps."""

from __future__ import annotations

from datetime import UTC

import pytest

from miner.wire.protocol import (
    ConstraintError,
    normalise_gpu_name,
    parse_constraints,
    parse_timestamp,
    unmet_constraint,
)

CAPS = {
    "gpus": [
        {"name": "NVIDIA GeForce RTX 3090", "memory_mb": 24576},
        {"name": "NVIDIA H200", "memory_mb": 143771},
    ],
    "cuda": "12.4",
    "models": ["llama2", "mistral"],
    "price": 0.01,
}


@pytest.mark.parametrize("name", ["nvidia-rtx-3090", "NVIDIA GeForce RTX 3090", "rtx_3090", "GeForce RTX-3090"])
def test_gpu_names_normalise_to_one_form(name: str) -> None:
    """Published and reference GPU spellings fold to the same key."""
    assert normalise_gpu_name(name) == "rtx3090"


def test_published_and_reference_spellings_match_the_same_gpu() -> None:
    """gpu_type/min_gpu_memory and gpu/min_vram_gb both select the RTX 3090."""
    assert unmet_constraint(parse_constraints({"gpu_type": "nvidia-rtx-3090", "min_gpu_memory": 24}), CAPS) is None
    assert unmet_constraint(parse_constraints({"gpu": "NVIDIA GeForce RTX 3090", "min_vram_gb": 8}), CAPS) is None


def test_memory_must_fit_on_the_named_gpu() -> None:
    """The memory rule applies to the GPU that matches the name, not to any GPU."""
    reason = unmet_constraint(parse_constraints({"gpu_type": "rtx-3090", "min_gpu_memory": 80}), CAPS)
    assert reason is not None and "80 GB" in reason
    assert unmet_constraint(parse_constraints({"min_vram_gb": 80}), CAPS) is None


def test_reference_gpu_name_is_exact() -> None:
    """The reference spelling `gpu` must equal a GPU name exactly."""
    assert unmet_constraint(parse_constraints({"gpu": "RTX 3090"}), CAPS) is not None


@pytest.mark.parametrize(
    ("constraints", "fragment"),
    [
        ({"cuda": "11.8"}, "CUDA 11.8"),
        ({"models": ["llama2", "gpt-j"]}, "gpt-j"),
        ({"region": "eu-west"}, "region eu-west"),
        ({"max_price": 0.001}, "at most"),
    ],
)
def test_each_unmet_rule_names_what_is_missing(constraints: dict, fragment: str) -> None:
    """CUDA substring, model subset, region and price each give a readable reason."""
    reason = unmet_constraint(parse_constraints(constraints), CAPS)
    assert reason is not None and fragment in reason


def test_null_fields_mean_any() -> None:
    """The reference sends every constraint field, nulls included; nulls match anything."""
    raw = {"gpu": None, "min_vram_gb": None, "cuda": None, "models": None, "region": None, "max_price": None}
    assert unmet_constraint(parse_constraints(raw), CAPS) is None
    assert unmet_constraint(parse_constraints({"cuda": "12"}), CAPS) is None


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"min_vram_gb": "8"}, "min_vram_gb"),
        ({"models": [1]}, "models"),
        ({"gpu": 3090}, "gpu"),
        ({"max_price": -1}, "max_price"),
    ],
)
def test_wrong_types_name_the_field(raw: dict, field: str) -> None:
    """A constraint of the wrong type raises an error naming that field."""
    with pytest.raises(ConstraintError) as info:
        parse_constraints(raw)
    assert info.value.field == field


def test_timestamps_parse_naive_and_aware_as_utc() -> None:
    """The reference's naive timestamps are UTC; aware ones convert to UTC."""
    naive = parse_timestamp("2026-11-28T17:08:59.765980")
    aware = parse_timestamp("2026-11-28T18:08:59.765980+01:00")
    zulu = parse_timestamp("2026-11-28T17:08:59.765980Z")
    assert naive == aware == zulu and naive.tzinfo == UTC
