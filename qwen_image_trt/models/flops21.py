"""The FLOP and byte model of Qwen-Image-2.1's transformer (QwenImage21Transformer2DModel), from its config alone.

Same conventions as models/flops.py (a multiply-add is 2 FLOP; ideal bytes: weights once, each linear's input and
output once, fused attention). What differs from the 2509 transformer:

- one stream: text, condition-image and target tokens all go through the same blocks (q, k, v, out; a SwiGLU MLP
  D -> 3D (x2, gate and proj) -> D), so a block costs 13 D^2 multiply-adds per token instead of 2509's 12 D^2
  per image or text token with twice the weights;
- one shared modulation (D -> 4D) per forward instead of two per block;
- block-causal attention with `causal_condition`: the prefix (text, then each condition image) attends to itself and
  to what comes before it, the target to everything. So the prefix's keys and values do not depend on the target or
  the timestep, and the pipeline computes them once (`kv_cache_mode="extract"`, the first step, a full forward) and
  reuses them (`"cached"`, every later step: only the target's tokens run through the blocks, attending to the
  cached prefix).

Modes: "uncached" (and "extract", the same work): every token through every block; "cached": the target only, plus
reading the cached keys and values (2 x layers x prefix x D per sample).
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen_image_trt.models.flops import ACT_BYTES, WEIGHT_BYTES, ForwardCost

TIME_PROJ_DIM = 256  # QwenImage21TemporalTimesteps(256) -> QwenImage21TimestepProjEmbeddings
MODES = ("uncached", "extract", "cached")


@dataclass(frozen=True)
class Shape21:
    dim: int
    heads: int
    head_dim: int
    layers: int
    mlp_hidden: int
    in_features: int  # in_channels * patch^2
    context_in_dim: int
    out_features: int

    @classmethod
    def from_config(cls, config: dict) -> "Shape21":
        heads, head_dim = int(config.get("num_attention_heads", 32)), int(config.get("attention_head_dim", 128))
        patch = int(config.get("patch_size", 1))
        dim = heads * head_dim
        in_channels = int(config.get("in_channels", 64))
        return cls(dim=dim, heads=heads, head_dim=head_dim, layers=int(config.get("num_layers", 32)),
                   mlp_hidden=dim * int(config.get("mlp_ratio", 3)), in_features=in_channels * patch * patch,
                   context_in_dim=int(config.get("context_in_dim", 4096)),
                   out_features=patch * patch * int(config.get("out_channels") or in_channels))


# Qwen/Qwen-Image-2.1: diffusers' defaults of QwenImage21Transformer2DModel
REAL_21_CONFIG = dict(patch_size=1, in_channels=64, num_layers=32, attention_head_dim=128, num_attention_heads=32,
                      context_in_dim=4096, mlp_ratio=3)


def image_tokens_21(width: int, height: int) -> int:
    """Latent tokens of one image for 2.1: x16 VAE, no patching; 1024x1024 -> 4096 (as 2509's x8 VAE + 2x2)."""
    return (height // 16) * (width // 16)


def param_count_21(s: Shape21) -> int:
    """Every weight of the module (2.1's linears have no biases), norms included; equals the module's count (tested)."""
    d, c = s.dim, s.context_in_dim
    embed = (c + c * d + d * d  # txt_in: zero-centred RMSNorm, in_layer, out_layer
             + s.in_features * d  # img_in
             + TIME_PROJ_DIM * d + d * d  # timestep MLP
             + d * 4 * d)  # shared modulation
    block = 4 * d * d + 3 * d * s.mlp_hidden + 2 * s.head_dim  # attention, SwiGLU, q/k RMSNorms
    head = d * d + d * s.out_features  # norm_out's linear, proj_out
    return embed + s.layers * block + head


def forward_cost_21(config: dict | Shape21, image_tokens: int, text_tokens: int, condition_tokens: int = 0,
                    batch: int = 1, mode: str = "uncached", precision: str = "bf16",
                    condition_images: int | None = None, text_after: int = 0) -> ForwardCost:
    """One forward over `batch` samples of `text_tokens` + `condition_tokens` (the prefix) + `image_tokens` (the
    target). `condition_images`: how many images the condition tokens split into, equal sizes (default 1 when any);
    `text_after`: how many of the text tokens come after the condition images (the prompt after the image in the
    chat template), which attend to the images too."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: one of {', '.join(MODES)}")
    if precision not in WEIGHT_BYTES:
        raise ValueError(f"precision {precision!r}: one of {', '.join(WEIGHT_BYTES)}")
    s = config if isinstance(config, Shape21) else Shape21.from_config(config)
    d, t, c, i = s.dim, text_tokens, condition_tokens, image_tokens
    prefix = t + c
    run = i if mode == "cached" else prefix + i  # tokens through the blocks
    # the stock forward embeds every token it is given (in cached mode too: the pipeline passes the condition
    # latents, then the prefix is dropped), and runs norm_out / proj_out over every token of the blocks
    # per sample two timestep rows (t, and t = 0 for the prefix); txt_in over the text encoder's whole output, which
    # holds one placeholder per 2x2 group of condition latents
    vlm = t + c // 4
    linears = [(2, TIME_PROJ_DIM, d), (2, d, d), (2, d, 4 * d), (2, d, d),  # timestep MLP, modulation, norm_out
               (vlm, s.context_in_dim, d), (vlm, d, d), (c + i, s.in_features, d),  # txt_in, img_in
               (run, d, s.out_features)]  # proj_out
    linears += [(run, d, d)] * 4 * s.layers + [(run, d, s.mlp_hidden), (run, d, s.mlp_hidden),
                                              (run, s.mlp_hidden, d)] * s.layers
    macs = sum(tok * fi * fo for tok, fi, fo in linears)
    # query-key pairs per block (block-causal): text before the images sees itself, condition image j the text
    # before and images 1..j, text after them the whole prefix, the target everything; cached: the target only
    pairs = i * (prefix + i)
    if mode != "cached":
        n = condition_images or (1 if c else 0)
        per, before = (c / n if n else 0), t - text_after
        pairs += before * before + sum(per * (before + per * j) for j in range(1, n + 1)) + text_after * prefix
    attention_flops = float(s.layers) * batch * 4 * pairs * d
    a = ACT_BYTES[precision]
    act = sum(tok * (fi + fo) for tok, fi, fo in linears) + s.layers * 4 * run * d
    if mode == "cached":
        act += s.layers * 2 * prefix * d  # read the cached keys and values
    return ForwardCost(batch=batch, image_tokens=i, text_tokens=prefix, linear_flops=2.0 * batch * macs,
                       attention_flops=attention_flops, weight_bytes=float(param_count_21(s) * WEIGHT_BYTES[precision]),
                       activation_bytes=float(batch * act * a), params=param_count_21(s), precision=precision)


def linear_cost_in_keys(config: dict | Shape21) -> float:
    """A target token's linear work in a cached block (q, k, v, out and the SwiGLU MLP: 2 (4 D^2 + 3 D H) FLOP) in
    units of one attended key's (q.k and the value sum: 4 D FLOP): a padded key adds 1 to a token's 2 D + 1.5 H +
    prefix + target. 416 for the tiny checkpoint, 26,624 for the real model."""
    s = config if isinstance(config, Shape21) else Shape21.from_config(config)
    return 2 * s.dim + 1.5 * s.mlp_hidden


def kv_cache_bytes_21(config: dict | Shape21, prefix_tokens: int, batch: int = 1, precision: str = "bf16") -> int:
    """Device memory of one request's prefix cache: keys and values of every block."""
    s = config if isinstance(config, Shape21) else Shape21.from_config(config)
    return 2 * s.layers * prefix_tokens * s.dim * batch * ACT_BYTES[precision]
