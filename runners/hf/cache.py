"""A device's warm model cache: load once, keep, evict the least recently used when short.

Used from the device's worker thread only. Memory comes from a :class:`MemoryProbe`
(CUDA free memory and/or a configured budget); a model is loaded only when its weights
plus the job's estimated need fit, after evicting other models if that makes room.
"""

from __future__ import annotations

import gc
import time
from collections import OrderedDict
from typing import Any

import structlog
import torch

from miner.wire.errors import ErrorCode, JobError
from runners.hf import model as hf_model
from runners.hf.device import MemoryProbe, is_out_of_memory
from runners.hf.memory import MiB, mib
from runners.hf.model import LoadedModel, ModelEntry

log = structlog.get_logger("runners.transformers")


class ModelCache:
    """The models resident on one device, least recently used first, plus their tokenizers."""

    def __init__(self, key: str, probe: MemoryProbe) -> None:
        self.key = key
        self.probe = probe
        self.loading: str | None = None
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._tokenizers: dict[str, Any] = {}

    def get(self, name: str) -> LoadedModel | None:
        return self._loaded.get(name)

    def resident_bytes(self) -> int:
        return sum(m.weight_bytes for m in self._loaded.values())

    def free_bytes(self) -> int | None:
        return self.probe.free_bytes(self.resident_bytes())

    def tokenizer(self, entry: ModelEntry) -> Any:
        """The model's tokenizer, loaded once and kept even while the model is evicted."""
        if entry.name not in self._tokenizers:
            self._tokenizers[entry.name] = hf_model.load_tokenizer(entry)
        return self._tokenizers[entry.name]

    def touch(self, name: str) -> None:
        self._loaded[name].last_used = time.monotonic()
        self._loaded.move_to_end(name)

    def make_room(self, need: int, keep: str) -> int | None:
        """Evict least recently used models (never ``keep``) until ``need`` bytes are free."""
        free = self.free_bytes()
        while free is not None and need > free:
            victim = next((name for name in self._loaded if name != keep), None)
            if victim is None:
                break
            self.evict(victim, reason="memory")
            free = self.free_bytes()
        return free

    def ensure_loaded(self, entry: ModelEntry, job_bytes: int) -> LoadedModel:
        """The resident model, loading (and warming up) it first if needed; INSUFFICIENT_VRAM if it cannot fit."""
        loaded = self._loaded.get(entry.name)
        if loaded is not None:
            return loaded
        need = entry.weight_bytes + job_bytes
        free = self.make_room(need, keep=entry.name)
        if free is not None and need > free:
            raise JobError(
                ErrorCode.INSUFFICIENT_VRAM,
                f"model {entry.name!r} needs ~{mib(need)} on {self.key} to load and run this job "
                f"(weights {mib(entry.weight_bytes)}); only {mib(free)} are free",
            )
        self.loading = entry.name
        try:
            loaded = hf_model.load_model(entry, self.tokenizer(entry))
            hf_model.warm_up(loaded)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            gc.collect()  # drop the half-loaded model before giving its memory back
            self.empty_cache()
            raise JobError(
                ErrorCode.INSUFFICIENT_VRAM, f"model {entry.name!r} ran out of memory while loading on {self.key}"
            ) from exc
        finally:
            self.loading = None
        self._loaded[entry.name] = loaded
        return loaded

    def evict(self, name: str, reason: str) -> None:
        loaded = self._loaded.pop(name)
        log.info(
            "model_evicted", model=name, device=self.key, reason=reason, weights_mb=round(loaded.weight_bytes / MiB)
        )
        del loaded
        gc.collect()
        self.empty_cache()

    def empty_cache(self) -> None:
        if self.probe.cuda_indices:
            torch.cuda.empty_cache()

    def clear(self, device_ok: bool) -> None:
        """Drop every model and tokenizer (at shutdown); give memory back if the device still works."""
        self._loaded.clear()
        self._tokenizers.clear()
        gc.collect()
        if device_ok:
            self.empty_cache()
