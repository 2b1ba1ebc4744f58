"""Prompt-embedding cache: the text encoder runs once per distinct prompt, not once per request.

The same prompts and negative prompts repeat constantly in production, and the text encoder (7 B Qwen2.5-VL) is a
real share of a few-step image. `EmbeddingCache` is an LRU bounded by bytes, keyed by (encoder identity, prompt,
template, template drop length, max length, dtype, device): anything that changes an embedding changes the key.
`cache_prompt_embeddings(pipe, cache)` puts it in front of the pipeline's `_get_qwen_prompt_embeds` (text prompts
only: the Edit pipelines' embeddings depend on the input images and are not cached; Qwen-Image-2.1's one pipeline
encodes with or without images, and only its image-free calls go through the cache), so every loop that encodes
prompts, ours and diffusers' own, goes through it. Prompts missing from the cache are encoded together in one
text-encoder call; each prompt's embedding is stored without padding and re-padded per call, as diffusers does.

Pinned prompts (the empty and the usual default negative prompts) are never evicted: they are computed once.
Hits, misses and evictions are counted for the server's metrics.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from qwen_image_trt.core.errors import InputError

DEFAULT_PINNED = ("", " ")  # the negative prompts most requests send (or the UI's default)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0

    def as_dict(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions}


class EmbeddingCache:
    def __init__(self, max_bytes: int, pinned=DEFAULT_PINNED):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise InputError("embedding_cache_bytes", max_bytes, "an integer >= 0 (0: no cache)")
        self.max_bytes, self.pinned = max_bytes, frozenset(pinned)
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, key: tuple) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.stats.misses += 1
                return None
            self._items.move_to_end(key)
            self.stats.hits += 1
            return value

    def put(self, key: tuple, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return  # larger than the whole cache: not kept
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._bytes += size
            for old in list(self._items):  # least recently used first; pinned prompts stay
                if self._bytes <= self.max_bytes:
                    break
                if old[1] in self.pinned or old == key:
                    continue
                dropped = self._items.pop(old)
                self._bytes -= dropped.numel() * dropped.element_size()
                self.stats.evictions += 1


def encoder_identity(pipe) -> str:
    """What this pipeline's embeddings depend on: the text encoder's config and weight fingerprint, recorded by
    load_pipeline (core.identity); for another pipeline, its encoder's class and config."""
    import hashlib
    import json

    if getattr(pipe, "encoder_identity", None):
        return pipe.encoder_identity
    te = pipe.text_encoder
    config = te.config.to_dict() if hasattr(te.config, "to_dict") else dict(te.config)
    text = json.dumps({"class": type(te).__name__, "config": config}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_prompt_embeddings(pipe, cache: EmbeddingCache):
    """Route `pipe`'s text-prompt encoding through `cache` (an instance attribute; the class is untouched)."""
    import inspect

    stock = getattr(pipe, "_get_qwen_prompt_embeds", None)
    if stock is None:
        return pipe  # the 2.1-Turbo modular pipeline: its encoder is a block of its own
    if hasattr(pipe, "prompt_template_t2i"):  # Qwen-Image-2.1: one encoder call for prompts with and without images
        return _cache_21(pipe, cache, stock)
    if "image" in inspect.signature(stock).parameters:
        return pipe  # Edit members: the embedding depends on the input images too
    identity = encoder_identity(pipe)

    def cached(prompt=None, device=None, dtype=None):
        device = device or pipe._execution_device
        source = pipe.text_encoder if pipe.text_encoder is not None else pipe.transformer  # no encoder: remote
        dtype = dtype or source.dtype
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        context = (identity, pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx,
                   pipe.tokenizer_max_length, str(dtype), str(device))
        keys = {p: (context[0], p, *context[1:]) for p in prompts}
        found = {p: cache.get(k) for p, k in keys.items()}
        missing = [p for p, v in found.items() if v is None]
        if missing:
            embeds, mask = stock(missing, device=device, dtype=dtype)
            for row, p in enumerate(missing):
                value = embeds[row, : int(mask[row].sum())].clone()
                found[p] = value
                cache.put(keys[p], value)
        out, mask = _right_padded([found[p] for p in prompts])
        return out.to(device=device, dtype=dtype), mask.to(device)

    pipe._get_qwen_prompt_embeds = cached
    pipe.embedding_cache = cache
    return pipe


def _right_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(r.shape[0] for r in rows)
    out = torch.stack([torch.cat([r, r.new_zeros(length - r.shape[0], r.shape[1])]) for r in rows])
    mask = torch.stack([torch.arange(length, device=r.device) < r.shape[0] for r in rows]).long()
    return out, mask


def _cache_21(pipe, cache: EmbeddingCache, stock):
    """QwenImage21Pipeline's `_get_qwen_prompt_embeds(prompt, image, device)` -> (embeds, mask, image_pad_mask):
    prompts without images through the cache (their image_pad_mask is all False), with images as stock."""
    identity = encoder_identity(pipe)

    def cached(prompt=None, image=None, device=None):
        if image is not None:
            return stock(prompt, image, device)
        device = device or pipe._execution_device
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p or " " for p in prompts]  # as the stock call: an empty prompt is read as " "
        dtype = pipe.text_encoder.dtype if pipe.text_encoder is not None else None
        context = (pipe.prompt_template_t2i, pipe._drop_idx, str(dtype), str(device))
        keys = {p: (identity, p, *context) for p in prompts}
        found = {p: cache.get(k) for p, k in keys.items()}
        missing = list(dict.fromkeys(p for p, v in found.items() if v is None))
        if missing:
            embeds, mask, _ = stock(missing, None, device)
            for row, p in enumerate(missing):
                found[p] = embeds[row, : int(mask[row].sum())].clone()
                cache.put(keys[p], found[p])
        out, mask = _right_padded([found[p] for p in prompts])
        return out.to(device), mask.to(device), torch.zeros(mask.shape, dtype=torch.bool, device=device)

    pipe._get_qwen_prompt_embeds = cached
    pipe.embedding_cache = cache
    return pipe
