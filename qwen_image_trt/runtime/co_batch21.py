"""Co-batching for Qwen-Image-2.1: the cached passes of concurrent pipeline calls (runtime.co_batch) in one engine call.

In 2.1 a request's layout (its prompt's length, its own condition images) fixes its prefix, and the pipeline cannot
put two layouts in one call: prompts padded to the longest move the target's RoPE positions. Below the pipeline the
cached pass has no such limit: its inputs are the target latents, the prefix K/V, the keys' mask and the target's RoPE
per sample, so forwards of requests with different prompt lengths or different condition images (each in its own
thread, each running diffusers' own loop) merge exactly: K/V padded to the longest prefix, the padding's keys masked.
Only the first step's extract passes (one per layout) run on their own. What the requests get is what each would get
alone; only the engine's batch grows.

Padding is not free: a padded key costs attention work like a real one. Forwards share a call only while the padding
adds at most MAX_PADDING_COST to the group's work (models.flops21.linear_cost_in_keys: a target token's linear work
counted in attended keys, 2 D + 1.5 H). At real width (26.6k key-equivalents) a 1024^2 generation and an edit with a
1024^2 condition image merge (+6 %); on the tiny checkpoint at 256^2 (416) they do not (+17 %) and run as two calls
of the same round. The merged K/V are kept while the same forwards keep meeting (a round's sources are the
same tensors every step), so the padding copy is made once per set of requests, not per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen_image_trt.models.transformer21_export import PREFIX_KV

# The most padding may add to a merged call's work, as a fraction of the work without it.
MAX_PADDING_COST = 0.10


def padding_cost(prefix_lengths, target_tokens: int, linear_keys: float) -> float:
    """The work padding prefixes of these lengths to the longest adds, over the work without it (per target token
    and layer: linear_keys + prefix + target, in attended keys)."""
    longest = max(prefix_lengths)
    return sum(longest - p for p in prefix_lengths) / sum(linear_keys + p + target_tokens for p in prefix_lengths)


def within_padding(prefix_lengths, target_tokens: int, linear_keys: float) -> bool:
    return padding_cost(prefix_lengths, target_tokens, linear_keys) <= MAX_PADDING_COST


def padding_groups(prefix_lengths: list[int], target_tokens: int, linear_keys: float) -> list[list[int]]:
    """Indices of forwards grouped for merging: by prefix length, a new group wherever adding the next one would
    cost more than MAX_PADDING_COST."""
    groups: list[list[int]] = []
    for i in sorted(range(len(prefix_lengths)), key=lambda i: prefix_lengths[i]):
        if groups and within_padding([prefix_lengths[j] for j in groups[-1]] + [prefix_lengths[i]], target_tokens,
                                     linear_keys):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class MergedPrefixes:
    """Merges of prefix K/V and key masks, reused while the same sources meet again (held here, so their memory
    cannot be reused by other tensors while a merge is kept); a merge unused for a round is dropped."""

    def __init__(self):
        self._kept: dict[tuple, tuple] = {}
        self._used: set[tuple] = set()

    def get(self, feeds: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        sources = tuple((f[PREFIX_KV], f["prefix_key_valid"]) for f in feeds)
        key = tuple((id(kv), id(valid)) for kv, valid in sources)
        kept = self._kept.get(key)
        if kept is None or not all(a is c and b is d for (a, b), (c, d) in zip(sources, kept[0])):
            kept = self._kept[key] = (sources, merge_prefixes(sources))
        self._used.add(key)
        return kept[1]

    def end_round(self) -> None:
        self._kept = {k: v for k, v in self._kept.items() if k in self._used}
        self._used = set()

    def clear(self) -> None:
        self._kept, self._used = {}, set()


def merge_prefixes(sources) -> tuple[torch.Tensor, torch.Tensor]:
    """[(K/V (L, 2, B_i, P_i, H, Dh), key_valid (B_i, P_i))] -> K/V (L, 2, sum B_i, max P_i, H, Dh) zero-padded and
    key_valid False at the padding."""
    length = max(kv.shape[3] for kv, _ in sources)
    kvs = [F.pad(kv, (0, 0, 0, 0, 0, length - kv.shape[3])) for kv, _ in sources]
    valid = [F.pad(v.bool(), (0, length - v.shape[1]), value=False) for _, v in sources]
    return torch.cat(kvs, dim=2), torch.cat(valid, dim=0)


def run_round_21(forward, calls: dict[int, dict], merged: MergedPrefixes,
                 linear_keys: float) -> tuple[dict[int, object], tuple[int, ...]]:
    """{ticket: {"name": pass, "feeds": {input: tensor}}} -> ({ticket: output or exception}, forwards per engine
    call): cached passes with equal target tokens (and K/V layout) in one call while padding their prefixes costs at
    most MAX_PADDING_COST, every other pass on its own. `linear_keys`: models.flops21.linear_cost_in_keys."""
    kinds: dict[tuple, list[int]] = {}
    for ticket, call in calls.items():
        feeds = call["feeds"]
        if call["name"] == "cached":
            kv = feeds[PREFIX_KV]
            key = ("cached", feeds["latents"].shape[1], kv.dtype, kv.shape[0], kv.shape[4], kv.shape[5])
        else:
            key = ("alone", ticket)
        kinds.setdefault(key, []).append(ticket)
    groups: list[list[int]] = []
    for key, tickets in kinds.items():
        if key[0] != "cached":
            groups.append(tickets)
            continue
        # a stable order (by prefix length, then K/V tensor), so that a kept merge matches the next step's round
        tickets.sort(key=lambda t: (calls[t]["feeds"][PREFIX_KV].shape[3], id(calls[t]["feeds"][PREFIX_KV])))
        lengths = [calls[t]["feeds"][PREFIX_KV].shape[3] for t in tickets]
        groups += [[tickets[i] for i in sorted(g)] for g in padding_groups(lengths, key[1], linear_keys)]
    results: dict[int, object] = {}
    for tickets in groups:
        try:
            if len(tickets) == 1:
                results[tickets[0]] = forward(**calls[tickets[0]])
                continue
            feeds = [calls[t]["feeds"] for t in tickets]
            kv, valid = merged.get(feeds)
            sizes = [f["latents"].shape[0] for f in feeds]
            out = forward("cached", {
                "latents": torch.cat([f["latents"] for f in feeds]), PREFIX_KV: kv, "prefix_key_valid": valid,
                "latents_rope_cos": torch.cat([f["latents_rope_cos"] for f in feeds]),
                "latents_rope_sin": torch.cat([f["latents_rope_sin"] for f in feeds]),
                "timestep": torch.cat([f["timestep"] for f in feeds])})
            for ticket, part in zip(tickets, torch.split(out, sizes)):
                results[ticket] = part
        except Exception as e:  # noqa: BLE001 - handed to every thread whose forward it was
            for ticket in tickets:
                results[ticket] = e
    merged.end_round()
    return results, tuple(sorted((len(t) for t in groups), reverse=True))


__all__ = ["MAX_PADDING_COST", "MergedPrefixes", "merge_prefixes", "padding_cost", "padding_groups", "run_round_21",
           "within_padding"]
