"""Build a tiny random-weight Llama model with its own tokenizer, offline, into a folder.

The folder is what ``save_pretrained`` writes (``config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json``...), so the transformers runner loads it
through the same code path as a real checkpoint. The weights are random: the text it
generates is noise. Used by the tests, ``aitbc-miner demo`` and ``bench/``.

The tokenizer is a byte-level BPE trained with the ``tokenizers`` library on a small
built-in text (the default, well under a second) or on Python's standard-library sources
(``corpus="stdlib"``, the benchmark's 16,384-entry tokenizer). It has ``<s>``/``</s>``/
``<pad>`` tokens, prepends ``<s>`` to plain prompts and carries a simple chat template.

torch, transformers and tokenizers are imported inside the functions only.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from transformers import LlamaConfig, PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# Roles are written as "<|role|>" lines; a turn ends with the end-of-sequence token, so a
# model that learned the format would stop after its answer.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_BUILTIN_TEXT = """\
The miner claims a job from the coordinator, runs it on a local GPU and submits a signed
receipt with the result. A job names a model, a prompt or a list of chat messages, and a
few parameters: max_new_tokens, temperature, top_p, top_k, repetition_penalty, stop and
seed. Greedy decoding (temperature 0) and seeded sampling are reproducible, so a job can
be checked by running it again on another machine. Models are loaded once and kept warm;
jobs for the same model that arrive together share one batched generate call with left
padding. A cancelled job, or one past its deadline, stops between two decoding steps.
def generate(prompt, max_new_tokens=64, temperature=0.0):
    tokens = tokenizer.encode(prompt)
    for step in range(max_new_tokens):
        logits = model(tokens)[-1]
        tokens.append(int(logits.argmax()))
    return tokenizer.decode(tokens)
Numbers 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048 4096 8192 16384 65536.
Punctuation: , . ; : ! ? ' " ( ) [ ] { } < > / \\ | - _ + = * & ^ % $ # @ ~ `
ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz
"""


def builtin_corpus() -> Iterator[str]:
    """A few KB of built-in text: enough for a byte-level BPE of about a thousand entries."""
    for line in _BUILTIN_TEXT.splitlines():
        yield line + "\n"
    # Short word forms so merges cover common fragments beyond the paragraph above.
    words = _BUILTIN_TEXT.split()
    for i in range(0, len(words), 7):
        yield " ".join(reversed(words[i : i + 7])) + "\n"


def stdlib_corpus(max_bytes: int = 6_000_000) -> Iterator[str]:
    """Python standard-library sources (sorted, deterministic), up to ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        yield text
        total += len(text)
        if total >= max_bytes:
            return


def train_tokenizer(vocab_size: int, corpus: Literal["builtin", "stdlib"] = "builtin") -> PreTrainedTokenizerFast:
    """Train a byte-level BPE and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = builtin_corpus() if corpus == "builtin" else stdlib_corpus()
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=1_000_000,
    )


def llama_config(
    vocab_size: int,
    *,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    max_positions: int = 2048,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    pad_token_id: int = 0,
) -> LlamaConfig:
    """A ``LlamaConfig`` of the given shape (intermediate defaults to ~8/3 × hidden)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or (hidden * 8 // 3 + 15) // 16 * 16,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_positions,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
    )


def build_tiny_llama(
    path: Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    vocab_size: int = 1024,
    corpus: Literal["builtin", "stdlib"] = "builtin",
    max_positions: int = 2048,
    seed: int = 0,
) -> Path:
    """Write a random-weight Llama (float32 safetensors) and its tokenizer to ``path``.

    Deterministic for given arguments (weights from ``seed``). Defaults build a ~0.3 M
    parameter model in about a second; ``hidden=256, layers=4, heads=4, intermediate=688,
    vocab_size=16384, corpus="stdlib"`` is the benchmark's "tiny" model. Returns ``path``.
    """
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size, corpus)
    config = llama_config(
        len(tokenizer),
        hidden=hidden,
        layers=layers,
        heads=heads,
        intermediate=intermediate,
        max_positions=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    bars_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path, safe_serialization=True)
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(path)
    return path
