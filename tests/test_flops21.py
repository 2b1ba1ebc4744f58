"""The Qwen-Image-2.1 FLOP model (models/flops21.py) against the real diffusers module: its weight count, the matmul
FLOPs torch's own counter sees, and the attention query-key pairs of the SDPA calls the block-causal forward makes,
with and without the prefix KV cache."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from qwen_image_trt.models.flops21 import (
    REAL_21_CONFIG,
    Shape21,
    forward_cost_21,
    image_tokens_21,
    kv_cache_bytes_21,
    param_count_21,
)
from qwen_image_trt.models.tiny21 import TRANSFORMER_CONFIG


class _AttentionPairs(TorchDispatchMode):
    """Sums query x key pairs (x heads x batch) over every SDPA call."""

    def __init__(self):
        super().__init__()
        self.pairs, self.calls = 0, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in str(func):
            q, k = args[0], args[1]
            self.pairs += q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
            self.calls[str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def transformer():
    from diffusers import QwenImage21Transformer2DModel

    torch.manual_seed(0)
    return QwenImage21Transformer2DModel(**TRANSFORMER_CONFIG).eval()


def _inputs(text_before=5, text_after=7, cond=(8, 8), target=(8, 8)):
    """The pipeline's layout: text, one placeholder per 2x2 group of condition latents, more text; then the target."""
    g = torch.Generator().manual_seed(0)
    slots = cond[0] * cond[1] // 4
    vlm = text_before + slots + text_after
    img_mask = torch.zeros(1, vlm + target[0] * target[1] // 4, dtype=torch.bool)
    img_mask[:, text_before:text_before + slots] = True
    img_mask[:, vlm:] = True
    x = torch.randn(1, cond[0] * cond[1] + target[0] * target[1], 64, generator=g)
    return dict(hidden_states=x, timestep=torch.tensor([0.5]), img_mask=img_mask,
                encoder_hidden_states=torch.randn(1, vlm, 64, generator=g),
                encoder_hidden_states_mask=torch.ones(1, vlm, dtype=torch.long),
                img_shapes=[[(1, *cond), (1, *target)]], return_dict=False)


def test_weight_count_equals_the_modules(transformer):
    assert param_count_21(Shape21.from_config(TRANSFORMER_CONFIG)) == sum(p.numel() for p in transformer.parameters())
    assert 7.0e9 < param_count_21(Shape21.from_config(REAL_21_CONFIG)) < 7.2e9  # "7.1 B" (the model card)


@pytest.mark.parametrize("mode", ["uncached", "cached"])
def test_flops_equal_what_the_forward_computes(transformer, mode):
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    kw = _inputs()
    extra = {}
    if mode == "cached":
        extra = dict(kv_cache=QwenImage21KVCache(len(transformer.transformer_blocks)))
        with torch.no_grad():
            transformer(**kw, **extra, kv_cache_mode="extract")
        extra["kv_cache_mode"] = "cached"
    pairs = _AttentionPairs()
    with torch.no_grad(), FlopCounterMode(display=False) as counter, pairs:
        transformer(**kw, **extra)
    model = forward_cost_21(TRANSFORMER_CONFIG, image_tokens=64, text_tokens=12, condition_tokens=64, mode=mode,
                            text_after=7)
    assert counter.get_total_flops() == model.linear_flops  # every matmul (the counter does not see CPU SDPA)
    shape = Shape21.from_config(TRANSFORMER_CONFIG)
    assert pairs.pairs * 4 * shape.head_dim == model.attention_flops  # QK^T and PV per pair and head
    if mode == "uncached":  # a model that ignored the block-causal mask (all pairs) would be off
        assert pairs.pairs < 140 * 140 * shape.heads * shape.layers


def test_the_cache_saves_the_prefix_work_at_real_size():
    tokens = image_tokens_21(1024, 1024)
    assert tokens == 4096
    full = forward_cost_21(REAL_21_CONFIG, tokens, 128, condition_tokens=tokens)
    cached = forward_cost_21(REAL_21_CONFIG, tokens, 128, condition_tokens=tokens, mode="cached")
    assert 0.4 < cached.flops / full.flops < 0.6  # the target is half the tokens, and attends to the whole prefix
    assert cached.bytes < full.bytes  # ... reading the cached keys and values instead of recomputing them
    assert kv_cache_bytes_21(REAL_21_CONFIG, 128 + tokens) == 2 * 32 * (128 + tokens) * 4096 * 2
    with pytest.raises(ValueError, match="mode"):
        forward_cost_21(REAL_21_CONFIG, tokens, 128, mode="prefill")
