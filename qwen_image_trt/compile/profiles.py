"""Optimization profiles (min/opt/max shape per dynamic input) and the request limits they imply.

Pure functions over image sizes: the TensorRT builder reads the profiles, the manifest keeps them, and
`limits_from_sizes` writes the ranges `runtime.limits.Limits.from_manifest` checks before any work.

Conventions (see docs/tensorrt.md):
- A size is (width, height) in pixels, both multiples of 16 (VAE x8, then 2x2 latent packing).
- The *first* size given is the opt shape: TensorRT tunes its tactics for it.
- Transformer batch counts both CFG branches: with `cfg=True` the engine's max batch is 2 * max_batch
  (cond and uncond stacked in one forward, `runtime/cfg.py`); min stays 1 (no CFG, one image).
- Text tokens are padded by the runtime to a multiple of `text_bucket` (`runtime/transformer.py`),
  so the text range is rounded up to buckets.
"""

from __future__ import annotations

from qwen_image_trt.core.errors import InputError
from qwen_image_trt.core.shapes import (
    CONDITION_AREA,
    DEFAULT_TEXT_BUCKET,
    Profile,
    check_shape_in_profile,
    condition_dimensions,
    image_tokens,
    normalize_profile,
    padded_text_len,
    parse_sizes,
    profile_from_json,
    profile_to_json,
)

DEFAULT_TEXT_LEN_RANGE = (1, 512)  # diffusers' max_sequence_length default is 512
DEFAULT_OPT_TEXT_LEN = 128
# Qwen-Image's transformer (the real checkpoint); pass `config=` for any other (the tiny model).
QWEN_IMAGE_TRANSFORMER = {"in_channels": 64, "joint_attention_dim": 3584, "attention_head_dim": 128,
                          "num_attention_heads": 24}
QWEN_IMAGE_Z_DIM = 16

# Condition images of the edit members (Edit: one; Edit-Plus: up to three). The pipelines resize each to ~1024^2
# pixels at its own aspect ratio (diffusers' calculate_dimensions: sides rounded to multiples of 32) for the VAE,
# and show the text encoder's vision tower the same image (Edit) or a ~384^2 view (Edit-Plus). Engines bound the
# aspect ratio so the profile is finite; requests beyond it are refused by name (runtime.images).
MAX_CONDITION_ASPECT = 4.0
CONDITION_IMAGES = {"edit": 1, "edit-inpaint": 1, "edit-plus": 3}
VISION_VIEW_AREA = {"edit": CONDITION_AREA, "edit-inpaint": CONDITION_AREA, "edit-plus": 384 * 384}
VISION_TEMPLATE_TOKENS = 16  # "Picture N: <|vision_start|> ... <|vision_end|>" around each image's tokens


def condition_bounds(kind: str, max_aspect: float = MAX_CONDITION_ASPECT, samples: int = 801) -> dict:
    """For one condition image of an edit member within [1/max_aspect, max_aspect]: its most latent tokens, its
    side range in pixels (the VAE encoder's), and an upper bound on the text tokens its vision view adds."""
    import math

    ratios = [max_aspect ** (2 * i / (samples - 1) - 1) for i in range(samples)]  # log-spaced, both ends included
    dims = [condition_dimensions(CONDITION_AREA, r) for r in ratios]
    views = [condition_dimensions(VISION_VIEW_AREA[kind], r) for r in ratios]
    # Qwen2-VL's processor rounds each side to 28 px and makes one token per 28 x 28: never more than this
    vision = max(math.ceil((w + 28) * (h + 28) / 784) for w, h in views) + VISION_TEMPLATE_TOKENS
    return {"image_tokens": max(image_tokens(w, h) for w, h in dims), "min_side": min(min(d) for d in dims),
            "max_side": max(max(d) for d in dims), "text_tokens": vision}



def _check_batch(max_batch, opt_batch) -> tuple[int, int]:
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise InputError("max_batch", max_batch, "an integer >= 1")
    opt = 1 if opt_batch is None else opt_batch
    if isinstance(opt, bool) or not isinstance(opt, int) or not 1 <= opt <= max_batch:
        raise InputError("opt_batch", opt_batch, f"an integer in [1, {max_batch}] (max_batch)")
    return max_batch, opt


def transformer_profile(sizes, max_batch: int, text_len_range: tuple[int, int] = DEFAULT_TEXT_LEN_RANGE,
                        opt_batch: int | None = None, text_bucket: int = DEFAULT_TEXT_BUCKET, cfg: bool = True, *,
                        config: dict | None = None, opt_text_len: int = DEFAULT_OPT_TEXT_LEN,
                        kind: str = "text-to-image") -> Profile:
    """Profile of the exported transformer's inputs (models/transformer_export.py).

    `kind`: the family member the engine serves; the edit members add CONDITION_IMAGES[kind] condition images to
    the image sequence (and their vision tokens to the text), so the ranges grow by their bounds.

    `config` is the transformer config (in_channels, joint_attention_dim, attention_head_dim); default
    Qwen-Image's. Static dims are also reconciled against the parsed network at build time.
    """
    sizes = parse_sizes(sizes)
    max_batch, opt_batch = _check_batch(max_batch, opt_batch)
    if isinstance(text_bucket, bool) or not isinstance(text_bucket, int) or text_bucket < 1:
        raise InputError("text_bucket", text_bucket, "an integer >= 1")
    lo, hi = text_len_range
    if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
        raise InputError("text_len_range", text_len_range, "(min, max) integers with 1 <= min <= max")
    cfg_mult = 2 if cfg else 1
    b = (1, opt_batch * cfg_mult, max_batch * cfg_mult)
    tokens = [image_tokens(w, h) for w, h in sizes]
    img = (min(tokens), tokens[0], max(tokens))
    n_cond = CONDITION_IMAGES.get(kind, 0)
    if n_cond:
        cond = condition_bounds(kind)
        square = image_tokens(*condition_dimensions(CONDITION_AREA, 1.0))
        img = (img[0] + square // 4, img[1] + square, img[2] + n_cond * cond["image_tokens"])
        hi += n_cond * cond["text_tokens"]
    txt_min, txt_max = padded_text_len(lo, text_bucket), padded_text_len(hi, text_bucket)
    txt = (txt_min, min(max(padded_text_len(opt_text_len, text_bucket), txt_min), txt_max), txt_max)

    c = {**QWEN_IMAGE_TRANSFORMER, **(config or {})}
    channels, width, half_head = c["in_channels"], c["joint_attention_dim"], c["attention_head_dim"] // 2
    return {
        "hidden_states": tuple((b[i], img[i], channels) for i in range(3)),
        "encoder_hidden_states": tuple((b[i], txt[i], width) for i in range(3)),
        "encoder_hidden_states_mask": tuple((b[i], txt[i]) for i in range(3)),
        "timestep": tuple((b[i],) for i in range(3)),
        "img_rope_cos": tuple((img[i], half_head) for i in range(3)),
        "img_rope_sin": tuple((img[i], half_head) for i in range(3)),
        "txt_rope_cos": tuple((txt[i], half_head) for i in range(3)),
        "txt_rope_sin": tuple((txt[i], half_head) for i in range(3)),
        **({"modulate_index": tuple((b[i], img[i]) for i in range(3))} if c.get("zero_cond_t") else {}),
    }


def _spatial(sizes, scale: int):
    hs = [h // scale for _, h in sizes]
    ws = [w // scale for w, _ in sizes]
    return (min(hs), hs[0], max(hs)), (min(ws), ws[0], max(ws))


def vae_decoder_profile(sizes, max_batch: int, opt_batch: int | None = None, *, z_dim: int = QWEN_IMAGE_Z_DIM) -> Profile:
    """latents [batch, z_dim, 1, h/8, w/8]; height and width ranges are independent."""
    sizes = parse_sizes(sizes)
    max_batch, opt_batch = _check_batch(max_batch, opt_batch)
    b = (1, opt_batch, max_batch)
    hs, ws = _spatial(sizes, 8)
    return {"latents": tuple((b[i], z_dim, 1, hs[i], ws[i]) for i in range(3))}


def vae_encoder_profile(sizes, max_batch: int, opt_batch: int | None = None, kind: str = "text-to-image") -> Profile:
    """images [batch, 3, 1, h, w]: the request sizes (img2img, inpaint), and for the edit members the condition
    images' sides too (CONDITION_AREA at any aspect within MAX_CONDITION_ASPECT)."""
    sizes = parse_sizes(sizes)
    max_batch, opt_batch = _check_batch(max_batch, opt_batch)
    b = (1, opt_batch, max_batch)
    hs, ws = _spatial(sizes, 1)
    if kind in CONDITION_IMAGES:
        c = condition_bounds(kind)
        side = condition_dimensions(CONDITION_AREA, 1.0)[0]
        hs = (min(hs[0], c["min_side"]), side, max(hs[2], c["max_side"]))
        ws = (min(ws[0], c["min_side"]), side, max(ws[2], c["max_side"]))
    return {"images": tuple((b[i], 3, 1, hs[i], ws[i]) for i in range(3))}


def component_profile(component: str, sizes, max_batch: int, *, config: dict | None = None, **kw) -> Profile:
    """Dispatch by component name. `config`: the transformer config, or the VAE config (z_dim)."""
    if component == "transformer":
        return transformer_profile(sizes, max_batch, config=config, **kw)
    if component == "transformer_controlnet":
        return controlnet_transformer_profile(sizes, max_batch, config=config, **kw)
    kind = kw.get("kind", "text-to-image")
    if component == "vae_decoder":
        z_dim = (config or {}).get("z_dim", QWEN_IMAGE_Z_DIM)
        return vae_decoder_profile(sizes, max_batch, kw.get("opt_batch"), z_dim=z_dim)
    if component == "vae_encoder":
        return vae_encoder_profile(sizes, max_batch, kw.get("opt_batch"), kind)
    raise InputError("component", component, "one of transformer, vae_decoder, vae_encoder, transformer_controlnet")


def controlnet_transformer_profile(sizes, max_batch: int, *, config: dict, **kw) -> Profile:
    """The transformer's profile plus `controlnet_residuals` [blocks, batch, image_tokens, inner_dim]: the block
    count is the graph's own (config["controlnet_blocks"]), batch and image tokens follow hidden_states."""
    if not config or not config.get("controlnet_blocks"):
        raise InputError("config", config, "a transformer config with controlnet_blocks (the ControlNet's num_layers)")
    profile = transformer_profile(sizes, max_batch, config=config, **kw)
    c = {**QWEN_IMAGE_TRANSFORMER, **config}
    inner = c["num_attention_heads"] * c["attention_head_dim"]
    profile["controlnet_residuals"] = tuple((int(c["controlnet_blocks"]), b, img, inner)
                                            for b, img, _ in profile["hidden_states"])
    return profile


def limits_from_sizes(sizes, max_batch: int, kind: str = "text-to-image") -> dict:
    """Manifest limits: {"height": [min, max], "width": [min, max], "batch": [1, max_batch], "image_tokens": ...}.

    `batch` is images per request (before CFG doubling). Height and width are checked independently by
    runtime.limits; `image_tokens` records the transformer's token range for shapes inside that box that
    the profile does not cover (the TensorRT runner refuses those with an InputError).
    """
    sizes = parse_sizes(sizes)
    max_batch, _ = _check_batch(max_batch, None)
    hs = [h for _, h in sizes]
    ws = [w for w, _ in sizes]
    tokens = [image_tokens(w, h) for w, h in sizes]
    limits = {"height": [min(hs), max(hs)], "width": [min(ws), max(ws)], "batch": [1, max_batch],
              "image_tokens": [min(tokens), max(tokens)]}
    if kind in CONDITION_IMAGES or kind.startswith("qwen-image-2.1"):  # the profile covers condition images up to
        # this aspect ratio (either way)
        limits["condition_aspect"] = MAX_CONDITION_ASPECT
    return limits


__all__ = ["condition_bounds", "condition_dimensions", "CONDITION_IMAGES", "MAX_CONDITION_ASPECT",
           "parse_sizes", "image_tokens", "transformer_profile", "vae_decoder_profile", "vae_encoder_profile",
           "component_profile", "limits_from_sizes", "profile_to_json", "profile_from_json", "normalize_profile",
           "check_shape_in_profile", "QWEN_IMAGE_TRANSFORMER"]
