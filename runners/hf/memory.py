"""How much device memory a model and a batch need: pure arithmetic, no torch.

The estimate is weights + KV cache + a working-set allowance::

    weights      parameters × bytes per weight (read from the safetensors headers)
    kv cache     2 × layers × kv_heads × head_dim × (prompt + new tokens) × batch × bytes
    activations  batch × prompt × (4 × hidden + 2 × intermediate) × bytes   (prefill)
                 + batch × vocab × 4 × 2                                     (fp32 logits)

It errs on the generous side: a job refused as INSUFFICIENT_VRAM would not have fit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MiB = 1024 * 1024
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def mib(nbytes: int) -> str:
    """``nbytes`` as MiB for messages: one decimal below 100 MiB."""
    value = max(nbytes, 0) / MiB
    return f"{value:,.1f} MiB" if value < 100 else f"{value:,.0f} MiB"


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that memory depends on."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """From a ``config.json`` dict (Llama-family keys; ``text_config`` when nested)."""
        if isinstance(config.get("text_config"), Mapping):
            config = config["text_config"]
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        return cls(
            layers=int(config["num_hidden_layers"]),
            hidden=hidden,
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate=int(config.get("intermediate_size") or 4 * hidden),
            vocab=int(config["vocab_size"]),
            max_positions=config.get("max_position_embeddings"),
        )

    def parameter_estimate(self) -> int:
        """Parameters of a Llama-shaped model (used when the weights' headers are not at hand)."""
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attn + mlp + 2 * self.hidden) + 2 * self.vocab * self.hidden + self.hidden


def kv_cache_bytes(shape: ModelShape, tokens: int, batch: int, dtype_bytes: int) -> int:
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * tokens * batch * dtype_bytes


def activation_bytes(shape: ModelShape, prompt_tokens: int, batch: int, dtype_bytes: int) -> int:
    prefill = batch * prompt_tokens * (4 * shape.hidden + 2 * shape.intermediate) * dtype_bytes
    return prefill + batch * shape.vocab * 4 * 2


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    def describe(self) -> str:
        parts = f"weights {mib(self.weights)} + KV cache {mib(self.kv_cache)} + working set {mib(self.activations)}"
        return f"~{mib(self.total)} ({parts})"


def estimate_bytes(
    shape: ModelShape,
    *,
    prompt_tokens: int,
    max_new_tokens: int,
    batch: int,
    dtype: str,
    weight_bytes: int | None = None,
    include_weights: bool = True,
) -> MemoryEstimate:
    """Memory to run ``batch`` sequences of ``prompt_tokens`` + ``max_new_tokens``.

    ``weight_bytes`` overrides the parameter estimate (pass the exact figure when known);
    ``include_weights=False`` when the model is already resident.
    """
    if min(prompt_tokens, max_new_tokens, batch) < 0:
        raise ValueError("token counts and batch must not be negative")
    nbytes = DTYPE_BYTES[dtype]
    weights = 0
    if include_weights:
        weights = weight_bytes if weight_bytes is not None else shape.parameter_estimate() * nbytes
    return MemoryEstimate(
        weights=weights,
        kv_cache=kv_cache_bytes(shape, prompt_tokens + max_new_tokens, batch, nbytes),
        activations=activation_bytes(shape, prompt_tokens, batch, nbytes) if batch else 0,
    )
