"""The diffusers pipeline contract on engine pipelines: the stock call signature, callback tensors honoured,
`pipe.to(...)`, VAE slicing/tiling and CPU offload either working or refused by name, and the batched-CFG loop
pinned to the installed diffusers so a change upstream fails here instead of drifting."""

import hashlib
import inspect

import numpy as np
import pytest
import torch

from qwen_image_trt import load_pipeline
from qwen_image_trt.core.errors import InputError

KW = dict(prompt="a red fox in the snow", negative_prompt="blurry", true_cfg_scale=4.0, height=64, width=64,
          num_inference_steps=3, output_type="np")

# sha256 of diffusers 0.42.1's QwenImagePipeline.__call__ source: runtime/pipeline.py's batched-CFG loop is a copy of
# it. When diffusers changes that loop this fails: read the diff, carry it into _call_batched_cfg, update the hash.
STOCK_LOOP = {"0.42.1": "f69b37d7e65c08f6c0059316ae3b58e534a6786f5aff73673d14884561c7e2bf"}


def stock_loop_drift(source: str, version: str) -> str | None:
    """None when `source` is the loop the copy was made from, else what to do."""
    digest = hashlib.sha256(source.encode()).hexdigest()
    pinned = STOCK_LOOP.get(version)
    if pinned == digest:
        return None
    return (f"QwenImagePipeline.__call__ of diffusers {version} (sha256 {digest[:16]}) is not the loop "
            f"runtime/pipeline.py copies (pinned: {pinned or 'none for this version'}): review _call_batched_cfg "
            "against it, then pin the new hash in tests/test_contract.py")


def test_the_batched_loop_is_pinned_to_the_installed_diffusers():
    import diffusers
    from diffusers import QwenImagePipeline

    source = inspect.getsource(QwenImagePipeline.__call__)
    assert stock_loop_drift(source, diffusers.__version__) is None, stock_loop_drift(source, diffusers.__version__)
    changed = source + "\n# an upstream edit"
    assert "review _call_batched_cfg" in stock_loop_drift(changed, diffusers.__version__)
    assert "none for this version" in stock_loop_drift(source, "0.99.0")


@pytest.mark.parametrize("kind", ["text-to-image", "edit-plus", "img2img"])
def test_call_keeps_the_stock_signature_plus_batch_cfg_and_step_cache(kind):
    from qwen_image_trt.models.pipelines import stock_class
    from qwen_image_trt.runtime.pipeline import engine_pipeline_class

    ours = inspect.signature(engine_pipeline_class(kind).__call__).parameters
    stock = inspect.signature(stock_class(kind).__call__).parameters
    assert list(ours)[:-2] == list(stock) and list(ours)[-2:] == ["batch_cfg", "step_cache"]
    assert all(ours[n].default == stock[n].default for n in stock)


def test_a_callback_that_changes_prompt_embeds_is_honoured_by_the_batched_loop(eager_pipe):
    """As in the stock loop: embeddings a callback returns are what later conditional calls see."""
    def swap_at_1(pipe, i, t, tensors):
        if i == 1:
            return {"prompt_embeds": tensors["prompt_embeds"].flip(-1), "latents": tensors["latents"]}
        return tensors

    def final_latents(callback, batch_cfg):
        kw = dict(KW, output_type="latent", callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
        if callback:
            kw["callback_on_step_end"] = callback
        return eager_pipe(**kw, generator=torch.Generator().manual_seed(2), batch_cfg=batch_cfg).images

    stock, batched = final_latents(swap_at_1, False), final_latents(swap_at_1, True)
    assert (stock - batched).abs().max().item() <= 1e-5 * stock.abs().max().item()
    assert (batched - final_latents(None, True)).abs().max().item() > 1e-3  # the change was not ignored


def test_to_dtype_runs_and_to_another_device_is_refused(tiny_checkpoint, tiny_engines):
    pipe = load_pipeline(tiny_checkpoint, engines=tiny_engines, backend="onnxruntime")
    want = pipe(**KW, generator=torch.Generator().manual_seed(1)).images
    pipe.to(torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    assert pipe.text_encoder.dtype == torch.bfloat16 and pipe.dtype == torch.bfloat16
    got = pipe(**KW, generator=torch.Generator().manual_seed(1)).images
    assert got.shape == want.shape and np.isfinite(got).all()
    assert np.abs(got - want).mean() < 0.05  # bf16 text encoder and latents around the same fp32 engines
    for device in ("meta", "cuda:1"):
        with pytest.raises(InputError) as e:
            pipe.transformer.to(device)
        assert e.value.field == "device" and "load_pipeline(device=...)" in e.value.allowed
    with pytest.raises(InputError, match="a floating dtype"):
        pipe.vae.to(torch.int8)


def test_offload_and_vae_tiling_are_refused_by_name_and_slicing_works(ort_pipe):
    with pytest.raises(NotImplementedError, match="enable_model_cpu_offload: the transformer and VAE are engines"):
        ort_pipe.enable_model_cpu_offload()
    with pytest.raises(NotImplementedError, match="enable_sequential_cpu_offload"):
        ort_pipe.enable_sequential_cpu_offload()
    with pytest.raises(NotImplementedError, match="enable_tiling: the VAE engine decodes whole frames"):
        ort_pipe.vae.enable_tiling()
    z = torch.randn(2, 16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    whole = ort_pipe.vae.decode(z).sample
    ort_pipe.vae.enable_slicing()
    try:
        sliced = ort_pipe.vae.decode(z).sample
    finally:
        ort_pipe.vae.disable_slicing()
    assert torch.allclose(whole, sliced, atol=1e-5)


def test_dropins_are_model_mixins_with_the_checkpoint_config(ort_pipe, tiny_checkpoint):
    from diffusers.configuration_utils import ConfigMixin
    from diffusers.models.modeling_utils import ModelMixin

    from qwen_image_trt.models.checkpoint import read_config

    for module, part in ((ort_pipe.transformer, "transformer"), (ort_pipe.vae, "vae")):
        assert isinstance(module, ModelMixin) and isinstance(module, ConfigMixin)
        want = {k: v for k, v in read_config(tiny_checkpoint, part).items() if not k.startswith("_")}
        got = dict(module.config)
        assert {k: list(v) if isinstance(v, tuple) else v for k, v in want.items()} == \
            {k: list(v) if isinstance(v, tuple) else v for k, v in got.items()}
        assert module.device == torch.device("cpu") and module.dtype == torch.float32
    assert ort_pipe.transformer.config.num_layers == 6 and ort_pipe.vae.config.z_dim == 16


def test_save_pretrained_loads_back_onto_the_same_engines(tiny_checkpoint, tiny_engines, tmp_path):
    """pipe.save_pretrained(DIR): load_pipeline(DIR) and DiffusionPipeline.from_pretrained(DIR) run the same engines,
    with no weight of the transformer or VAE copied; a moved or replaced engine folder is refused by name."""
    import json
    import shutil

    from diffusers import DiffusionPipeline

    from qwen_image_trt.core.errors import EngineMismatchError
    from qwen_image_trt.runtime.transformer import EngineTransformer

    engines = tmp_path / "engines"
    shutil.copytree(tiny_engines, engines)
    pipe = load_pipeline(tiny_checkpoint, engines=engines, backend="onnxruntime")
    kw = dict(KW, output_type="latent")
    want = pipe(**kw, generator=torch.Generator().manual_seed(4)).images
    saved = tmp_path / "saved"
    pipe.save_pretrained(saved)
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"  # the stock class: DiffusionPipeline.from_pretrained finds it
    assert index["transformer"] == ["qwen_image_trt.runtime.transformer", "EngineTransformer"]
    assert not list((saved / "transformer").glob("*.safetensors")) and not list((saved / "vae").glob("*.safetensors"))

    again = load_pipeline(saved)
    assert type(again).__name__ == "QwenImageEnginePipeline" and again.backend == "onnxruntime"
    assert torch.equal(again(**kw, generator=torch.Generator().manual_seed(4)).images, want)
    stock = DiffusionPipeline.from_pretrained(saved, torch_dtype=torch.float32)
    assert type(stock).__name__ == "QwenImagePipeline" and isinstance(stock.transformer, EngineTransformer)
    stock.set_progress_bar_config(disable=True)
    got = stock(**kw, generator=torch.Generator().manual_seed(4)).images  # the stock two-call loop, on engines
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()

    shutil.move(engines, tmp_path / "moved")
    with pytest.raises(InputError, match="the engine folder this pipeline was saved with"):
        load_pipeline(saved)
    (tmp_path / "moved").rename(engines)
    manifest = json.loads((engines / "manifest.json").read_text())
    manifest["checkpoint"]["identity"] = "0" * 16  # engines of another checkpoint now sit in that folder
    (engines / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineMismatchError, match="were built from checkpoint 0000"):
        DiffusionPipeline.from_pretrained(saved)


def test_a_dropin_not_made_by_load_pipeline_cannot_be_saved(ort_pipe, tmp_path):
    from qwen_image_trt.runtime.transformer import EngineTransformer

    loose = EngineTransformer(ort_pipe.transformer.runner, dict(ort_pipe.transformer.config))
    with pytest.raises(NotImplementedError, match="not made by load_pipeline"):
        loose.save_pretrained(tmp_path / "t")


def test_several_prompts_with_num_images_per_prompt(ort_pipe, eager_pipe):
    """The stock loop passes img_shapes with one entry per prompt while the latents hold prompts x
    num_images_per_prompt rows (found by diffusers' own test_num_images_per_prompt, docs/diffusers-tests.md)."""
    kw = dict(prompt=["a red cube", "a blue sphere"], num_images_per_prompt=2, height=32, width=32,
              num_inference_steps=2, output_type="np", true_cfg_scale=1.0)
    got = ort_pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    want = eager_pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert got.shape == want.shape == (4, 32, 32, 3)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(got[0] - got[2]).max() > 1e-3  # the two prompts' images differ: rows not mixed up
