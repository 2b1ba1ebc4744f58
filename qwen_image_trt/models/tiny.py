"""A tiny random-weight Qwen-Image checkpoint built from the real diffusers/transformers classes.

It keeps the structure that matters for export and serving (double-stream MMDiT blocks, 2x2 latent
packing, an x8 causal VAE, a Qwen2.5-VL text encoder, the flow-matching scheduler, a chat-template
tokenizer whose system prefix is 34 tokens like the real one) at a size that runs on 2 CPU cores
in seconds. Weights are seeded, so the same files come out every time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

# Text the pipeline wraps every prompt in (diffusers QwenImagePipeline.prompt_template_encode).
SYSTEM_PREFIX = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
    "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
TEXT_HIDDEN = 64  # text encoder width == transformer joint_attention_dim

TRANSFORMER_CONFIG = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=6, attention_head_dim=32,
    num_attention_heads=2, joint_attention_dim=TEXT_HIDDEN, guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)
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
    """A byte-level BPE tokenizer trained locally; the system prefix encodes to 34 tokens as in Qwen's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    fast = Qwen2TokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                              pad_token="<|endoftext|>", unk_token=None, model_max_length=32768)
    n = len(fast(SYSTEM_PREFIX).input_ids)
    if n != 34:  # the pipeline drops exactly 34 template tokens; anything else would eat the prompt
        raise RuntimeError(f"tiny tokenizer encodes the system prefix to {n} tokens, expected 34")
    return fast


def build_text_encoder(tokenizer, seed: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    vocab_size = len(tokenizer)
    ids = dict(bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
               eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
               pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    head_dim = TEXT_HIDDEN // 2
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=4096, **ids,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                              mrope_section=[head_dim // 8, 3 * head_dim // 16,
                                                             3 * head_dim // 16])),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT_HIDDEN,
                           fullatt_block_indexes=[0]),
        image_token_id=vocab_size - 2, video_token_id=vocab_size - 1,
        vision_start_token_id=vocab_size - 4, vision_end_token_id=vocab_size - 3, **ids,
    )
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.generation_config.bos_token_id = ids["bos_token_id"]
    model.generation_config.eos_token_id = ids["eos_token_id"]
    model.generation_config.pad_token_id = ids["pad_token_id"]
    return model


def make_tiny_checkpoint(out_dir: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a tiny Qwen-Image checkpoint in the diffusers layout and return its path."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(out / "tokenizer")
    # The vision token ids only need to exist: the text-to-image path never feeds images.
    text_encoder = build_text_encoder(tokenizer, seed)
    text_encoder.save_pretrained(out / "text_encoder")

    torch.manual_seed(seed + 1)
    transformer = QwenImageTransformer2DModel(**TRANSFORMER_CONFIG).eval()
    _scale_up_modulation(transformer)
    transformer.save_pretrained(out / "transformer")

    torch.manual_seed(seed + 2)
    AutoencoderKLQwenImage(**VAE_CONFIG).eval().save_pretrained(out / "vae")

    FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG).save_pretrained(out / "scheduler")

    import diffusers

    index = {
        "_class_name": "QwenImagePipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "TINY_RANDOM_WEIGHTS.txt").write_text(
        f"Random weights (seed {seed}) made by qwen_image_trt.models.tiny for tests. Not a trained model.\n")
    return out


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
