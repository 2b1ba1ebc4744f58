"""TensorRT optimization profiles of the Qwen-Image-2.1 graphs (models.transformer21_export, the 2.1 VAE).

Pure arithmetic over the request sizes, as compile.profiles is for 2509. The dims (names as the graphs' dynamic axes):

- batch: images per engine call. QwenImage21Pipeline runs true CFG as a second call with its own prefix cache: the
  extract and uncached graphs see (1, opt_batch, max_batch). The engine drop-in runs both branches' cached passes as
  one call (runtime.cfg21), so with `cfg=True` the cached graph's batch is (1, 2 * opt_batch, 2 * max_batch).
- target_tokens T: the output's latent tokens, (w/16) * (h/16) (x16 VAE, latents unpatched).
- text_tokens Lt: the encoder's rows that are text (the vision slots dropped): the prompt, the chat template around
  it, and per condition image its "<imageN><|vision_start|>...<|vision_end|>" wrapper. Not padded to buckets: in 2.1
  a padded token advances the RoPE positions after it (runtime.transformer21).
- image_tokens Ni: condition-image latents then the target's; prefix_tokens P = Lt + condition-image tokens.
- prefix_kv [layers, 2, batch, P, heads, head_dim]: layers, heads and head_dim are the graph's own, fixed.

Condition images (editing): up to `condition_images` per request, each resized by the pipeline to about
output_resolution^2 pixels at its aspect ratio (within MAX_CONDITION_ASPECT, refused beyond it by name); the bound
per image is the larger of the stock 1024^2 and the largest output size (qitrt generate conditions at the output's
area). `condition_images=0` builds generation-only engines (smaller ranges, faster tactics).
"""

from __future__ import annotations

from qwen_image_trt.compile.profiles import DEFAULT_OPT_TEXT_LEN, DEFAULT_TEXT_LEN_RANGE, MAX_CONDITION_ASPECT, \
    _check_batch, _spatial
from qwen_image_trt.core.errors import InputError
from qwen_image_trt.core.shapes import CONDITION_AREA, Profile, condition_dimensions, image_tokens, parse_sizes

TEMPLATE_TOKENS = 40  # the 2.1 chat template around the prompt (system turn dropped, assistant turn kept)
IMAGE_WRAPPER_TOKENS = 16  # " <imageN><|vision_start|>" ... "<|vision_end|>" per condition image
DEFAULT_CONDITION_IMAGES = 1
MAX_CONDITION_IMAGES = 3  # runtime.images.MAX_IMAGES for the 2.1 members


def condition_tokens(sizes, max_aspect: float = MAX_CONDITION_ASPECT, samples: int = 401) -> int:
    """The most latent tokens one condition image can have: resized to ~area at any aspect ratio within
    [1/max_aspect, max_aspect], area = max(1024^2, the largest output size)."""
    area = max([CONDITION_AREA] + [w * h for w, h in parse_sizes(sizes)])
    ratios = [max_aspect ** (2 * i / (samples - 1) - 1) for i in range(samples)]
    return max(image_tokens(*condition_dimensions(area, r)) for r in ratios)


def transformer21_profile(graph: str, sizes, max_batch: int, *, config: dict, opt_batch: int | None = None,
                          condition_images: int = DEFAULT_CONDITION_IMAGES, cfg: bool = True,
                          text_len_range: tuple[int, int] = DEFAULT_TEXT_LEN_RANGE,
                          opt_text_len: int = DEFAULT_OPT_TEXT_LEN) -> Profile:
    """Profile of `transformer_{uncached,extract,cached}`'s inputs (graph: "uncached", "extract" or "cached").
    `config`: the 2.1 transformer config (in_channels, context_in_dim, num_layers, num_attention_heads,
    attention_head_dim). The opt shape is text-to-image at the first size with `opt_text_len` prompt tokens."""
    if graph not in ("uncached", "extract", "cached"):
        raise InputError("graph", graph, "uncached, extract or cached")
    if isinstance(condition_images, bool) or not isinstance(condition_images, int) \
            or not 0 <= condition_images <= MAX_CONDITION_IMAGES:
        raise InputError("condition_images", condition_images, f"an integer in [0, {MAX_CONDITION_IMAGES}]")
    lo, hi = text_len_range
    if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
        raise InputError("text_len_range", text_len_range, "(min, max) integers with 1 <= min <= max")
    sizes = parse_sizes(sizes)
    max_batch, opt_batch = _check_batch(max_batch, opt_batch)
    mult = 2 if cfg and graph == "cached" else 1
    b = (1, opt_batch * mult, max_batch * mult)
    tokens = [image_tokens(w, h) for w, h in sizes]
    target = (min(tokens), tokens[0], max(tokens))
    cond = condition_images * condition_tokens(sizes)
    text = (lo, min(max(opt_text_len, lo), hi) + TEMPLATE_TOKENS, hi + TEMPLATE_TOKENS
            + condition_images * IMAGE_WRAPPER_TOKENS)
    prefix = (text[0], text[1], text[2] + cond)
    images = (target[0], target[1], target[2] + cond)
    c = config
    half, heads, dh = c["attention_head_dim"] // 2, c["num_attention_heads"], c["attention_head_dim"]
    shapes = {
        "encoder_hidden_states": [(b[i], text[i], c["context_in_dim"]) for i in range(3)],
        "hidden_states": [(b[i], images[i], c["in_channels"]) for i in range(3)],
        "prefix_index": [(prefix[i],) for i in range(3)],
        "prefix_block_ids": [(prefix[i],) for i in range(3)],
        "prefix_key_valid": [(b[i], prefix[i]) for i in range(3)],
        "prefix_rope_cos": [(prefix[i], half) for i in range(3)],
        "prefix_rope_sin": [(prefix[i], half) for i in range(3)],
        "target_rope_cos": [(target[i], half) for i in range(3)],
        "target_rope_sin": [(target[i], half) for i in range(3)],
        "latents_rope_cos": [(b[i], target[i], half) for i in range(3)],
        "latents_rope_sin": [(b[i], target[i], half) for i in range(3)],
        "timestep": [(b[i],) for i in range(3)],
        "latents": [(b[i], target[i], c["in_channels"]) for i in range(3)],
        "prefix_kv": [(c["num_layers"], 2, b[i], prefix[i], heads, dh) for i in range(3)],
    }
    from qwen_image_trt.models.specs import SPECS

    names = SPECS[f"transformer_{graph}"].input_names
    return {n: tuple(shapes[n]) for n in names}


def vae21_profile(component: str, sizes, max_batch: int, *, config: dict, opt_batch: int | None = None,
                  condition_images: int = DEFAULT_CONDITION_IMAGES) -> Profile:
    """The 2.1 VAE: decoder latents [B, z_dim, 1, h/16, w/16]; encoder images [B, in_channels (4: RGBA), 1, H, W]
    for the condition images (their sides at any aspect within MAX_CONDITION_ASPECT)."""
    sizes = parse_sizes(sizes)
    max_batch, opt_batch = _check_batch(max_batch, opt_batch)
    b = (1, opt_batch, max_batch)
    scale = int(config.get("scale_factor_spatial") or 16)
    if component == "vae_decoder":
        hs, ws = _spatial(sizes, scale)
        return {"latents": tuple((b[i], config["z_dim"], 1, hs[i], ws[i]) for i in range(3))}
    if component != "vae_encoder":
        raise InputError("component", component, "vae_decoder or vae_encoder")
    if not condition_images:
        raise InputError("components", "vae_encoder", "no vae_encoder engine with condition_images=0 (generation "
                         "only): nothing encodes images")
    area = max([CONDITION_AREA] + [w * h for w, h in sizes])
    dims = [condition_dimensions(area, MAX_CONDITION_ASPECT ** (2 * i / 400 - 1)) for i in range(401)]
    side = condition_dimensions(area, 1.0)[0]
    lo, hi = min(min(d) for d in dims), max(max(d) for d in dims)
    hs = ws = (min(lo, *(s for w, h in sizes for s in (w, h))), side, hi)
    channels = int(config.get("in_channels", 4))
    return {"images": tuple((b[i], channels, 1, hs[i], ws[i]) for i in range(3))}


def component_profile_21(component: str, sizes, max_batch: int, *, config: dict, **kw) -> Profile:
    if component.startswith("transformer_"):
        return transformer21_profile(component.removeprefix("transformer_"), sizes, max_batch, config=config, **kw)
    kw.pop("text_len_range", None), kw.pop("opt_text_len", None), kw.pop("cfg", None)
    return vae21_profile(component, sizes, max_batch, config=config, **kw)


__all__ = ["transformer21_profile", "vae21_profile", "component_profile_21", "condition_tokens",
           "DEFAULT_CONDITION_IMAGES", "MAX_CONDITION_IMAGES"]
