"""True CFG in one engine call for Qwen-Image-2.1, below diffusers' own loop (no copy of it).

QwenImage21Pipeline runs CFG as two transformer calls per step, `cache_context("cond")` then `cache_context("uncond")`,
each with its own prefix KV cache. After the first step both caches hold their prefix K/V, and the uncond call of a
step takes exactly what the cond call took except its cache and layout: the same latents (the loop passes one
`latent_model_input` to both) and timestep. So at a step's cond call the drop-in already knows the uncond call's
inputs, runs both branches as one cached call, returns the cond half and keeps the uncond half for the call that
follows; that call takes it only if it is the one predicted (same cache, layout, latents and timestep), otherwise it
runs as usual. The first step stays two calls per branch (extract + cached): the negative's K/V do not exist yet.

The branches' prefixes may differ in length (prompt and negative prompt): the cached graph takes the target's RoPE per
sample and the K/V padded to the longer prefix, the padding's keys masked out (`prefix_key_valid` False), which is
exact. Padding costs attention work, so a pair whose padding would add more than MAX_PADDING_COST to the call's work
(runtime.co_batch21; a long prompt, an empty negative, a small image, a narrow model) keeps its two calls. The padded pair of caches is built once per request (the second step) and the two caches then hold views of
it, so the K/V are not kept twice. Without the cache (`use_kv_cache=False`) the two calls stay separate.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass

import torch

from qwen_image_trt.runtime.co_batch21 import within_padding


@dataclass
class _Pending:
    """The uncond half of a batched call, for the uncond call of the same step."""

    out: torch.Tensor
    source: torch.Tensor  # the latents the branch was computed from,
    version: int  # their in-place version counter then,
    latents: torch.Tensor  # and a copy (a caller may pass other latents of equal values, or change these in place)
    timestep: torch.Tensor
    layout: object

    def matches(self, hidden_states, timestep, layout) -> bool:
        untouched = hidden_states is self.source and hidden_states._version == self.version
        same_latents = untouched or (hidden_states.shape == self.latents.shape
                                     and torch.equal(hidden_states, self.latents))
        return layout is self.layout and same_latents and torch.equal(timestep, self.timestep)


@dataclass
class _Pair:
    """Both branches' prefix K/V padded to one length and stacked (cond first), with their key masks and RoPE."""

    partner: object
    layouts: tuple
    prefix_kv: torch.Tensor
    key_valid: torch.Tensor
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor


class BatchedCfg21:
    """Mixed into the 2.1 engine drop-in before `StockForward21`: `batch_cfg` (set per pipeline call) turns it on.
    `cfg_stats` counts the batched steps and the predicted uncond calls that were taken or not. Both, and the branch
    being run, are per thread: co-batched pipeline calls (runtime.co_batch) share the drop-in, each in its thread."""

    @property
    def _cfg_state(self) -> threading.local:
        state = self.__dict__.get("_cfg_thread")
        if state is None:
            state = self.__dict__.setdefault("_cfg_thread", threading.local())
        return state

    @property
    def batch_cfg(self) -> bool:
        return getattr(self._cfg_state, "batch_cfg", False)

    @batch_cfg.setter
    def batch_cfg(self, on: bool):
        self._cfg_state.batch_cfg = bool(on)

    @property
    def cfg_stats(self) -> dict:
        state = self._cfg_state
        if not hasattr(state, "stats"):
            state.stats = {"batched": 0, "taken": 0, "missed": 0}
        return state.stats

    @cfg_stats.setter
    def cfg_stats(self, stats: dict):
        self._cfg_state.stats = stats

    def cache_context(self, name: str):
        state = self._cfg_state

        @contextlib.contextmanager
        def branch():
            previous, state.branch = getattr(state, "branch", None), name
            try:
                yield
            finally:
                state.branch = previous

        return branch()

    def noise_pred(self, hidden_states, encoder_hidden_states, timestep, img_shapes, img_mask,
                   encoder_hidden_states_mask=None, attention_kwargs=None, kv_cache=None, kv_cache_mode=None):
        args = (hidden_states, encoder_hidden_states, timestep, img_shapes, img_mask, encoder_hidden_states_mask,
                attention_kwargs, kv_cache, kv_cache_mode)
        state = self._cfg_state
        branch = getattr(state, "branch", None)
        if not self.batch_cfg or kv_cache is None or branch not in ("cond", "uncond"):
            return super().noise_pred(*args)
        stats = self.cfg_stats
        if branch == "cond":
            state.cond_cache = weakref.ref(kv_cache)
            partner = getattr(kv_cache, "cfg_partner", None)
            if kv_cache_mode == "cached" and partner is not None and getattr(partner, "prefix_kv", None) is not None:
                out = self._both(kv_cache, partner, hidden_states, timestep, img_shapes, img_mask,
                                 encoder_hidden_states_mask, attention_kwargs)
                if out is not None:
                    stats["batched"] += 1
                    return out
            return super().noise_pred(*args)
        # uncond: remember whose partner this cache is, for the next step's cond call
        cond = getattr(state, "cond_cache", None)
        cond = cond() if cond is not None else None
        if cond is not None and cond is not kv_cache:
            cond.cfg_partner = kv_cache
            kv_cache.cfg_layout = (img_mask, img_shapes, encoder_hidden_states_mask)
        pending = kv_cache.__dict__.pop("cfg_pending", None)
        if pending is not None:
            layout = self.layout(img_mask, img_shapes, encoder_hidden_states_mask, hidden_states.shape[0])
            if kv_cache_mode == "cached" and pending.matches(hidden_states, timestep, layout):
                stats["taken"] += 1
                return pending.out.to(hidden_states.dtype)
            stats["missed"] += 1
        return super().noise_pred(*args)

    def _both(self, cache, partner, hidden_states, timestep, img_shapes, img_mask, mask, attention_kwargs):
        """The cond branch's noise prediction from one cached call over both branches (None: not batchable)."""
        if attention_kwargs and attention_kwargs.get("scale", 1.0) != 1.0:
            return None  # refused by name in the plain path
        batch = hidden_states.shape[0]
        lay_c = self.layout(img_mask, img_shapes, mask, batch)
        lay_u = self.layout(*partner.cfg_layout, batch)
        if lay_c.target_tokens != lay_u.target_tokens or partner.prefix_kv.shape[2] != batch or \
                not within_padding([lay_c.prefix_tokens, lay_u.prefix_tokens], lay_c.target_tokens, self.linear_keys):
            return None
        pair = getattr(cache, "cfg_pair", None)
        if pair is None or pair.partner is not partner or pair.layouts[0] is not lay_c or pair.layouts[1] is not lay_u:
            pair = _stack_pair(cache, partner, lay_c, lay_u)
            cache.cfg_pair = pair
        latents = hidden_states[:, hidden_states.shape[1] - lay_c.target_tokens:]
        out = self._cached(torch.cat([latents, latents]), pair.prefix_kv, pair.key_valid, pair.rope_cos,
                           pair.rope_sin, torch.cat([timestep, timestep]))
        partner.cfg_pending = _Pending(out[batch:], hidden_states, hidden_states._version, hidden_states.clone(),
                                       timestep.clone(), lay_u)
        return out[:batch].to(hidden_states.dtype)


def _stack_pair(cache, partner, lay_c, lay_u) -> _Pair:
    """Pad both caches' K/V (L, 2, B, P, H, Dh) to the longer prefix, stack them on batch, and leave each cache
    holding its view of the stacked tensor (for readers of either alone), so the K/V are kept once."""
    kv_c, kv_u = cache.prefix_kv, partner.prefix_kv
    layers, two, batch, p_c, heads, dh = kv_c.shape
    p_u = kv_u.shape[3]
    length = max(p_c, p_u)
    kv = kv_c.new_zeros(layers, two, 2 * batch, length, heads, dh)
    kv[:, :, :batch, :p_c] = kv_c
    kv[:, :, batch:, :p_u] = kv_u
    valid = torch.zeros(2 * batch, length, dtype=torch.bool, device=lay_c.prefix_key_valid.device)
    valid[:batch, :p_c] = lay_c.prefix_key_valid
    valid[batch:, :p_u] = lay_u.prefix_key_valid
    for owner, view in ((cache, kv[:, :, :batch, :p_c]), (partner, kv[:, :, batch:, :p_u])):
        owner.prefix_kv = view
        for layer, layer_kv in zip(owner.layer_caches, view):
            layer.store(layer_kv[0], layer_kv[1])
    cos_c, sin_c = lay_c.latents_rope(batch)
    cos_u, sin_u = lay_u.latents_rope(batch)
    return _Pair(partner, (lay_c, lay_u), kv, valid.to(kv.device), torch.cat([cos_c, cos_u]),
                 torch.cat([sin_c, sin_u]))


__all__ = ["BatchedCfg21"]
