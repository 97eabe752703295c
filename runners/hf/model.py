"""Resolve a configured model, load it safely, and turn a job's input into token ids.

Loading always passes ``use_safetensors=True, trust_remote_code=False``; the folder was
checked by :mod:`runners.hf.source` first. Imports torch and transformers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import structlog
import torch

from miner.wire.errors import ConfigError, ErrorCode, JobError
from runners.hf import source
from runners.hf.memory import DTYPE_BYTES, ModelShape
from runners.hf.options import DevicePlan, TransformersOptions, choose_dtype
from runners.params import TextRequest

log = structlog.get_logger("runners.transformers")


@dataclass
class ModelEntry:
    """A configured model after start-up checks: where it lives, its shape, its limits."""

    name: str
    options: TransformersOptions
    plan: DevicePlan
    folder: Path
    revision: str
    shape: ModelShape
    dtype: str
    weight_bytes: int
    max_prompt_tokens: int
    max_new_tokens: int


def resolve_entry(name: str, options: TransformersOptions, plan: DevicePlan) -> ModelEntry:
    """Fetch (hub ids) and check a model folder for one copy, without loading weights. ConfigError if unusable."""
    from transformers import AutoConfig

    where = f"models[name={name!r}]"
    source.check_source(where, options.path, options.revision)
    folder = source.fetch(where, options.path, options.revision)
    try:
        AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as exc:
        raise ConfigError(f"{where}.path: transformers cannot read the config in {folder}: {exc}") from exc
    raw, shape, context, max_prompt = source.read_limits(where, folder, options.max_prompt_tokens)
    bf16_ok = plan.is_cuda and all(torch.cuda.get_device_capability(i) >= (8, 0) for i in plan.cuda_indices)
    dtype = choose_dtype(options.dtype, raw.get("dtype") or raw.get("torch_dtype"), plan, bf16_ok)
    revision = options.revision if source.is_hub_id(options.path) else source.fingerprint(folder)
    return ModelEntry(
        name=name,
        options=options,
        plan=plan,
        folder=folder,
        revision=revision or "unknown",
        shape=shape,
        dtype=dtype,
        weight_bytes=source.parameter_count(folder) * DTYPE_BYTES[dtype],
        max_prompt_tokens=max_prompt,
        max_new_tokens=min(options.max_new_tokens, context - 1),
    )


@dataclass
class LoadedModel:
    """A model in memory with its tokenizer, ready for ``generate``."""

    entry: ModelEntry
    model: Any  # PreTrainedModel
    tokenizer: Any  # a transformers fast tokenizer
    device: torch.device  # where inputs go
    pad_id: int
    eos_ids: frozenset[int]
    weight_bytes: int
    last_used: float = field(default_factory=time.monotonic)
    batch_cap: int = 0  # lowered after an out-of-memory, grows back on success
    decode_mode: str = "eager"  # eager | static | continuous (runners.hf.batch.run_batch)
    decode_chosen: bool = False  # set once runners.hf.decode.resolve_decode_mode has run for this load

    @property
    def name(self) -> str:
        return self.entry.name


def load_tokenizer(entry: ModelEntry) -> Any:
    """The model's tokenizer, padding on the left (kept even while the model is evicted)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(entry.folder, trust_remote_code=False)
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(entry: ModelEntry, tokenizer: Any) -> LoadedModel:
    """Load the weights onto the planned device(s)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars would go to the daemon's stderr
    hf_logging.disable_default_handler()  # its lines reach the root logger, which the daemon formats
    hf_logging.enable_propagation()
    log.info(
        "model_weights_loading",
        model=entry.name,
        path=str(entry.folder),
        revision=entry.revision,
        device=entry.plan.key,
        dtype=entry.dtype,
        weights_mb=round(entry.weight_bytes / 2**20),
    )
    started = time.monotonic()
    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, entry.dtype),
        "device_map": {"": entry.plan.key},
        "use_safetensors": True,
        "trust_remote_code": False,
    }
    if entry.plan.sharded:  # accelerate spreads the layers over these GPUs and no others
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = {i: int(torch.cuda.mem_get_info(i)[0] * 0.9) for i in entry.plan.cuda_indices}
    if entry.options.attn_implementation:
        kwargs["attn_implementation"] = entry.options.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(entry.folder, **kwargs)
    model.eval()
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = model.generation_config.pad_token_id
    if pad is None:
        pad = min(eos_ids) if eos_ids else 0
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    weight_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    loaded = LoadedModel(
        entry=entry,
        model=model,
        tokenizer=tokenizer,
        device=cast(torch.Tensor, model.get_input_embeddings().weight).device,
        pad_id=int(pad),
        eos_ids=eos_ids,
        weight_bytes=weight_bytes,
        batch_cap=entry.options.max_batch_size,
    )
    log.info(
        "model_loaded",
        model=entry.name,
        device=entry.plan.key,
        dtype=entry.dtype,
        revision=entry.revision,
        weights_mb=round(weight_bytes / 2**20),
        seconds=round(time.monotonic() - started, 2),
    )
    return loaded


def warm_up(loaded: LoadedModel) -> None:
    """One 1-token ``generate`` so the first job does not pay for lazy initialisation."""
    from transformers import GenerationConfig

    ids = loaded.tokenizer("Hello", add_special_tokens=True)["input_ids"] or [loaded.pad_id]
    config = GenerationConfig(max_new_tokens=1, do_sample=False, num_beams=1, pad_token_id=loaded.pad_id)
    with torch.inference_mode():
        loaded.model.generate(
            input_ids=torch.tensor([ids], device=loaded.device),
            attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=loaded.device),
            generation_config=config,
        )


def encode(entry: ModelEntry, tokenizer: Any, request: TextRequest) -> list[int]:
    """Token ids of a plain prompt (with the tokenizer's special tokens) or chat messages."""
    if request.messages is None:
        ids = tokenizer(request.prompt or "", add_special_tokens=True)["input_ids"]
    else:
        if not getattr(tokenizer, "chat_template", None):
            raise JobError(
                ErrorCode.INVALID_PAYLOAD,
                f"model {entry.name!r} has no chat template; send a plain prompt instead of messages",
            )
        try:
            text = tokenizer.apply_chat_template(list(request.messages), add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja errors: the template refuses these messages
            raise JobError(
                ErrorCode.INVALID_PAYLOAD,
                f"the chat template of {entry.name!r} rejected the messages ({type(exc).__name__})",
            ) from exc
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise JobError(ErrorCode.INVALID_PAYLOAD, "the prompt is empty (no tokens); send some text")
    if len(ids) > entry.max_prompt_tokens:
        field_name = "prompt" if request.messages is None else "messages"
        raise JobError(
            ErrorCode.INVALID_PARAMETERS,
            f"{field_name}: {len(ids)} tokens is longer than max_prompt_tokens={entry.max_prompt_tokens} "
            f"for model {entry.name!r}; shorten it",
        )
    return list(ids)


def max_new_for(entry: ModelEntry, request: TextRequest, prompt_tokens: int) -> int:
    """The job's ``max_new_tokens``, defaulted and clamped to the model's cap and context."""
    wanted = request.params.max_new_tokens or entry.max_new_tokens
    context = entry.shape.max_positions or 1_000_000
    return max(1, min(wanted, entry.max_new_tokens, context - prompt_tokens))
