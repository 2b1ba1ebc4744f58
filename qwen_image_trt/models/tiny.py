"""Random-weight Qwen-Image checkpoints built from the real diffusers/transformers classes.

- `make_tiny_checkpoint`: the structure that matters for export and serving (double-stream MMDiT blocks,
  2x2 latent packing, an x8 causal VAE, a Qwen2.5-VL text encoder, the flow-matching scheduler, a
  chat-template tokenizer whose system prefix is 34 tokens like the real one) at a size that runs on 2 CPU
  cores in seconds. Marked `TINY_RANDOM_WEIGHTS.txt`: stages use their tiny defaults (64x64, 8 prompts).
- `make_real_width_checkpoint`: Qwen-Image's REAL transformer config (width 3072, 24 heads x 128,
  joint_attention_dim 3584, RoPE axes (16, 56, 56)) with N of its 60 blocks, a one-layer Qwen2.5-VL text
  encoder of the real width 3584, the tiny VAE and tokenizer. ~0.38 B parameters per block, so 1-4 blocks
  measure what the 60-block build will cost (`benchmarks/scale_build.py`). Marked `RANDOM_WEIGHTS.txt`,
  NOT the tiny marker: every stage treats it as a real checkpoint (real default sizes and calibration
  settings, real resource plan), so pass small settings explicitly when speed matters.
- `make_sparse_checkpoint`: configs of the real model (60 blocks, Qwen2.5-VL-7B text encoder) and
  safetensors files whose headers describe every real tensor while the data is a sparse hole (no disk
  used). Nothing can run from it; it sizes and plans a build before downloading 57 GB.

Weights are seeded, so the same files come out every time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from qwen_image_trt.models.checkpoint import TINY_MARKER  # stages use their tiny defaults when it is present

# Text the pipeline wraps every prompt in (diffusers QwenImagePipeline.prompt_template_encode).
SYSTEM_PREFIX = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
    "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
)
# The edit pipelines' system prompt (QwenImageEditPipeline.prompt_template_encode); they drop its first 64 tokens.
EDIT_SYSTEM_PREFIX = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n"
)
# One added token spanning part of the edit system prompt brings it to 64 tokens without touching the text-to-image
# prefix (found by trying every end of the span against the trained merges; checked when the tokenizer is built).
_EDIT_SPAN = EDIT_SYSTEM_PREFIX[EDIT_SYSTEM_PREFIX.index(" the key"):EDIT_SYSTEM_PREFIX.index(" meets")]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
TEXT_HIDDEN = 64  # text encoder width == transformer joint_attention_dim

TRANSFORMER_CONFIG = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=6, attention_head_dim=32,
    num_attention_heads=2, joint_attention_dim=TEXT_HIDDEN, guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)
# Qwen/Qwen-Image transformer/config.json: the real model, width and all (num_layers is set per checkpoint).
REAL_TRANSFORMER_CONFIG = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
)
REAL_TEXT_HIDDEN = REAL_TRANSFORMER_CONFIG["joint_attention_dim"]
# Qwen2.5-VL-7B-Instruct (Qwen-Image's text_encoder): what a sparse real checkpoint describes.
REAL_TEXT_ENCODER = dict(
    text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
              num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000),
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                fullatt_block_indexes=[7, 15, 23, 31]),
)
# The real-width checkpoint's text encoder: real width and head layout (28 x 128, 4 KV heads), one layer,
# a small MLP. Its output is what the transformer's txt_in sees, so the whole pipeline runs at real width.
REAL_WIDTH_TEXT_ENCODER = dict(hidden=REAL_TEXT_HIDDEN, heads=28, kv_heads=4, intermediate=256, layers=1)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
RANDOM_MARKER = "RANDOM_WEIGHTS.txt"  # informative only: a real-config checkpoint with random weights
VAE_CONFIG = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                  temperal_downsample=[False, True, True])
# Qwen-Image's own scheduler settings (dynamic exponential shift).
SCHEDULER_CONFIG = dict(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, num_train_timesteps=1000,
    shift=1.0, shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True,
)

_CORPUS_WORDS = (
    "a an the of and with in on at by for to from under over near beside behind portrait photo painting "
    "cat dog bird horse fish tree flower mountain river city street house room window door table chair cup "
    "red orange yellow green blue purple black white gray gold silver pink brown bright dark soft warm cold "
    "big small tall short round square old young happy quiet sunset sunrise night morning rain snow fog "
    "woman man child girl boy people crowd face hands smiling wearing holding sign text reads says letters "
    "poster logo menu book cover neon light shadow reflection water glass metal wood stone paper fabric "
    "style watercolor oil sketch anime cinematic realistic detailed minimal isometric render 3d pixel art "
    "close-up wide angle view background foreground center left right top bottom lens bokeh film grain"
).split()
_CORPUS_ZH = "一只猫坐在窗台上阳光洒进来城市夜景霓虹灯写着欢迎光临山水画中国风可爱的小狗在草地上奔跑海报标题文字红色蓝色"


def _tokenizer_corpus() -> list[str]:
    lines = [SYSTEM_PREFIX + "x<|im_end|>\n<|im_start|>assistant\n"] * 200
    for i in range(len(_CORPUS_WORDS)):
        lines.append(" ".join(_CORPUS_WORDS[i:i + 12]))
    lines += [_CORPUS_ZH[i:i + 8] for i in range(0, len(_CORPUS_ZH), 4)]
    return lines


def build_tokenizer():
    """A byte-level BPE tokenizer trained locally; the system prefixes encode to as many tokens as the pipelines
    drop (34 for text-to-image, 64 for edit), as with Qwen's own tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    fast = Qwen2TokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                              pad_token="<|endoftext|>", unk_token=None, model_max_length=32768)
    fast.add_tokens([AddedToken(_EDIT_SPAN, normalized=False)])
    for prefix, want in ((SYSTEM_PREFIX, 34), (EDIT_SYSTEM_PREFIX, 64)):
        n = len(fast(prefix).input_ids)
        if n != want:  # the pipeline drops exactly `want` template tokens; anything else would eat the prompt
            raise RuntimeError(f"tiny tokenizer encodes a system prefix to {n} tokens, expected {want}")
    return fast


def build_text_encoder(tokenizer, seed: int, hidden: int = TEXT_HIDDEN, heads: int = 2, kv_heads: int = 1,
                       intermediate: int = 128, layers: int = 2):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(
        text_encoder_config(tokenizer, hidden, heads, kv_heads, intermediate, layers)).eval()
    ids = _token_ids(tokenizer)
    model.generation_config.bos_token_id = ids["bos_token_id"]
    model.generation_config.eos_token_id = ids["eos_token_id"]
    model.generation_config.pad_token_id = ids["pad_token_id"]
    return model


def _token_ids(tokenizer) -> dict:
    return dict(bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"))


def _vision_token_ids(tokenizer) -> dict:
    """The ids the text encoder looks for in input_ids, taken from the tokenizer so the processor's
    <|image_pad|> runs are the tokens the vision tower's features replace."""
    ids = {key: tokenizer.convert_tokens_to_ids(tok) for key, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    unknown = [k for k, v in ids.items() if v is None or v == tokenizer.unk_token_id]
    if unknown:
        raise RuntimeError(f"tokenizer lacks the vision tokens for {', '.join(unknown)}")
    return ids


def text_encoder_config(tokenizer, hidden: int = TEXT_HIDDEN, heads: int = 2, kv_heads: int = 1,
                        intermediate: int = 128, layers: int = 2, vision: dict | None = None):
    """A Qwen2.5-VL config for `tokenizer`'s vocabulary; Qwen's mrope split (16, 24, 24 at head_dim 128)."""
    from transformers import Qwen2_5_VLConfig

    vocab_size = len(tokenizer)
    ids = _token_ids(tokenizer)
    head_dim = hidden // heads
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, **ids,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                              mrope_section=[head_dim // 8, 3 * head_dim // 16,
                                                             3 * head_dim // 16])),
        vision_config=vision or dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                                     spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
                                     fullatt_block_indexes=[0]),
        **_vision_token_ids(tokenizer), **ids,
    )


# --pipeline kind -> (the diffusers pipeline class model_index.json names, transformer config overrides).
# Edit-Plus is the 2509 release; 2511 is the same pipeline with a transformer that conditions the condition-image
# tokens on timestep 0 (`zero_cond_t`).
PIPELINE_KINDS = {
    "t2i": ("QwenImagePipeline", {}),
    "edit": ("QwenImageEditPipeline", {}),
    "edit-plus": ("QwenImageEditPlusPipeline", {}),
    "edit-2511": ("QwenImageEditPlusPipeline", {"zero_cond_t": True}),
    "controlnet": ("QwenImageControlNetPipeline", {}),
}
CONTROLNET_LAYERS = 2  # of the tiny transformer's 6: each residual feeds 3 blocks (InstantX's Union: 5 of 60)
# The vision tower sees at most 8 x 8 patches of 14 px (16 merged tokens) per condition image: real structure,
# CPU cost of a few text tokens. Real checkpoints keep Qwen's own 56^2..28^2*1280 px range.
TINY_PROCESSOR_PIXELS = dict(min_pixels=56 * 56, max_pixels=112 * 112)


def build_processor(tokenizer):
    """A Qwen2-VL processor (image patches + the tokenizer) for the edit pipelines' text encoder."""
    from qwen_image_trt.models.processor import ImageOnlyQwen2VLProcessor, image_processor_class

    image_processor = image_processor_class()(patch_size=14, temporal_patch_size=2, merge_size=2,
                                              **TINY_PROCESSOR_PIXELS)
    return ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


def make_tiny_checkpoint(out_dir: str | Path, seed: int = 0, overwrite: bool = False, pipeline: str = "t2i") -> Path:
    """Write a tiny Qwen-Image checkpoint of kind `pipeline` (see PIPELINE_KINDS) and return its path.

    Every kind has the same text encoder (with its vision tower), VAE and scheduler; edit kinds add a `processor`
    folder and name their pipeline class in model_index.json, so diffusers' own pipeline runs them eagerly.
    """
    from diffusers import QwenImageTransformer2DModel

    if pipeline not in PIPELINE_KINDS:
        raise ValueError(f"pipeline {pipeline!r}: one of {', '.join(PIPELINE_KINDS)}")
    class_name, overrides = PIPELINE_KINDS[pipeline]
    out = _empty_folder(out_dir, overwrite)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(out / "tokenizer")
    if class_name != "QwenImagePipeline":
        from qwen_image_trt.models.processor import save_processor

        save_processor(build_processor(tokenizer), out / "processor")
    text_encoder = build_text_encoder(tokenizer, seed)
    text_encoder.save_pretrained(out / "text_encoder")

    torch.manual_seed(seed + 1)
    transformer = QwenImageTransformer2DModel(**TRANSFORMER_CONFIG, **overrides).eval()
    _scale_up_modulation(transformer)
    transformer.save_pretrained(out / "transformer")
    if class_name == "QwenImageControlNetPipeline":
        tiny_controlnet(transformer, seed).save_pretrained(out / "controlnet")

    _write_vae_scheduler_index(out, seed, class_name)
    (out / TINY_MARKER).write_text(
        f"Random weights (seed {seed}, kind {pipeline}) made by qwen_image_trt.models.tiny for tests. "
        "Not a trained model.\n")
    return out


def make_tiny_controlnet(checkpoint: str | Path, out_dir: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """A tiny QwenImageControlNetModel for an existing checkpoint's transformer, saved on its own (as InstantX
    ships theirs): `load_pipeline(CKPT, pipeline="controlnet", controlnet=OUT)`."""
    from diffusers import QwenImageTransformer2DModel

    out = _empty_folder(out_dir, overwrite)
    transformer = QwenImageTransformer2DModel.from_pretrained(Path(checkpoint) / "transformer", torch_dtype=torch.float32)
    tiny_controlnet(transformer, seed).save_pretrained(out)
    return out


def tiny_controlnet(transformer, seed: int):
    """A ControlNet made from the transformer as InstantX's was (its first blocks' weights), with the zero-initialised
    input embedder and output projections given random weights: a zero ControlNet would make parity blind to it."""
    from diffusers import QwenImageControlNetModel

    c = transformer.config
    torch.manual_seed(seed + 3)
    net = QwenImageControlNetModel.from_transformer(transformer, num_layers=CONTROLNET_LAYERS,
                                                    attention_head_dim=c.attention_head_dim,
                                                    num_attention_heads=c.num_attention_heads).eval()
    g = torch.Generator().manual_seed(seed + 4)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_x_embedder", "controlnet_blocks")):
                p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() > 1 else 0.02))
    return net


def _empty_folder(out_dir, overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write_vae_scheduler_index(out: Path, seed: int, class_name: str = "QwenImagePipeline") -> None:
    """The tiny VAE (seed + 2, fp32), the scheduler and model_index.json: the same in every checkpoint made here."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed + 2)
    AutoencoderKLQwenImage(**VAE_CONFIG).eval().save_pretrained(out / "vae")
    FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG).save_pretrained(out / "scheduler")
    _write_model_index(out, class_name)


def _write_model_index(out: Path, class_name: str = "QwenImagePipeline") -> None:
    import diffusers

    index = {
        "_class_name": class_name,
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }
    if (out / "processor").is_dir():
        index["processor"] = ["transformers", "Qwen2VLProcessor"]
    if (out / "controlnet").is_dir():
        index["controlnet"] = ["diffusers", "QwenImageControlNetModel"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


@torch.no_grad()
def _cast_floats(module, dtype) -> None:
    """Cast floating-point parameters and buffers in place, one tensor at a time (ModelMixin.to warns about
    modules to keep in fp32 even when there are none)."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point() and t.dtype != dtype:
            t.data = t.data.to(dtype)


@torch.no_grad()
def _scale_up_modulation(transformer) -> None:
    """Give the zero-initialised output layers some weight, so the model's output depends on its input.

    diffusers initialises a few layers (e.g. norm_out, proj_out) to small or zero values in some versions;
    a random test model whose prediction ignores the prompt would make parity checks meaningless.
    """
    g = torch.Generator().manual_seed(1234)
    for name, p in transformer.named_parameters():
        if p.dim() >= 1 and torch.count_nonzero(p) == 0 and "bias" not in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def real_transformer_config(num_layers: int = 60) -> dict:
    """Qwen-Image's transformer config with `num_layers` double-stream blocks (60 in the real model)."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= 60:
        raise ValueError(f"num_layers {num_layers!r}: an integer in [1, 60] (Qwen-Image has 60 blocks)")
    return {**REAL_TRANSFORMER_CONFIG, "num_layers": num_layers}


def make_real_width_checkpoint(out_dir: str | Path, num_layers: int = 1, seed: int = 0, dtype: str = "bf16",
                               overwrite: bool = False) -> Path:
    """Write a checkpoint with Qwen-Image's real transformer config and `num_layers` blocks; return its path.

    Transformer and text encoder weights are saved in `dtype` ("bf16" like the real checkpoint, or "fp32"; the
    tiny VAE stays fp32), seeded (`seed`: same files every time). ~0.38 B transformer parameters per block plus ~40 M outside the
    blocks: 1 block is 0.76 GB in bf16, 4 blocks 2.9 GB (5.8 GB in fp32). Building it holds the transformer
    once in fp32 (random init), so 4 blocks need ~6 GB of host memory.
    The pipeline runs end to end: the text encoder is a one-layer Qwen2.5-VL of the real width 3584.
    Marked RANDOM_WEIGHTS.txt, not TINY_RANDOM_WEIGHTS.txt: stages treat it as a real checkpoint.
    """
    from diffusers import QwenImageTransformer2DModel

    config = real_transformer_config(num_layers)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    out = _empty_folder(out_dir, overwrite)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(out / "tokenizer")
    build_text_encoder(tokenizer, seed, **REAL_WIDTH_TEXT_ENCODER).to(torch_dtype).save_pretrained(out / "text_encoder")

    torch.manual_seed(seed + 1)
    transformer = QwenImageTransformer2DModel(**config).eval()
    _scale_up_modulation(transformer)
    _cast_floats(transformer, torch_dtype)
    transformer.save_pretrained(out / "transformer")
    del transformer

    _write_vae_scheduler_index(out, seed)
    (out / RANDOM_MARKER).write_text(
        f"Random weights (seed {seed}, {dtype}) made by qwen_image_trt.models.tiny.make_real_width_checkpoint: "
        f"Qwen-Image's real transformer config with {num_layers} of its 60 blocks, a one-layer text encoder of "
        "the real width, the tiny VAE. For measuring and testing at real width. Not a trained model.\n")
    return out


def make_sparse_checkpoint(out_dir: str | Path, num_layers: int = 60, overwrite: bool = False) -> Path:
    """Write the real Qwen-Image's configs (`num_layers` blocks, Qwen2.5-VL-7B text encoder) with weight files
    whose safetensors headers describe every real tensor in bf16 and whose data is a sparse hole.

    Takes a few KB of disk and no weights in memory; `weights_info`, `checkpoint_identity` and the build
    plan read it like the real 57 GB download. Loading its weights would give zeros: it is for sizing only.
    The VAE is the tiny one in fp32 (the real one is 0.25 GB, a rounding error beside the transformer).
    """
    from diffusers import QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = real_transformer_config(num_layers)
    out = _empty_folder(out_dir, overwrite)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(out / "tokenizer")

    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel(**config)
    transformer.save_config(out / "transformer")
    write_sparse_safetensors(out / "transformer" / "diffusion_pytorch_model.safetensors",
                             {k: ("BF16", tuple(v.shape)) for k, v in transformer.state_dict().items()})
    del transformer

    t, v = REAL_TEXT_ENCODER["text"], REAL_TEXT_ENCODER["vision"]
    te_config = text_encoder_config(tokenizer, t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"],
                                    t["intermediate_size"], t["num_hidden_layers"], vision=dict(v))
    te_config.text_config.vocab_size = t["vocab_size"]
    te_config.tie_word_embeddings = False
    with torch.device("meta"):
        text_encoder = Qwen2_5_VLForConditionalGeneration(te_config)
    te_config.save_pretrained(out / "text_encoder")
    write_sparse_safetensors(out / "text_encoder" / "model.safetensors",
                             {k: ("BF16", tuple(p.shape)) for k, p in text_encoder.state_dict().items()})
    del text_encoder

    _write_vae_scheduler_index(out, 0)
    (out / RANDOM_MARKER).write_text(
        "Sparse checkpoint made by qwen_image_trt.models.tiny.make_sparse_checkpoint: the real configs, weight "
        "files of the real size whose data is a hole (zeros). For sizing and build plans only.\n")
    return out


def write_sparse_safetensors(path: str | Path, tensors: dict[str, tuple[str, tuple]]) -> int:
    """A valid safetensors file for {name: (dtype, shape)} (dtype as safetensors spells it: "BF16", "F32")
    whose data region is a hole: the header is written, then the file is extended to its full size.
    Returns the file size."""
    import struct

    widths = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "F8_E4M3": 1}
    header, offset = {}, 0
    for name in sorted(tensors):
        dtype, shape = tensors[name]
        n = widths[dtype]
        for d in shape:
            n *= int(d)
        header[name] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data region to 8 bytes
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        fh.truncate(8 + len(blob) + offset)
    return 8 + len(blob) + offset


# -- tiny LoRAs ----------------------------------------------------------------------------------------
LORA_FORMATS = ("peft", "kohya", "lightning")
# Modules a typical Qwen-Image LoRA adapts (attention of both streams and the image MLP), per block.
TINY_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_v_proj",
                     "img_mlp.net.0.proj", "img_mlp.net.2")


def make_tiny_lora(checkpoint: str | Path, out_file: str | Path, fmt: str = "peft", rank: int = 4, seed: int = 0,
                   strength: float = 0.5, targets=TINY_LORA_TARGETS, alpha: float | None = None) -> Path:
    """Write a random LoRA for `checkpoint`'s transformer in one of the release formats diffusers reads:

    - "peft": diffusers' own `save_lora_weights` (keys `transformer.<module>.lora_A.weight`);
    - "kohya": `lora_unet_<module_with_underscores>.lora_down/.lora_up.weight` plus `.alpha`;
    - "lightning": the Qwen-Image-Lightning release's layout, `<module>.lora_down/.lora_up.weight` plus `.alpha`.
    `strength` sets how far the adapter moves each weight (relative to the weight's own scale)."""
    from diffusers import QwenImagePipeline

    if fmt not in LORA_FORMATS:
        from qwen_image_trt.core.errors import InputError

        raise InputError("format", fmt, f"one of {', '.join(LORA_FORMATS)}")
    config = json.loads((Path(checkpoint) / "transformer" / "config.json").read_text())
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    shapes = {"attn.to_q": (inner, inner), "attn.to_k": (inner, inner), "attn.to_v": (inner, inner),
              "attn.to_out.0": (inner, inner), "attn.add_q_proj": (inner, inner), "attn.add_k_proj": (inner, inner),
              "attn.add_v_proj": (inner, inner), "attn.to_add_out": (inner, inner),
              "img_mlp.net.0.proj": (4 * inner, inner), "img_mlp.net.2": (inner, 4 * inner),
              "txt_mlp.net.0.proj": (4 * inner, inner), "txt_mlp.net.2": (inner, 4 * inner)}
    g = torch.Generator().manual_seed(seed)
    alpha = float(rank if alpha is None else alpha)
    tensors: dict[str, torch.Tensor] = {}
    for block in range(config["num_layers"]):
        for target in targets:
            out_f, in_f = shapes[target]
            down = torch.randn(rank, in_f, generator=g) / in_f ** 0.5
            # PEFT scales by alpha / rank at run time: undo it here so `strength` is what the weight moves by.
            up = torch.randn(out_f, rank, generator=g) * strength / rank ** 0.5 * (rank / alpha)
            module = f"transformer_blocks.{block}.{target}"
            if fmt == "peft":
                tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = down, up
                continue
            key = f"lora_unet_{module.replace('.', '_')}" if fmt == "kohya" else module
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "peft":
        # diffusers writes the file (and its own metadata: ranks and alphas) exactly as a trained adapter's.
        from peft import LoraConfig

        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets))
        QwenImagePipeline.save_lora_weights(str(out_file.parent), transformer_lora_layers=tensors,
                                            weight_name=out_file.name,
                                            transformer_lora_adapter_metadata=config.to_dict())
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_file))
    return out_file
