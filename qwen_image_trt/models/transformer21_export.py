"""Tensor-only views of diffusers' QwenImage21Transformer2DModel (Qwen-Image 2.1) that ONNX and TensorRT can take.

The stock forward reads its token layout from tensor values with Python control flow (`img_mask` row 0,
`repeat_interleave` with tensor repeats, boolean setitem, `.tolist()` RoPE and prefix segments, `int(...)` prefix
length), builds complex RoPE tables, runs one SDPA call per prefix segment, and fills the KV cache by a Python side
effect. None of that traces. Here the layout is computed on the host by `layout_21` (pure torch, from the metadata the
pipeline already has: `img_mask`, the prompt mask, `img_shapes`) and enters the graphs as small tensors; the graphs
reuse the stock module's own weights (no copies) and contain no data-dependent Python control flow:

- `Uncached21`  (stock `use_kv_cache=False`): prefix sources + target latents -> target noise prediction;
- `Extract21`   (stock `kv_cache_mode="extract"`): prefix sources -> every layer's prefix K/V, stacked;
- `Cached21`    (stock `kv_cache_mode="cached"`): target latents + stacked prefix K/V -> target noise prediction.

Joint sequence (as the stock model builds it): [prefix | target], the prefix being the encoder's sequence with every
vision slot expanded to its 2x2 latent tokens (text, condition-image blocks, more text, right padding), the target
image's tokens last. Attention is block-causal: key k is visible to query q iff (k <= q or q and k lie in the same
image block) and k is not a padded text token. The prefix never attends to the target, and under `causal_condition` it
is modulated from t = 0, so its K/V are independent of the target latents and of the timestep: `Extract21` runs the
prefix alone (no timestep input, no target tokens), and the first denoising step is `Extract21` then `Cached21`.

Shapes (names are the graphs' input/output names and dynamic axes):
  B batch, Lt text tokens (encoder sequence with the vision slots dropped, padding kept), Ni image latent tokens
  (condition images then the target, the stock `hidden_states`), P prefix tokens (= Lt + condition-image tokens),
  T target tokens, C latent channels (`in_channels`), Dc `context_in_dim`, L layers, H heads, Dh head_dim.

Graph I/O is float32 except the K/V tensor, which is kept in the compute dtype (it is the big one: L*2*B*P*H*Dh).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qwen_image_trt.models.transformer_export import rotate_real

# Each vision-language image slot stands for a 2x2 group of latent tokens (diffusers' _IMG_TOKENS_PER_SLOT).
TOKENS_PER_SLOT = 4
# Block id of the target image's tokens inside the graphs (any id above every condition block's).
_TARGET_BLOCK = 1 << 30

PREFIX_INPUTS = ["encoder_hidden_states", "hidden_states", "prefix_index", "prefix_block_ids", "prefix_key_valid",
                 "prefix_rope_cos", "prefix_rope_sin"]
TARGET_ROPE = ["target_rope_cos", "target_rope_sin"]
# The cached graph takes the target's RoPE per sample: a sample's target positions follow its own prefix length, so
# samples (or the two CFG branches) with prefixes of different lengths share one call, their K/V padded to the
# longest prefix with `prefix_key_valid` False (runtime.cfg21).
LATENTS_ROPE = ["latents_rope_cos", "latents_rope_sin"]
UNCACHED_INPUTS = PREFIX_INPUTS + TARGET_ROPE + ["timestep"]
EXTRACT_INPUTS = list(PREFIX_INPUTS)
CACHED_INPUTS = ["latents", "prefix_kv", "prefix_key_valid"] + LATENTS_ROPE + ["timestep"]
NOISE_PRED, PREFIX_KV = "noise_pred", "prefix_kv"

_AXES = {
    "encoder_hidden_states": {0: "batch", 1: "text_tokens"},
    "hidden_states": {0: "batch", 1: "image_tokens"},
    "prefix_index": {0: "prefix_tokens"},
    "prefix_block_ids": {0: "prefix_tokens"},
    "prefix_key_valid": {0: "batch", 1: "prefix_tokens"},
    "prefix_rope_cos": {0: "prefix_tokens"},
    "prefix_rope_sin": {0: "prefix_tokens"},
    "target_rope_cos": {0: "target_tokens"},
    "target_rope_sin": {0: "target_tokens"},
    "latents_rope_cos": {0: "batch", 1: "target_tokens"},
    "latents_rope_sin": {0: "batch", 1: "target_tokens"},
    "timestep": {0: "batch"},
    "latents": {0: "batch", 1: "target_tokens"},
    "prefix_kv": {2: "batch", 3: "prefix_tokens"},
    NOISE_PRED: {0: "batch", 1: "target_tokens"},
}


def dynamic_axes(names) -> dict:
    """{name: {axis: label}} for the given graph input/output names."""
    return {n: dict(_AXES[n]) for n in names if n in _AXES}


# ---------------------------------------------------------------------------------------------------------------
# Host side: the layout, from the pipeline's metadata
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Layout21:
    """Everything layout-dependent, computed once per request on the host (`layout_21`).

    text_rows        (Lt,) int64   encoder-sequence rows that are text (vision slots dropped, padding kept): the
                                   graphs' `encoder_hidden_states` is the stock one at these rows.
    prefix_index     (P,)  int64   per prefix position, its row in cat([text (Lt), image latents (Ni)]): text position
                                   -> its text row, condition-image position -> Lt + its latent row.
    prefix_block_ids (P,)  int64   -1 at text, i for the tokens of condition image i.
    prefix_key_valid (B, P) bool   False at padded text tokens (excluded as keys), True elsewhere.
    prefix_rope_cos/sin (P, Dh/2) float32, target_rope_cos/sin (T, Dh/2) float32: the stock RoPE angles per token.
    """

    text_rows: torch.Tensor
    prefix_index: torch.Tensor
    prefix_block_ids: torch.Tensor
    prefix_key_valid: torch.Tensor
    prefix_rope_cos: torch.Tensor
    prefix_rope_sin: torch.Tensor
    target_rope_cos: torch.Tensor
    target_rope_sin: torch.Tensor
    image_tokens: int
    target_tokens: int

    @property
    def prefix_tokens(self) -> int:
        return int(self.prefix_index.shape[0])

    def text(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """The graphs' `encoder_hidden_states` from the stock one (B, Lv, Dc) -> (B, Lt, Dc)."""
        return encoder_hidden_states[:, self.text_rows]

    def prefix_inputs(self, encoder_hidden_states, hidden_states) -> tuple:
        """Inputs of `Extract21` (and the first seven of `Uncached21`), in `PREFIX_INPUTS` order."""
        return (self.text(encoder_hidden_states), hidden_states, self.prefix_index, self.prefix_block_ids,
                self.prefix_key_valid, self.prefix_rope_cos, self.prefix_rope_sin)

    def uncached_inputs(self, encoder_hidden_states, hidden_states, timestep) -> tuple:
        return (*self.prefix_inputs(encoder_hidden_states, hidden_states), self.target_rope_cos,
                self.target_rope_sin, timestep)

    def cached_inputs(self, hidden_states, prefix_kv, timestep) -> tuple:
        """`hidden_states`: the stock one (condition latents then target) or the target latents alone."""
        latents = hidden_states[:, hidden_states.shape[1] - self.target_tokens:]
        cos, sin = self.latents_rope(latents.shape[0])
        return (latents, prefix_kv, self.prefix_key_valid, cos, sin, timestep)

    def latents_rope(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's RoPE per sample, (B, T, Dh/2) each: the cached graph's `latents_rope_cos/sin`."""
        return (self.target_rope_cos.expand(batch, -1, -1).contiguous(),
                self.target_rope_sin.expand(batch, -1, -1).contiguous())


@lru_cache(maxsize=8)
def _rope_inv_freqs(axes_dims: tuple[int, ...], theta: int) -> tuple[torch.Tensor, ...]:
    # QwenImage21Rope.rope_params: 1 / theta ** (arange(0, dim, 2) / dim), float32
    return tuple(1.0 / torch.pow(theta, torch.arange(0, d, 2).to(torch.float32).div(d)) for d in axes_dims)


def rope_positions_21(img_shapes, image_pad_mask: torch.Tensor) -> torch.Tensor:
    """(S, 3) int64 (frame, height, width) RoPE position of every joint token, as QwenImage21Rope numbers them: text
    tokens advance one shared position on all three axes; an image block freezes the frame axis at the position the
    preceding text reached (then advances it by max(h, w)) and lays its tokens on a h x w grid centred on zero."""
    is_image = image_pad_mask.tolist()
    total = len(is_image)
    frame, hh, ww = [], [], []
    cursor, position = 0, 0
    for _, height, width in img_shapes:
        start = is_image.index(True, cursor)
        text_len = start - cursor
        frame += range(position, position + text_len)
        hh += range(position, position + text_len)
        ww += range(position, position + text_len)
        position += text_len
        cursor = start + height * width
        frame += [position] * (height * width)
        hh += [h for h in range(-(height - height // 2), height // 2) for _ in range(width)]
        ww += [w for _ in range(height) for w in range(-(width - width // 2), width // 2)]
        position += max(height, width)
    if cursor < total:
        tail = range(position, position + total - cursor)
        frame += tail
        hh += tail
        ww += tail
    return torch.tensor([frame, hh, ww], dtype=torch.long).T.contiguous()


def rope_tables_21(positions: torch.Tensor, axes_dims, theta: int = 10000) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, 3) positions -> cos, sin (S, Dh/2) float32: the real and imaginary parts of QwenImage21Rope's table rows
    (angle = position * inverse frequency per axis, the three axes concatenated)."""
    angles = torch.cat([torch.outer(positions[:, i], inv) for i, inv in
                        enumerate(_rope_inv_freqs(tuple(int(d) for d in axes_dims), int(theta)))], dim=-1)
    return torch.cos(angles).contiguous(), torch.sin(angles).contiguous()


def _shared_shapes(img_shapes):
    """Accept the stock per-sample `[[(f, h, w), ...]] * B` or one sample's `[(f, h, w), ...]`."""
    first = img_shapes[0]
    if len(first) and isinstance(first[0], (list, tuple)):
        return [tuple(int(v) for v in s) for s in first]
    return [tuple(int(v) for v in s) for s in img_shapes]


def layout_21(img_mask: torch.Tensor, img_shapes, encoder_hidden_states_mask: torch.Tensor | None,
              axes_dims_rope, batch: int | None = None, theta: int = 10000) -> Layout21:
    """The layout tensors of one forward, from what the pipeline passes the stock transformer.

    img_mask (B, Lv + T/4) bool: True at vision slots (condition images' and the appended target's); samples share
      a layout, so row 0 is read (as the stock forward does).
    img_shapes: per image (frame, height, width) in latent tokens, condition images first, target last.
    encoder_hidden_states_mask (B, Lv) or None: valid prompt tokens (right padding False); None = all valid.
    """
    img_shapes = _shared_shapes(img_shapes)
    row = img_mask[0].bool().cpu()
    batch = int(batch if batch is not None else img_mask.shape[0])
    lengths = [math.prod(s) for s in img_shapes]
    target = lengths[-1]
    vlm_len = row.shape[0] - target // TOKENS_PER_SLOT
    image_pad_mask = torch.repeat_interleave(row, torch.where(row, TOKENS_PER_SLOT, 1))
    if int(image_pad_mask.sum()) != sum(lengths):
        raise ValueError(f"img_shapes accounts for {sum(lengths)} image tokens but img_mask marks "
                         f"{int(image_pad_mask.sum())}")
    if not bool(image_pad_mask[-target:].all()):
        raise ValueError("the target image's tokens must close the joint sequence")
    text_rows = (~row[:vlm_len]).nonzero(as_tuple=True)[0]
    n_text = int(text_rows.numel())
    # running counts: the i-th text position reads text row i, the j-th image position reads latent row j
    is_img = image_pad_mask.long()
    index = torch.where(image_pad_mask, n_text + is_img.cumsum(0) - 1, (1 - is_img).cumsum(0) - 1)
    block = torch.full_like(index, -1)
    block[image_pad_mask] = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    key_valid = torch.ones(batch, image_pad_mask.shape[0], dtype=torch.bool)
    if encoder_hidden_states_mask is not None:
        text_valid = encoder_hidden_states_mask.bool().cpu()[:, text_rows]
        key_valid[:, ~image_pad_mask] = text_valid.expand(batch, -1) if text_valid.shape[0] == 1 else text_valid
    cos, sin = rope_tables_21(rope_positions_21(img_shapes, image_pad_mask), axes_dims_rope, theta)
    p = image_pad_mask.shape[0] - target
    return Layout21(text_rows=text_rows, prefix_index=index[:p].contiguous(), prefix_block_ids=block[:p].contiguous(),
                    prefix_key_valid=key_valid[:, :p].contiguous(), prefix_rope_cos=cos[:p].contiguous(),
                    prefix_rope_sin=sin[:p].contiguous(), target_rope_cos=cos[p:].contiguous(),
                    target_rope_sin=sin[p:].contiguous(), image_tokens=sum(lengths), target_tokens=target)


# ---------------------------------------------------------------------------------------------------------------
# Graph side: shared pieces
# ---------------------------------------------------------------------------------------------------------------
def block_causal_bias(block_ids: torch.Tensor, key_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(S,) block ids (-1 text, >= 0 an image block) and (B, S) key-valid -> (B, 1, S, S) additive bias: 0 where
    (k <= q or same image block) and the key is valid, -inf elsewhere. Every query sees at least key 0 (the first
    token is text and valid) or its own block, so no row is all -inf. An additive bias, not a boolean mask: exported,
    a boolean mask becomes Where + IsNaN over every score."""
    pos = torch.arange(block_ids.shape[0], device=block_ids.device)
    same_block = (block_ids[:, None] == block_ids[None, :]) & (block_ids[:, None] >= 0)
    allowed = ((pos[None, :] <= pos[:, None]) | same_block)[None] & key_valid.bool()[:, None, :]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=block_ids.device).masked_fill(~allowed, float("-inf"))
    return bias[:, None]


def key_bias(key_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, K) key-valid -> (B, 1, 1, K) additive bias."""
    keep = key_valid.bool()[:, None, None, :]
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))


def _qkv(attn, x, cos, sin):
    """QwenImage21Attention's projections, per-head RMS norms and RoPE (real arithmetic); [B, S, H, Dh] each."""
    head_dim = attn.inner_dim // attn.heads
    q = attn.to_q(x).unflatten(-1, (-1, head_dim))
    k = attn.to_k(x).unflatten(-1, (-1, head_dim))
    v = attn.to_v(x).unflatten(-1, (-1, head_dim))
    q = attn.norm_q(q).to(v.dtype)
    k = attn.norm_k(k).to(v.dtype)
    return rotate_real(q, cos, sin), rotate_real(k, cos, sin), v


def _attend(attn, q, k, v, bias):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias)
    out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
    return attn.to_out[0](out)


def run_block(block, h, mod, cos, sin, bias, past_kv=None, kv_only=False):
    """QwenImage21TransformerBlock.forward with the per-token modulation `mod` ([B|1, S|1, 4*dim]: mod1.scale,
    mod1.gate, mod2.scale, mod2.gate, rows already selected per token), real RoPE, an additive attention bias, and
    optionally a prefix (k, v) prepended to the keys. Returns (h, k, v); with `kv_only` h is not computed."""
    scale1, gate1, scale2, gate2 = mod.chunk(4, dim=-1)
    x = block.img_norm1(h) * (1 + scale1)
    q, k, v = _qkv(block.attn, x, cos, sin)
    if kv_only:
        return None, k, v
    if past_kv is not None:
        keys, values = torch.cat([past_kv[0], k], dim=1), torch.cat([past_kv[1], v], dim=1)
    else:
        keys, values = k, v
    h = h + gate1.tanh() * _attend(block.attn, q, keys, values, bias)
    x = block.img_norm2(h) * (1 + scale2)
    h = h + gate2.tanh() * block.img_mlp(x)
    if h.dtype == torch.float16:
        h = h.clip(-65504, 65504)
    return h, k, v


class _Base21(nn.Module):
    def __init__(self, transformer):
        super().__init__()
        if not transformer.config.causal_condition:
            raise NotImplementedError("the Qwen-Image 2.1 export models causal_condition=True only (the prefix K/V "
                                      "cache and the t=0 prefix modulation need it)")
        if transformer.config.patch_size != 1:
            raise NotImplementedError("patch_size != 1 is not modelled (2.1 consumes latents unpatched)")
        self.transformer = transformer
        # blocks whose residual update is skipped (h passes through): the quantization evidence's `bypassed`
        # reference (core.quant_evidence); empty in every graph
        self.skip_blocks = frozenset()
        self.eval()

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.transformer.img_in.weight.dtype

    def _modulation(self, timestep):
        """timestep (R,) -> (temb (R, dim), modulation (R, 4*dim)), the stock shared modulation."""
        m = self.transformer
        temb = m.time_text_embed(timestep.to(self.compute_dtype), m.img_in.weight)
        return temb, m.modulation(temb)

    def _prefix_tokens(self, encoder_hidden_states, hidden_states, prefix_index, images=None):
        """The prefix's joint hidden states: txt_in(text) and img_in(latents) gathered into joint order. `images`:
        img_in(hidden_states) when the caller has it (each Linear appears once in a graph: weights are named by it)."""
        m, dtype = self.transformer, self.compute_dtype
        images = m.img_in(hidden_states.to(dtype)) if images is None else images
        rows = torch.cat([m.txt_in(encoder_hidden_states.to(dtype)), images], dim=1)
        return rows.index_select(1, prefix_index)

    def _out(self, h, temb):
        m = self.transformer
        scale = m.norm_out.linear(m.norm_out.silu(temb).to(h.dtype))[:, None]
        return m.proj_out(m.norm_out.norm(h) * (1 + scale)).float()


class Uncached21(_Base21):
    """The stock forward with `kv_cache=None` (`use_kv_cache=False`), target tokens out.

    Inputs (`UNCACHED_INPUTS`):
      encoder_hidden_states (B, Lt, Dc) float  text tokens of the encoder output (`Layout21.text`)
      hidden_states         (B, Ni, C)  float  condition-image latents then target latents (the stock input)
      prefix_index          (P,)  int64        row of each prefix position in cat([text, latents])
      prefix_block_ids      (P,)  int64        -1 text, i condition image i
      prefix_key_valid      (B, P) bool        False at padded prompt tokens
      prefix_rope_cos/sin   (P, Dh/2) float
      target_rope_cos/sin   (T, Dh/2) float    (T = the last T rows of hidden_states)
      timestep              (B,) float         the stock `timestep` (sigma, in [0, 1])
    Output: noise_pred (B, T, C) float32 = the stock output's last T tokens.
    """

    input_names: ClassVar[list[str]] = UNCACHED_INPUTS
    output_names: ClassVar[list[str]] = [NOISE_PRED]

    def forward(self, encoder_hidden_states, hidden_states, prefix_index, prefix_block_ids, prefix_key_valid,
                prefix_rope_cos, prefix_rope_sin, target_rope_cos, target_rope_sin, timestep):
        m, dtype = self.transformer, self.compute_dtype
        n_target = target_rope_cos.shape[0]
        n_prefix = prefix_index.shape[0]
        images = m.img_in(hidden_states.to(dtype))
        prefix = self._prefix_tokens(encoder_hidden_states, hidden_states, prefix_index, images)
        # the last T rows as a gather: a slice from the symbolic start Ni - T would leave the exporter an unbacked size
        last = torch.arange(n_target, device=hidden_states.device) + (hidden_states.shape[1] - n_target)
        target = images.index_select(1, last)
        h = torch.cat([prefix, target], dim=1)
        # the stock B + 1 rows: the real timesteps, then t = 0 for the prefix
        temb, mod = self._modulation(torch.cat([timestep, timestep.new_zeros(1)], dim=0))
        is_target = torch.arange(h.shape[1], device=h.device) >= n_prefix
        mod = torch.where(is_target[None, :, None], mod[:-1, None], mod[-1:, None])
        cos = torch.cat([prefix_rope_cos, target_rope_cos], dim=0)
        sin = torch.cat([prefix_rope_sin, target_rope_sin], dim=0)
        block_ids = torch.cat([prefix_block_ids, torch.full_like(target_rope_cos[:, 0], _TARGET_BLOCK,
                                                                 dtype=prefix_block_ids.dtype)])
        key_valid = torch.cat([prefix_key_valid.bool(), torch.ones_like(h[:, n_prefix:, 0], dtype=torch.bool)], 1)
        bias = block_causal_bias(block_ids, key_valid, dtype)
        for block in m.transformer_blocks:
            h, _, _ = run_block(block, h, mod, cos, sin, bias)
        return self._out(h[:, n_prefix:], temb[:-1])


class Extract21(_Base21):
    """The prefix alone -> every layer's prefix K and V (post norm_k and RoPE, what the stock `kv_cache_mode=
    "extract"` stores in `QwenImage21KVCache`).

    Inputs (`EXTRACT_INPUTS`): the first seven of `Uncached21` (no timestep: the prefix is modulated from t = 0 and
    never attends to the target; `hidden_states` may hold the target's latents too, only prefix rows are read).
    Output: prefix_kv (L, 2, B, P, H, Dh) in the compute dtype; [:, 0] keys, [:, 1] values.
    The last block's attention output and MLP are not computed (only its K/V are needed).
    """

    input_names: ClassVar[list[str]] = EXTRACT_INPUTS
    output_names: ClassVar[list[str]] = [PREFIX_KV]

    def forward(self, encoder_hidden_states, hidden_states, prefix_index, prefix_block_ids, prefix_key_valid,
                prefix_rope_cos, prefix_rope_sin):
        m, dtype = self.transformer, self.compute_dtype
        h = self._prefix_tokens(encoder_hidden_states, hidden_states, prefix_index)
        _, mod = self._modulation(torch.zeros(1, dtype=dtype, device=h.device))
        mod = mod[:, None]  # (1, 1, 4*dim): every prefix token reads the t = 0 row
        bias = block_causal_bias(prefix_block_ids, prefix_key_valid, dtype)
        blocks = list(m.transformer_blocks)
        kv = []
        for i, block in enumerate(blocks):
            last_or_skipped = i == len(blocks) - 1 or i in self.skip_blocks
            new_h, k, v = run_block(block, h, mod, prefix_rope_cos, prefix_rope_sin, bias, kv_only=last_or_skipped)
            h = h if last_or_skipped else new_h
            kv.append(torch.stack([k, v]))
        return torch.stack(kv)


class Cached21(_Base21):
    """The stock `kv_cache_mode="cached"` forward: only the target's tokens, attending to [cached prefix, target].

    Inputs (`CACHED_INPUTS`):
      latents             (B, T, C) float        the target latents (the stock hidden_states' last T rows)
      prefix_kv           (L, 2, B, P, H, Dh)    `Extract21`'s output
      prefix_key_valid    (B, P) bool
      latents_rope_cos/sin (B, T, Dh/2) float  the target's RoPE per sample (its positions follow its prefix)
      timestep            (B,) float
    Output: noise_pred (B, T, C) float32.
    Samples may carry prefixes of different lengths: their K/V padded to the longest, the padding's keys invalid.
    """

    input_names: ClassVar[list[str]] = CACHED_INPUTS
    output_names: ClassVar[list[str]] = [NOISE_PRED]

    def forward(self, latents, prefix_kv, prefix_key_valid, latents_rope_cos, latents_rope_sin, timestep):
        m, dtype = self.transformer, self.compute_dtype
        h = m.img_in(latents.to(dtype))
        temb, mod = self._modulation(timestep)
        mod = mod[:, None]
        key_valid = torch.cat([prefix_key_valid.bool(), torch.ones_like(h[:, :, 0], dtype=torch.bool)], dim=1)
        bias = key_bias(key_valid, dtype)
        kv = prefix_kv.to(dtype)
        for i, block in enumerate(m.transformer_blocks):
            if i not in self.skip_blocks:
                h, _, _ = run_block(block, h, mod, latents_rope_cos, latents_rope_sin, bias,
                                    past_kv=(kv[i, 0], kv[i, 1]))
        return self._out(h, temb)


def stock_cache_to_tensor(cache) -> torch.Tensor:
    """A filled stock `QwenImage21KVCache` -> (L, 2, B, P, H, Dh), `Extract21`'s layout."""
    return torch.stack([torch.stack([c.k, c.v]) for c in cache.layer_caches])


def tensor_to_stock_cache(prefix_kv: torch.Tensor):
    """(L, 2, B, P, H, Dh) -> a stock `QwenImage21KVCache` (views, no copies)."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    cache = QwenImage21KVCache(prefix_kv.shape[0])
    for layer, kv in zip(cache.layer_caches, prefix_kv):
        layer.store(kv[0], kv[1])
    return cache


class OrtGraph21:
    """One exported graph in ONNX Runtime as a callable of torch tensors (positional, in the graph's input order)
    returning a torch tensor: what `GraphTransformer21` takes in place of the torch wrappers."""

    def __init__(self, path, providers=("CPUExecutionProvider",)):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=list(providers))
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *args):
        feeds = {n: a.detach().cpu().contiguous().numpy() for n, a in zip(self.input_names, args)}
        return torch.from_numpy(self.session.run(None, feeds)[0])


class StockForward21:
    """The stock QwenImage21Transformer2DModel.forward signature (img_shapes, img_mask, encoder_hidden_states_mask,
    kv_cache, kv_cache_mode) over three passes with the graphs' signatures, `_uncached`, `_extract`, `_cached` (each
    takes the graph's inputs positionally and returns its one output). Mixed into `GraphTransformer21` (torch
    wrappers or ONNX Runtime sessions) and the engine drop-in (runtime.transformer21, runners).

    kv_cache=None          -> uncached;
    kv_cache_mode="extract" -> extract (prefix K/V, kept stacked on the pipeline's QwenImage21KVCache) then cached at
                              this step (equal to the stock extract forward's target tokens);
    kv_cache_mode="cached"  -> cached on the kept K/V.
    Returns the target's tokens only, (B, T, C), where the stock returns the whole joint sequence for the first two:
    the pipeline keeps `noise_pred[:, -T:]` either way.
    """

    def cache_context(self, name: str):
        import contextlib

        return contextlib.nullcontext()

    def layout(self, img_mask, img_shapes, encoder_hidden_states_mask, batch: int) -> Layout21:
        return layout_21(img_mask, img_shapes, encoder_hidden_states_mask, self.config["axes_dims_rope"], batch=batch)

    def noise_pred(self, hidden_states, encoder_hidden_states, timestep, img_shapes, img_mask,
                   encoder_hidden_states_mask=None, attention_kwargs=None, kv_cache=None, kv_cache_mode=None):
        if attention_kwargs and attention_kwargs.get("scale", 1.0) != 1.0:
            raise NotImplementedError("a LoRA scale at run time is not modelled by the exported graphs")
        if kv_cache is not None and kv_cache_mode not in ("extract", "cached"):
            raise ValueError(f"kv_cache_mode must be 'extract' or 'cached' when kv_cache is provided, "
                             f"got {kv_cache_mode!r}.")
        if kv_cache is None and kv_cache_mode is not None:
            raise ValueError(f"kv_cache_mode is {kv_cache_mode!r} but no kv_cache was passed to hold the prefix.")
        lay = self.layout(img_mask, img_shapes, encoder_hidden_states_mask, hidden_states.shape[0])
        if kv_cache is None:
            out = self._uncached(*lay.uncached_inputs(encoder_hidden_states, hidden_states, timestep))
        else:
            if kv_cache_mode == "extract":
                kv = self._extract(*lay.prefix_inputs(encoder_hidden_states, hidden_states))
                kv_cache.prefix_kv = kv  # stacked, for the next steps (no re-stacking per step)
                for layer, layer_kv in zip(kv_cache.layer_caches, kv):  # views, for readers of the stock layout
                    layer.store(layer_kv[0], layer_kv[1])
            kv = getattr(kv_cache, "prefix_kv", None)
            if kv is None:
                kv = stock_cache_to_tensor(kv_cache)
            out = self._cached(*lay.cached_inputs(hidden_states, kv, timestep))
        return out.to(hidden_states.dtype)

    def forward(self, hidden_states, encoder_hidden_states, timestep, img_shapes, img_mask,
                encoder_hidden_states_mask=None, attention_kwargs=None, kv_cache=None, kv_cache_mode=None,
                return_dict: bool = True):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        out = self.noise_pred(hidden_states, encoder_hidden_states, timestep, img_shapes, img_mask,
                              encoder_hidden_states_mask, attention_kwargs, kv_cache, kv_cache_mode)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


class GraphTransformer21(StockForward21, nn.Module):
    """Stands in for QwenImage21Transformer2DModel inside diffusers' QwenImage21Pipeline (`StockForward21`) on top of
    three callables with the graphs' signatures (`Uncached21`/`Extract21`/`Cached21` modules, or `OrtGraph21`
    sessions)."""

    def __init__(self, config, uncached, extract, cached, device="cpu", dtype=torch.float32):
        nn.Module.__init__(self)
        self.config = config
        # read by DiffusionPipeline.device / .dtype / _execution_device (ModelMixin has them, nn.Module does not)
        self._device, self._dtype = torch.device(device), dtype
        self._uncached, self._extract, self._cached = uncached, extract, cached
        # the pipeline sizes its QwenImage21KVCache with len(transformer.transformer_blocks)
        self.transformer_blocks = range(int(config["num_layers"]))

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @classmethod
    def from_transformer(cls, transformer):
        """Torch-backed: the three wrappers around `transformer`'s own weights."""
        return cls(transformer.config, Uncached21(transformer), Extract21(transformer), Cached21(transformer),
                   device=transformer.device, dtype=transformer.dtype)


def sample_inputs_21(config, batch: int = 2, text=(5, 7), cond=(4, 4), target=(4, 4), pad: int = 3, seed: int = 0):
    """Stock-forward inputs in the pipeline's layout: [text, condition slots, text, padding] from the encoder, one slot
    per 2x2 latent group, then the target's slots; the last sample's prompt is `pad` tokens shorter (right padding).
    `cond=None`: text-to-image. Returns a dict of the stock forward's keyword arguments (no kv_cache)."""
    g = torch.Generator().manual_seed(seed)
    slots = cond[0] * cond[1] // TOKENS_PER_SLOT if cond else 0
    n_vlm = text[0] + slots + text[1]
    img_mask = torch.zeros(batch, n_vlm + target[0] * target[1] // TOKENS_PER_SLOT, dtype=torch.bool)
    img_mask[:, text[0]:text[0] + slots] = True
    img_mask[:, n_vlm:] = True
    mask = torch.ones(batch, n_vlm, dtype=torch.long)
    if pad:
        mask[-1, n_vlm - pad:] = 0
    n_img = (cond[0] * cond[1] if cond else 0) + target[0] * target[1]
    shapes = ([(1, *cond)] if cond else []) + [(1, *target)]
    return {"hidden_states": torch.randn(batch, n_img, config["in_channels"], generator=g),
                "encoder_hidden_states": torch.randn(batch, n_vlm, config["context_in_dim"], generator=g),
                "encoder_hidden_states_mask": mask, "img_mask": img_mask, "img_shapes": [shapes] * batch,
                "timestep": torch.rand(batch, generator=g)}


__all__ = [
    "CACHED_INPUTS",
    "EXTRACT_INPUTS",
    "LATENTS_ROPE",
    "NOISE_PRED",
    "PREFIX_KV",
    "TOKENS_PER_SLOT",
    "UNCACHED_INPUTS",
    "Cached21",
    "Extract21",
    "GraphTransformer21",
    "Layout21",
    "OrtGraph21",
    "StockForward21",
    "Uncached21",
    "block_causal_bias",
    "dynamic_axes",
    "key_bias",
    "layout_21",
    "rope_positions_21",
    "rope_tables_21",
    "run_block",
    "sample_inputs_21",
    "stock_cache_to_tensor",
    "tensor_to_stock_cache",
]
