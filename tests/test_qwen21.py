"""Tiny Qwen-Image-2.1 checkpoints (`qitrt tiny OUT --pipeline qwen-image-2.1`): diffusers' own QwenImage21Pipeline
runs them eagerly with and without a condition image, the processor's special tokens are the text encoder's, the
transformer's prefix KV cache ("extract" then "cached") equals the uncached forward, the Turbo modular pipeline runs
them, and every stage that cannot run a 2.1 checkpoint yet refuses it by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_image_trt.cli import main

PROMPT = "a red cat on a window sill"
RNG = np.random.RandomState(0)
IMAGE = Image.fromarray((RNG.rand(64, 64, 3) * 255).astype("uint8"))
OTHER_IMAGE = Image.fromarray((RNG.rand(64, 64, 3) * 255).astype("uint8"))
# 64x64 output, condition images resized to ~64x64 (output_resolution: the pipeline's default 1024 would encode a
# 1024x1024 condition image), two steps.
RUN = {"height": 64, "width": 64, "num_inference_steps": 2, "output_type": "latent"}
IMAGE_RUN = {**RUN, "output_resolution": 64}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Written by the CLI, in process."""
    out = tmp_path_factory.mktemp("q21") / "qwen-image-2.1-tiny"
    assert main(["tiny", out, "--pipeline", "qwen-image-2.1"]) == 0
    return out


@pytest.fixture(scope="module")
def pipe(root):
    """diffusers' DiffusionPipeline.from_pretrained on the folder. The processor is handed in: the stock
    Qwen3VLProcessor also builds a video processor, which needs torchvision (not installed here);
    `load_qwen3vl_processor` returns the stock class where it loads, else the same parts without video."""
    from diffusers import DiffusionPipeline

    from qwen_image_trt.models.processor import load_qwen3vl_processor

    p = DiffusionPipeline.from_pretrained(root, processor=load_qwen3vl_processor(root / "processor"),
                                          dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


def _run(pipe, seed=0, **kw):
    return pipe(generator=torch.Generator().manual_seed(seed), **kw).images


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# -- (d) the CLI writes it ----------------------------------------------------------------------------------------
def test_cli_writes_a_21_checkpoint(root, tmp_path, capsys):
    from qwen_image_trt.models.checkpoint import TINY_MARKER
    from qwen_image_trt.models.tiny21 import TRANSFORMER_CONFIG, build_transformer

    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImage21Pipeline"
    assert {k: v[1] for k, v in index.items() if isinstance(v, list)} == {
        "processor": "Qwen3VLProcessor", "scheduler": "FlowMatchEulerDiscreteScheduler",
        "text_encoder": "Qwen3VLForConditionalGeneration", "transformer": "QwenImage21Transformer2DModel",
        "vae": "AutoencoderKLQwenImage21"}
    assert (root / TINY_MARKER).is_file()
    config = json.loads((root / "transformer" / "config.json").read_text())
    assert config["causal_condition"] is True and config["_class_name"] == "QwenImage21Transformer2DModel"
    head_dim = config["attention_head_dim"]
    assert sum(config["axes_dims_rope"]) == head_dim and all(d % 2 == 0 for d in config["axes_dims_rope"])
    assert json.loads((root / "text_encoder" / "config.json").read_text())["model_type"] == "qwen3_vl"
    assert {"chat_template.jinja", "video_preprocessor_config.json"} <= {p.name for p in (root / "processor").iterdir()}
    # seeded: the transformer on disk is the one the builder makes (seed + 1)
    from diffusers import QwenImage21Transformer2DModel

    saved = QwenImage21Transformer2DModel.from_pretrained(root / "transformer").state_dict()
    rebuilt = build_transformer(1).state_dict()
    assert saved.keys() == rebuilt.keys() and all(torch.equal(saved[k], rebuilt[k]) for k in saved)
    assert config["num_layers"] == TRANSFORMER_CONFIG["num_layers"]
    # an existing folder is not overwritten; the 2.1 kind has no real-width variant
    capsys.readouterr()
    assert main(["tiny", root, "--pipeline", "qwen-image-2.1"]) == 2
    assert "out=" in capsys.readouterr().err
    assert main(["tiny", tmp_path / "rw", "--pipeline", "qwen-image-2.1", "--real-width"]) == 2
    assert "pipeline=" in capsys.readouterr().err


# -- (b) special token ids ----------------------------------------------------------------------------------------
def test_processor_special_tokens_are_the_text_encoders(root, pipe):
    te = json.loads((root / "text_encoder" / "config.json").read_text())
    processor, tok = pipe.processor, pipe.processor.tokenizer
    for key, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        assert te[key] == tok.convert_tokens_to_ids(token) == getattr(processor, key)
        assert tok.encode(token) == [te[key]]  # one token, as the pipeline's `encode(...)[0]` assumes
    assert pipe._img_token_id == te["image_token_id"] == pipe.text_encoder.config.image_token_id
    assert te["text_config"]["pad_token_id"] == tok.pad_token_id
    # the template tokens the pipeline drops are exactly the system turn: what is left starts with the user turn
    ids = tok(pipe.prompt_template_t2i.format(PROMPT)).input_ids
    assert tok.decode(ids[pipe._drop_idx:]).startswith("<|im_start|>user\n" + PROMPT)
    # a 64x64 condition image: 16 px patches merged 2x2 -> 4 <|image_pad|> slots, each the 2x2 group of the VAE's
    # x16 latents the transformer's img_mask expands it to
    out = processor(text=[pipe.prompt_template_ti2i.format(PROMPT)], images=[IMAGE], return_tensors="pt")
    n_pad = int((out["input_ids"] == te["image_token_id"]).sum())
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]] and n_pad == 4 == (64 // 16) ** 2 // 4


# -- (a) the stock pipeline runs it eagerly ------------------------------------------------------------------------
def test_stock_pipeline_text_to_image(pipe):
    assert type(pipe).__name__ == "QwenImage21Pipeline"
    a = _run(pipe, prompt=PROMPT, **RUN)
    assert a.shape == (1, 16, 64) and torch.isfinite(a).all()  # (64 / 16)^2 unpatched tokens of 64 channels
    assert torch.equal(a, _run(pipe, prompt=PROMPT, **RUN))
    assert _rel(_run(pipe, prompt="a blue dog in the snow", **RUN), a) > 1e-3
    assert _rel(_run(pipe, seed=1, prompt=PROMPT, **RUN), a) > 1e-2
    image = _run(pipe, prompt=PROMPT, **{**RUN, "output_type": "np"})
    assert image.shape == (1, 64, 64, 4) and np.isfinite(image).all()  # the 2.1 VAE decodes RGBA


def test_stock_pipeline_with_an_input_image(pipe):
    a = _run(pipe, prompt=PROMPT, image=IMAGE, **IMAGE_RUN)
    assert a.shape == (1, 16, 64) and torch.isfinite(a).all()
    assert torch.equal(a, _run(pipe, prompt=PROMPT, image=IMAGE, **IMAGE_RUN))
    # the condition image reaches the target through the text encoder's vision tokens and the transformer's attention
    # to its latents; a random tiny model moves the 2-step latents by ~1e-3 of their range (fp32 reruns: exactly 0)
    assert _rel(_run(pipe, prompt=PROMPT, image=OTHER_IMAGE, **IMAGE_RUN), a) > 2e-4
    assert _rel(_run(pipe, prompt="a blue dog in the snow", image=IMAGE, **IMAGE_RUN), a) > 1e-3
    assert _rel(_run(pipe, prompt=PROMPT, **RUN), a) > 1e-3
    # the prefix KV cache (on by default) changes nothing in fp32
    assert _rel(_run(pipe, prompt=PROMPT, image=IMAGE, use_kv_cache=False, **IMAGE_RUN), a) <= 1e-5


# -- (c) causal_condition and the KV-cache modes --------------------------------------------------------------------
def _transformer_inputs(batch=2, text=(5, 7), cond=(4, 4), target=(4, 4), pad=3, seed=0):
    """The pipeline's layout: [text, condition-image slots, text, padding] from the encoder, one slot per 2x2 latent
    group, then the target image's slots; sample 1's prompt is `pad` tokens shorter (right-padded)."""
    g = torch.Generator().manual_seed(seed)
    slots = cond[0] * cond[1] // 4
    n_vlm = text[0] + slots + text[1]
    img_mask = torch.zeros(batch, n_vlm + target[0] * target[1] // 4, dtype=torch.bool)
    img_mask[:, text[0]:text[0] + slots] = True
    img_mask[:, n_vlm:] = True
    mask = torch.ones(batch, n_vlm, dtype=torch.long)
    mask[1, n_vlm - pad:] = 0
    return dict(encoder_hidden_states=torch.randn(batch, n_vlm, 64, generator=g), encoder_hidden_states_mask=mask,
                img_mask=img_mask, img_shapes=[[(1, *cond), (1, *target)]] * batch,
                cond=torch.randn(batch, cond[0] * cond[1], 64, generator=g), target_tokens=target[0] * target[1])


def test_transformer_kv_cache_modes_equal_the_uncached_forward(pipe):
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    tr = pipe.transformer
    assert tr.config.causal_condition
    kw = _transformer_inputs()
    cond, n = kw.pop("cond"), kw.pop("target_tokens")
    g = torch.Generator().manual_seed(1)
    x0, x1 = (torch.cat([cond, torch.randn(2, n, 64, generator=g)], 1) for _ in range(2))
    t0, t1 = torch.tensor([0.9, 0.9]), torch.tensor([0.4, 0.4])

    def fwd(x, t, **extra):
        with torch.no_grad():
            return tr(hidden_states=x, timestep=t, return_dict=False, **kw, **extra)[0]

    cache = QwenImage21KVCache(len(tr.transformer_blocks))
    full0 = fwd(x0, t0)
    extract0 = fwd(x0, t0, kv_cache=cache, kv_cache_mode="extract")
    assert extract0.shape == full0.shape and _rel(extract0, full0) <= 1e-6  # prefill computes everything
    prefix = full0.shape[1] - n  # text (padding included) + condition-image tokens
    for layer in cache.layer_caches:
        assert layer.k.shape == layer.v.shape == (2, prefix, tr.config.num_attention_heads,
                                                  tr.config.attention_head_dim)
    # the prefix is step-independent (t = 0 modulation, block-causal: it never sees the target)
    other = QwenImage21KVCache(len(tr.transformer_blocks))
    fwd(x1, t1, kv_cache=other, kv_cache_mode="extract")
    assert all(torch.allclose(a.k, b.k, atol=1e-6) and torch.allclose(a.v, b.v, atol=1e-6)
               for a, b in zip(cache.layer_caches, other.layer_caches))
    # decode: only the target's tokens, equal to the uncached forward's at another step and latents
    full1 = fwd(x1, t1)
    cached1 = fwd(x1, t1, kv_cache=cache, kv_cache_mode="cached")
    assert cached1.shape == (2, n, 64) and _rel(cached1, full1[:, -n:]) <= 1e-5
    assert _rel(fwd(x0, t0, kv_cache=cache, kv_cache_mode="cached"), extract0[:, -n:]) <= 1e-5
    assert _rel(full1[:, -n:], full0[:, -n:]) > 1e-2  # timestep and latents matter
    assert _rel(fwd(x1, t0)[:, -n:], full1[:, -n:]) > 1e-3  # the timestep alone matters
    with pytest.raises(ValueError, match="kv_cache_mode"):
        fwd(x1, t1, kv_cache=cache, kv_cache_mode="prefill")


# -- the 2.1 Turbo modular pipeline --------------------------------------------------------------------------------
TURBO_SIGMAS = [1.0, 0.5]


def test_turbo_modular_pipeline_loads_and_runs_it(root, pipe, tmp_path):
    """A Turbo checkpoint is a QwenImage21Pipeline folder whose model_index.json ships `sample_sigmas`: diffusers maps
    it to QwenImage21TurboModularPipeline (no guider, the shipped grid). Loaded from the folder (the processor handed
    in, see `pipe`), it gives the stock pipeline's latents for the same sigmas, with and without an input image."""
    import shutil

    from diffusers import ModularPipeline

    from qwen_image_trt.models.processor import load_qwen3vl_processor

    # (a str: ModularPipeline.from_pretrained keeps a Path, and load_components then fails on it)
    assert type(ModularPipeline.from_pretrained(str(root))).__name__ == "QwenImage21ModularPipeline"  # no sigmas: base
    turbo_root = shutil.copytree(root, tmp_path / "turbo")
    index = json.loads((turbo_root / "model_index.json").read_text())
    (turbo_root / "model_index.json").write_text(json.dumps({**index, "sample_sigmas": TURBO_SIGMAS}))
    turbo = ModularPipeline.from_pretrained(str(turbo_root))
    assert type(turbo).__name__ == "QwenImage21TurboModularPipeline"
    turbo.load_components(names=["text_encoder", "vae", "transformer", "scheduler"], dtype=torch.float32)
    turbo.update_components(processor=load_qwen3vl_processor(turbo_root / "processor"))
    turbo.set_progress_bar_config(disable=True)
    for kw in ({}, {"image": IMAGE, "output_resolution": 64}):
        got = turbo(prompt=PROMPT, generator=torch.Generator().manual_seed(0), height=64, width=64,
                    output_type="np", **kw).values["images"]
        want = _run(pipe, prompt=PROMPT, sigmas=TURBO_SIGMAS, height=64, width=64, output_type="np", **kw)
        assert np.asarray(got).shape == (1, 64, 64, 4) and np.abs(np.asarray(got) - want).max() <= 1e-5


# -- (e) stages that cannot run it yet refuse it by name ---------------------------------------------------------
@pytest.mark.parametrize("command", [["sensitivity", "--precision", "int8", "--target-cosine", "0.99", "--out",
                                      "{tmp}/sens"]])
def test_stages_without_2_1_refuse_it_by_name(root, tmp_path, capsys, command):
    """Export, calibrate, quantize, build, generate, parity and serve take a 2.1 checkpoint
    (tests/test_qwen21_engines.py, test_qwen21_quantize.py, test_serve_qwen21.py); the per-layer sensitivity sweep
    does not yet, and says so in one line, before writing anything."""
    args = [a.format(tmp=tmp_path) for a in command]
    assert main([args[0], root, *args[1:]]) == 2
    err = capsys.readouterr().err
    assert "Qwen-Image-2.1 checkpoint (QwenImage21Pipeline)" in err and "does not take 2.1" in err
    assert len(err.strip().splitlines()) == 1 and not any(tmp_path.iterdir())


def test_serve_takes_a_21_checkpoint_but_not_a_split_encoder(root):
    """The server's start check (what `qitrt serve` runs before binding a port or starting a worker): a 2.1
    checkpoint serves whole (tests/test_serve_qwen21.py); the encoder/denoiser split is refused by name."""
    from qwen_image_trt.core.errors import CheckpointError
    from qwen_image_trt.serve.app import check_start
    from qwen_image_trt.serve.config import ServerConfig

    check_start(ServerConfig(checkpoint=str(root)))
    with pytest.raises(CheckpointError, match=r"Qwen-Image-2.1 checkpoint \(QwenImage21Pipeline\): qitrt serve "
                                              r"--role denoiser does not take"):
        check_start(ServerConfig(checkpoint=str(root), role="denoiser", encoder_url="http://127.0.0.1:1"))
