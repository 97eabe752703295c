"""Where a model's files come from, and whether they are safe to load. No torch here.

A model ``path`` is either a local folder written by ``save_pretrained`` or a hub id
(``org/name``) pinned to a commit ``revision``. Hub files are fetched with
``huggingface_hub.snapshot_download`` (only configs, tokenizer files and
``*.safetensors``), logging progress; with ``HF_HUB_OFFLINE=1`` only the local cache is
used. A folder is refused when it would need ``trust_remote_code`` (an ``auto_map``) or
has no ``.safetensors`` weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
from pathlib import Path
from typing import Any, NamedTuple

import structlog

from miner.wire.errors import ConfigError, StartupError
from runners.hf.memory import ModelShape

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt", "*.tiktoken"]

log = structlog.get_logger("runners.transformers")


def is_hub_id(path: str) -> bool:
    """A ``org/name`` string that is not an existing local path."""
    return bool(_HUB_ID.match(path)) and not Path(path).expanduser().exists()


def check_source(where: str, path: str, revision: str | None) -> None:
    """Cheap start-up checks of ``path``/``revision`` (no download); ConfigError if wrong."""
    if is_hub_id(path):
        if revision is None or not _COMMIT.match(revision):
            got = "none" if revision is None else repr(revision)
            raise ConfigError(
                f"{where}.revision: hub model {path!r} needs a pinned commit hash (40 hex characters, "
                f"from the model's commit history), got {got}; or set path to a local folder"
            )
        return
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"{where}.path: {path!r} is neither a local folder nor a hub id like 'org/name'; "
            "point it at a folder written by save_pretrained"
        )
    check_model_dir(where, folder)


def check_model_dir(where: str, folder: Path) -> None:
    """Refuse a folder that needs remote code or has no safetensors weights."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{where}.path: no config.json in {folder}; point it at a folder written by save_pretrained")
    for name in ("config.json", "tokenizer_config.json"):
        data = _read_json(folder / name)
        if isinstance(data, dict) and data.get("auto_map"):
            raise ConfigError(
                f"{where}.path: {folder / name} has an auto_map, so loading it would need trust_remote_code, "
                "which aitbc-miner never enables; use a model whose architecture is built into transformers"
            )
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for pattern in _PICKLE_WEIGHTS for p in folder.glob(pattern))
        if pickled:
            raise ConfigError(
                f"{where}.path: {folder} has only pickle weights ({', '.join(pickled[:3])}); aitbc-miner loads "
                "safetensors only: convert them (load once in a trusted environment and "
                "save_pretrained(..., safe_serialization=True)) or use a safetensors revision"
            )
        raise ConfigError(f"{where}.path: no *.safetensors weights in {folder}")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc


def read_config(folder: Path) -> dict[str, Any]:
    """``config.json`` as a dict (checked to exist by :func:`check_model_dir`)."""
    data = _read_json(folder / "config.json")
    return data if isinstance(data, dict) else {}


class ModelLimits(NamedTuple):
    """What a model folder's ``config.json`` says of the model, with the prompt limit checked."""

    config: dict[str, Any]
    shape: ModelShape
    context: int  # the model's context in tokens
    max_prompt_tokens: int  # the configured limit, or all the context but one token


def read_limits(where: str, folder: Path, max_prompt_tokens: int | None) -> ModelLimits:
    """Read ``config.json``'s decoder shape and check ``max_prompt_tokens`` against its context;
    a :class:`ConfigError` naming ``where`` otherwise (start-up and ``aitbc-miner check`` alike)."""
    config = read_config(folder)
    try:
        shape = ModelShape.from_config(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"{where}.path: config.json lacks a decoder shape ({exc}); is this a causal language model?"
        ) from exc
    context = shape.max_positions or 1_000_000
    max_prompt = max_prompt_tokens or max(1, context - 1)
    if max_prompt >= context:
        raise ConfigError(
            f"{where}.max_prompt_tokens: {max_prompt} leaves no room in the model's context of {context} tokens; "
            "lower it"
        )
    return ModelLimits(config, shape, context, max_prompt)


def fetch(where: str, path: str, revision: str | None) -> Path:
    """The local folder of a model: ``path`` itself, or the hub snapshot (downloaded if needed)."""
    if not is_hub_id(path):
        folder = Path(path).expanduser()
        check_model_dir(where, folder)
        return folder
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    log.info("model_fetch", model=path, revision=revision, offline=offline)
    started = time.monotonic()
    try:
        folder = Path(
            snapshot_download(path, revision=revision, allow_patterns=HUB_PATTERNS, tqdm_class=log_progress_class(path))
        )
    except LocalEntryNotFoundError as exc:
        if offline:
            raise ConfigError(
                f"{where}.path: {path}@{revision} is not in the local hub cache and HF_HUB_OFFLINE is set; "
                "download it once or point path at a local folder"
            ) from exc
        raise StartupError(
            f"{where}.path: cannot fetch {path}@{revision}: the hub cannot be reached and it is not in the local "
            "cache; the miner exits 1 so its service manager retries"
        ) from exc
    except Exception as exc:  # the hub client raises many kinds; all mean "cannot fetch now"
        raise StartupError(
            f"{where}.path: cannot fetch {path}@{revision} from the hub ({type(exc).__name__}); "
            "the miner exits 1 so its service manager retries"
        ) from exc
    log.info("model_fetched", model=path, revision=revision, seconds=round(time.monotonic() - started, 1))
    check_model_dir(where, folder)
    return folder


def log_progress_class(label: str) -> type:
    """A tqdm class that writes nothing to the terminal and logs progress every few seconds."""
    from tqdm import tqdm

    class _LogProgress(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            kwargs["file"] = _NullStream()
            kwargs.setdefault("mininterval", 5.0)
            super().__init__(*args, **kwargs)

        def display(self, msg: str | None = None, pos: int | None = None) -> bool:
            d = self.format_dict
            if d.get("n"):
                log.info(
                    "model_download_progress",
                    model=label,
                    what=d.get("prefix") or "",
                    done=int(d["n"]),
                    total=int(d["total"]) if d.get("total") else None,
                    unit=d.get("unit"),
                )
            return True

    return _LogProgress


class _NullStream:
    def write(self, _text: str) -> int:
        return 0

    def flush(self) -> None:
        return None


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a ``.safetensors`` file (tensor names, dtypes, shapes, offsets)."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > 100_000_000:
            raise ValueError(f"{path}: implausible safetensors header length {length}")
        return json.loads(f.read(length))


def parameter_count(folder: Path) -> int:
    """Number of weights stored in the folder's safetensors files, read from their headers."""
    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        for name, info in safetensors_header(file).items():
            if name != "__metadata__":
                n = 1
                for dim in info["shape"]:
                    n *= int(dim)
                total += n
    return total


def fingerprint(folder: Path, sample_bytes: int = 65536) -> str:
    """A short content fingerprint of a local model: ``local-<12 hex>``.

    Hashes config.json, the tokenizer files, every safetensors header and a few samples of
    each weights file (start, middle, end): cheap even for a 13 GB model, and it changes
    when the weights are replaced. It is not a full hash of the weights.
    """
    digest = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        file = folder / name
        if file.is_file():
            digest.update(name.encode() + b"\0" + file.read_bytes())
    for file in sorted(folder.glob("*.safetensors")):
        size = file.stat().st_size
        digest.update(file.name.encode() + b"\0" + str(size).encode())
        with file.open("rb") as f:
            for offset in sorted({0, max(0, size // 2 - sample_bytes // 2), max(0, size - sample_bytes)}):
                f.seek(offset)
                digest.update(f.read(sample_bytes))
    return "local-" + digest.hexdigest()[:12]
