"""Tiny random-weight Qwen-Image-2.1 checkpoints built from the real diffusers/transformers classes.

`make_tiny_21_checkpoint` writes what diffusers' `QwenImage21Pipeline` loads (model_index.json names it):

- `text_encoder`: `Qwen3VLForConditionalGeneration` (Qwen3-VL text decoder with interleaved mRoPE and a vision
  tower with DeepStack features), 64 wide;
- `processor`: `Qwen3VLProcessor` = the tiny byte-level tokenizer of `tiny.build_tokenizer` (Qwen's special tokens),
  a Qwen2-VL image patcher with Qwen3-VL's 16 px patches (2x2 merge: one `<|image_pad|>` per 32x32 px, which is one
  2x2 group of the VAE's x16 latents, as the transformer's `img_mask` requires), a Qwen3-VL chat template, and
  Qwen3-VL's video processor config; the vision special-token ids are the text encoder config's;
- `vae`: `AutoencoderKLQwenImage21` (x16 spatial, 64 latent channels, RGBA in and out), 8 channels wide;
- `transformer`: `QwenImage21Transformer2DModel` (single-stream, block-causal) with `causal_condition` on, so the
  prefix KV-cache modes ("extract"/"cached") exist, 4 blocks of 2 heads x 32;
- `scheduler`: `FlowMatchEulerDiscreteScheduler` with tiny.py's Qwen-Image settings.

Marked `TINY_RANDOM_WEIGHTS.txt`. Seeded: the same files come out every time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qwen_image_trt.models.checkpoint import TINY_MARKER
from qwen_image_trt.models.tiny import (
    SCHEDULER_CONFIG,
    TEXT_HIDDEN,
    _empty_folder,
    _scale_up_modulation,
    _token_ids,
    _vision_token_ids,
    build_tokenizer,
)

PIPELINE_CLASS = "QwenImage21Pipeline"

# Qwen/Qwen-Image-2.1 (diffusers' defaults for QwenImage21Transformer2DModel): 32 blocks of 32 heads x 128, mlp_ratio
# 3, context_in_dim 4096 (Qwen3-VL-8B's width), 64 latent channels unpatched, RoPE axes (16, 56, 56) = head_dim.
# Tiny: 4 blocks of 2 heads x 32; RoPE axes even and summing to head_dim like the real ones; the real latent width 64
# (the VAE's z_dim, fixed by its 64 latents_mean/std entries and the pipeline's packing).
TRANSFORMER_CONFIG = dict(
    patch_size=1, in_channels=64, out_channels=64, num_layers=4, attention_head_dim=32, num_attention_heads=2,
    context_in_dim=TEXT_HIDDEN, mlp_ratio=3, axes_dims_rope=(8, 12, 12), causal_condition=True,
)
# AutoencoderKLQwenImage21's defaults are the real VAE (base 96 / decoder 144, dim_mult [1, 2, 4, 8, 8], 2 res blocks);
# five levels keep its x16 spatial compression (the pipeline hard-codes vae_scale_factor 16; the modular one reads
# 2 ** len(temperal_downsample)), z_dim 64 keeps its latents_mean/std; channels and res blocks shrink.
VAE_CONFIG = dict(base_dim=8, decoder_base_dim=8, z_dim=64, dim_mult=[1, 1, 2, 2, 2], num_res_blocks=1,
                  attn_scales=[], temperal_downsample=[False, True, True, True])
# Qwen3-VL-8B (the real text encoder): 36 layers, 4096 wide, 32 heads x 128 with 8 KV heads, mrope_section
# [24, 20, 20] interleaved, rope_theta 5e6; vision tower 27 blocks of 1152, patch 16, DeepStack at [8, 16, 24].
# Tiny: 2 layers, 64 wide, 2 heads x 32 (1 KV head), the mRoPE split scaled to head_dim 32 ([6, 5, 5]), a 2-block
# vision tower of width 32 with DeepStack from block 0, an 8x8 position-embedding grid.
TEXT_ENCODER = dict(hidden=TEXT_HIDDEN, heads=2, kv_heads=1, head_dim=32, intermediate=128, layers=2)
VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
              temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0])
# The pipeline resizes a condition image to about output_resolution^2 px (multiples of 32) and feeds the same pixels
# to the VAE and the processor: the processor must not resize again, or its <|image_pad|> count and the VAE's latent
# groups disagree (the transformer then raises in build_token_metadata). Tiny range: 32x32 px (one image token) up to
# the pipeline's default output_resolution, 1024x1024 px. (Qwen3-VL's own processor starts at 256x256 px.)
TINY_PROCESSOR_PIXELS = dict(min_pixels=32 * 32, max_pixels=1024 * 1024)

# Qwen3-VL's chat template (no tools): what `apply_chat_template` renders for the pipeline's system message, and
# vision placeholders for image/video content in user turns.
CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}{%- set video_count = namespace(value=0) -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message.role + '\n' -}}"
    "{%- if message.content is string -%}{{- message.content -}}"
    "{%- else -%}{%- for content in message.content -%}"
    "{%- if content.type == 'image' or 'image' in content or 'image_url' in content -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' ~ image_count.value ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif content.type == 'video' or 'video' in content -%}"
    "{%- set video_count.value = video_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' ~ video_count.value ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in content -%}{{- content.text -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)
# Qwen/Qwen3-VL-8B-Instruct video_preprocessor_config.json (Qwen3VLVideoProcessor), pixel range scaled down: written
# so that where torchvision is installed the stock Qwen3VLProcessor loads the folder as it loads the real one.
VIDEO_PROCESSOR_CONFIG = {
    "video_processor_type": "Qwen3VLVideoProcessor", "processor_class": "Qwen3VLProcessor",
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True, "do_sample_frames": True,
    "fps": 2, "min_frames": 4, "max_frames": 768, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "merge_size": 2, "patch_size": 16, "temporal_patch_size": 2, "resample": 3, "rescale_factor": 1 / 255,
    "size": {"longest_edge": 1024 * 1024 * 2, "shortest_edge": 32 * 32 * 2},
}


def text_encoder_config(tokenizer, hidden: int = TEXT_ENCODER["hidden"], heads: int = TEXT_ENCODER["heads"],
                        kv_heads: int = TEXT_ENCODER["kv_heads"], head_dim: int = TEXT_ENCODER["head_dim"],
                        intermediate: int = TEXT_ENCODER["intermediate"], layers: int = TEXT_ENCODER["layers"],
                        vision: dict | None = None):
    """A Qwen3-VL config for `tokenizer`'s vocabulary; Qwen3-VL's interleaved mRoPE split ([24, 20, 20] at
    head_dim 128) scaled to `head_dim`; vision special-token ids from the tokenizer."""
    from transformers import Qwen3VLConfig

    half = head_dim // 2  # rotary frequencies per head, split over (time, height, width)
    h = round(half * 20 / 64)
    mrope = [half - 2 * h, h, h]
    ids = _token_ids(tokenizer)
    return Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, max_position_embeddings=4096, pad_token_id=ids["pad_token_id"],
                         rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=mrope,
                                              mrope_interleaved=True)),
        vision_config=dict(VISION, out_hidden_size=hidden, **(vision or {})),
        tie_word_embeddings=False, **_vision_token_ids(tokenizer),
    )


def build_text_encoder(tokenizer, seed: int, **sizes):
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(text_encoder_config(tokenizer, **sizes)).eval()
    ids = _token_ids(tokenizer)
    model.generation_config.bos_token_id = ids["bos_token_id"]
    model.generation_config.eos_token_id = ids["eos_token_id"]
    model.generation_config.pad_token_id = ids["pad_token_id"]
    return model


def build_processor(tokenizer):
    """A Qwen3-VL processor: Qwen2-VL's PIL image patcher at 16 px patches, the tokenizer, Qwen3-VL's chat template."""
    from qwen_image_trt.models.processor import ImageOnlyQwen3VLProcessor, image_processor_class

    image_processor = image_processor_class()(patch_size=16, temporal_patch_size=2, merge_size=2,
                                              image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
                                              **TINY_PROCESSOR_PIXELS)
    return ImageOnlyQwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def save_processor(processor, folder: str | Path) -> None:
    """The files the stock Qwen3VLProcessor reads: image processor, tokenizer, chat template, video processor."""
    folder = Path(folder)
    processor.save_pretrained(folder)
    (folder / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_PROCESSOR_CONFIG, indent=2) + "\n")


def build_transformer(seed: int, **overrides):
    from diffusers import QwenImage21Transformer2DModel

    torch.manual_seed(seed)
    transformer = QwenImage21Transformer2DModel(**{**TRANSFORMER_CONFIG, **overrides}).eval()
    _scale_up_modulation(transformer)
    return transformer


# A few-step grid for the tiny 2.1-Turbo checkpoint (the real Turbo ships its own in model_index.json).
TURBO_SIGMAS = [1.0, 0.75, 0.5, 0.25]


def make_tiny_21_checkpoint(out_dir: str | Path, seed: int = 0, overwrite: bool = False,
                            sample_sigmas: list[float] | None = None) -> Path:
    """Write a tiny Qwen-Image-2.1 checkpoint (diffusers layout, QwenImage21Pipeline) and return its path.
    `sample_sigmas`: a 2.1-Turbo checkpoint (the grid in model_index.json: diffusers runs it as
    QwenImage21TurboModularPipeline)."""
    from diffusers import AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler

    out = _empty_folder(out_dir, overwrite)
    tokenizer = build_tokenizer()
    save_processor(build_processor(tokenizer), out / "processor")
    build_text_encoder(tokenizer, seed).save_pretrained(out / "text_encoder")
    build_transformer(seed + 1).save_pretrained(out / "transformer")
    torch.manual_seed(seed + 2)
    AutoencoderKLQwenImage21(**VAE_CONFIG).eval().save_pretrained(out / "vae")
    FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG).save_pretrained(out / "scheduler")
    _write_model_index(out, sample_sigmas)
    kind = "qwen-image-2.1-turbo" if sample_sigmas else "qwen-image-2.1"
    (out / TINY_MARKER).write_text(
        f"Random weights (seed {seed}, kind {kind}) made by qwen_image_trt.models.tiny21 for tests. "
        "Not a trained model.\n")
    return out


# Qwen-Image-2.1's real transformer width (models.flops21.REAL_21_CONFIG: 7.1 B parameters at 32 blocks; ~0.22 B a
# block, ~0.14 B outside them) and a one-layer Qwen3-VL text encoder of the real width 4096 (32 heads x 128, 8 KV heads)
# so that the pipeline runs end to end.
REAL_WIDTH_21_TEXT_ENCODER = dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=4096, layers=1)


def make_real_width_21_checkpoint(out_dir: str | Path, num_layers: int = 1, seed: int = 0, dtype: str = "bf16",
                                  overwrite: bool = False) -> Path:
    """A Qwen-Image-2.1 checkpoint with the real transformer config and `num_layers` of its 32 blocks, random weights
    saved in `dtype` (bf16 like the real one, or fp32), the tiny 2.1 VAE: for measuring export and engine builds at
    real width. 1 block is 0.35 B parameters (0.71 GB in bf16), 2 blocks 0.57 B (2.3 GB in fp32: over protobuf's
    2 GB). Marked RANDOM_WEIGHTS.txt: the stages treat it as a real checkpoint."""
    from diffusers import AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Transformer2DModel

    from qwen_image_trt.models.flops21 import REAL_21_CONFIG
    from qwen_image_trt.models.tiny import DTYPES, RANDOM_MARKER, _cast_floats

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: one of {', '.join(DTYPES)}")
    out = _empty_folder(out_dir, overwrite)
    tokenizer = build_tokenizer()
    save_processor(build_processor(tokenizer), out / "processor")
    build_text_encoder(tokenizer, seed, **REAL_WIDTH_21_TEXT_ENCODER).to(DTYPES[dtype]).save_pretrained(
        out / "text_encoder")
    torch.manual_seed(seed + 1)
    transformer = QwenImage21Transformer2DModel(**{**REAL_21_CONFIG, "num_layers": int(num_layers),
                                                   "out_channels": 64, "axes_dims_rope": (16, 56, 56),
                                                   "causal_condition": True}).eval()
    _scale_up_modulation(transformer)
    _cast_floats(transformer, DTYPES[dtype])
    transformer.save_pretrained(out / "transformer")
    del transformer
    torch.manual_seed(seed + 2)
    AutoencoderKLQwenImage21(**VAE_CONFIG).eval().save_pretrained(out / "vae")
    FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG).save_pretrained(out / "scheduler")
    _write_model_index(out)
    (out / RANDOM_MARKER).write_text(f"Random weights (seed {seed}): Qwen-Image-2.1's real transformer width with "
                                     f"{num_layers} of its 32 blocks, {dtype}. Not a trained model.\n")
    return out


def _write_model_index(out: Path, sample_sigmas=None) -> None:
    import diffusers

    index = {
        "_class_name": PIPELINE_CLASS,
        "_diffusers_version": diffusers.__version__,
        "processor": ["transformers", "Qwen3VLProcessor"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3VLForConditionalGeneration"],
        "transformer": ["diffusers", "QwenImage21Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage21"],
        "sample_sigmas": list(sample_sigmas) if sample_sigmas else None,
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def load_tiny_21_pipeline(checkpoint: str | Path, dtype=torch.float32):
    """diffusers' QwenImage21Pipeline from `checkpoint` through `DiffusionPipeline.from_pretrained`; the processor
    comes from `load_qwen3vl_processor` (the stock class where torchvision is installed, else image-only)."""
    from diffusers import DiffusionPipeline

    from qwen_image_trt.models.processor import load_qwen3vl_processor

    root = Path(checkpoint)
    return DiffusionPipeline.from_pretrained(root, processor=load_qwen3vl_processor(root / "processor"),
                                             dtype=dtype)


__all__ = ["PIPELINE_CLASS", "TRANSFORMER_CONFIG", "VAE_CONFIG", "TEXT_ENCODER", "VISION", "CHAT_TEMPLATE",
           "text_encoder_config", "build_text_encoder", "build_processor", "save_processor", "build_transformer",
           "make_tiny_21_checkpoint", "load_tiny_21_pipeline"]
