"""Runtime: drop-in transformer/VAE vs the stock modules, batched CFG vs two calls, the swapped pipeline."""

import json
import shutil

import numpy as np
import pytest
import torch

from qwen_image_trt import load_pipeline
from qwen_image_trt.core.errors import EngineMismatchError, InputError
from qwen_image_trt.models.checkpoint import load_transformer
from qwen_image_trt.runtime.backends import make_runner
from qwen_image_trt.runtime.backends.onnxruntime_runner import OnnxRuntimeRunner
from qwen_image_trt.runtime.cfg import combine_cfg, stack_cfg_text
from qwen_image_trt.runtime.transformer import EngineTransformer

KW = dict(prompt="a red fox in the snow", negative_prompt="blurry", true_cfg_scale=4.0, height=64, width=96,
          num_inference_steps=3, output_type="np")


def _text(batch, length, width=64, seed=0):
    return torch.randn(batch, length, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_dropin_equals_stock_forward(tiny_checkpoint, tiny_engines, backend):
    stock = load_transformer(tiny_checkpoint)
    runner = make_runner(backend, "transformer", checkpoint=tiny_checkpoint, engines_dir=tiny_engines)
    dropin = EngineTransformer(runner, dict(stock.config), text_bucket=32)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 24, 64, generator=g)
    text = _text(2, 11)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0
    kw = dict(hidden_states=latents, encoder_hidden_states=text, timestep=torch.tensor([0.7, 0.7]),
              img_shapes=[[(1, 4, 6)]] * 2, return_dict=False)
    with torch.no_grad():
        for m in (None, mask):  # the pipeline passes mask=None when nothing is padded
            want = stock(**kw, encoder_hidden_states_mask=m)[0]
            got = dropin(**kw, encoder_hidden_states_mask=m)[0]
            assert (got - want).abs().max().item() <= 1e-5
    # text was padded to one 32-token bucket, and the padded buffer is reused for the next call of that shape
    assert list(dropin._text_buffers) == [(2, 32, 64, torch.device("cpu"))]


def test_cfg_in_one_forward_equals_two_calls(tiny_checkpoint):
    """Both CFG branches of several requests in ONE forward == the stock two forwards (noise prediction)."""
    stock = load_transformer(tiny_checkpoint)
    g = torch.Generator().manual_seed(2)
    batch, grid = 3, (1, 4, 4)
    latents = torch.randn(batch, 16, 64, generator=g)
    cond, uncond = _text(batch, 9, seed=3), _text(batch, 4, seed=4)
    cond_mask = torch.ones(batch, 9, dtype=torch.long)
    cond_mask[0, 6:] = 0  # requests in one batch have different prompt lengths
    t = torch.full((batch,), 0.5)
    scales = [4.0, 2.5, 7.0]
    with torch.no_grad():
        c = stock(hidden_states=latents, encoder_hidden_states=cond, encoder_hidden_states_mask=cond_mask, timestep=t,
                  img_shapes=[[grid]] * batch, return_dict=False)[0]
        u = stock(hidden_states=latents, encoder_hidden_states=uncond, encoder_hidden_states_mask=None, timestep=t,
                  img_shapes=[[grid]] * batch, return_dict=False)[0]
        want = torch.stack([combine_cfg(c[i:i + 1], u[i:i + 1], s)[0] for i, s in enumerate(scales)])
        text, mask = stack_cfg_text(cond, cond_mask, uncond, None)
        both = stock(hidden_states=torch.cat([latents, latents]), encoder_hidden_states=text,
                     encoder_hidden_states_mask=mask, timestep=torch.cat([t, t]), img_shapes=[[grid]] * 2 * batch,
                     return_dict=False)[0]
        got = combine_cfg(*both.chunk(2), scales)
    assert text.shape == (2 * batch, 9, 64)
    assert (got - want).abs().max().item() <= 1e-5


def test_batched_cfg_pipeline_equals_stock_pipeline(eager_pipe):
    calls = []
    hook = eager_pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        stock = eager_pipe(**KW, generator=torch.Generator().manual_seed(0), batch_cfg=False).images
        n_stock = len(calls)
        batched = eager_pipe(**KW, generator=torch.Generator().manual_seed(0)).images
    finally:
        hook.remove()
    assert n_stock == 2 * KW["num_inference_steps"] and len(calls) - n_stock == KW["num_inference_steps"]
    assert np.abs(stock - batched).max() * 255 <= 0.01


def test_swapped_pipeline_equals_eager(eager_pipe, ort_pipe):
    assert isinstance(ort_pipe.transformer.runner, OnnxRuntimeRunner)
    want = eager_pipe(**KW, generator=torch.Generator().manual_seed(5), batch_cfg=False).images
    got = ort_pipe(**KW, generator=torch.Generator().manual_seed(5)).images
    assert np.abs(want - got).max() * 255 <= 0.05
    no_cfg = dict(KW, negative_prompt=None, true_cfg_scale=1.0)  # the plain one-call-per-step path works too
    want = eager_pipe(**no_cfg, generator=torch.Generator().manual_seed(5)).images
    got = ort_pipe(**no_cfg, generator=torch.Generator().manual_seed(5)).images
    assert np.abs(want - got).max() * 255 <= 0.05


def test_several_requests_in_one_batch_equal_their_single_runs(ort_pipe):
    prompts = ["a red fox in the snow", "一只猫坐在窗台上, a neon sign that reads OPEN 24 HOURS"]
    negatives, seeds, scales = ["blurry", " "], [11, 12], [4.0, 2.0]
    base = dict(KW, prompt=None, negative_prompt=None, true_cfg_scale=None)
    batch = ort_pipe(**{**base, "prompt": prompts, "negative_prompt": negatives, "true_cfg_scale": scales},
                     generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    for i in range(2):
        alone = ort_pipe(**{**base, "prompt": prompts[i], "negative_prompt": negatives[i],
                            "true_cfg_scale": scales[i]}, generator=torch.Generator().manual_seed(seeds[i])).images
        assert np.abs(batch[i] - alone[0]).max() * 255 <= 1.0  # at most one 8-bit level
    assert np.abs(batch[0] - batch[1]).max() > 0.05  # and they are different images


def test_engines_from_another_checkpoint_are_refused(tiny_checkpoint, tiny_engines, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoint, other)
    cfg = json.loads((other / "transformer" / "config.json").read_text())
    cfg["num_layers"] = 5
    (other / "transformer" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EngineMismatchError, match="re-export"):
        load_pipeline(other, engines=tiny_engines, backend="onnxruntime")


@pytest.mark.parametrize("kwargs, field", [
    (dict(backend="tensorflow"), "backend"),
    (dict(backend="onnxruntime"), "engines"),
    (dict(backend="torch", engines="somewhere"), "engines"),
    (dict(backend="onnxruntime", engines="/nonexistent/engines"), "engines"),
    (dict(backend="onnxruntime", providers=["cuda"]), "providers"),
])
def test_load_pipeline_bad_input(tiny_checkpoint, tiny_engines, kwargs, field):
    if kwargs.get("providers"):
        kwargs["engines"] = tiny_engines
    with pytest.raises(InputError, match=field):
        load_pipeline(tiny_checkpoint, **kwargs)


def test_request_limits_from_an_engine_manifest():
    from qwen_image_trt.runtime.limits import Limits, check_request

    limits = Limits.from_json({"height": [64, 1664], "width": [64, 1664], "batch": [1, 4],
                               "image_tokens": [256, 6032]})
    check_request("a cat", 928, 1664, 20, limits)
    with pytest.raises(InputError, match=r"size='1664x1664'.*\[256, 6032\]"):
        check_request("a cat", 1664, 1664, 20, limits)  # both sides in range, too many tokens for the profile
    with pytest.raises(InputError, match=r"height=48 .*multiple of 16 in \[64, 1664\]"):
        check_request("a cat", 48, 64, 20, limits)
    with pytest.raises(InputError, match=r"batch=8"):
        check_request("a cat", 256, 256, 20, limits, batch=8)


def test_trt_options_from_flags_reach_the_runner(tiny_engines, tmp_path):
    """--trt-weight-streaming-budget / --trt-cuda-graphs become TensorRTRunner options (no TensorRT needed to
    make a runner: it loads lazily); a malformed budget is refused naming the flag."""
    from qwen_image_trt.core.manifest import TensorRTEngine, read_manifest, write_manifest
    from qwen_image_trt.runtime.backends import make_runner, trt_options

    assert trt_options("auto", True) == {"cuda_graphs": True, "weight_streaming_budget": "auto"}
    assert trt_options("0.25")["weight_streaming_budget"] == 0.25
    assert trt_options("2000000000")["weight_streaming_budget"] == 2_000_000_000
    assert trt_options(None) == {"cuda_graphs": False}
    with pytest.raises(InputError, match="trt_weight_streaming_budget='lots'"):
        trt_options("lots")
    with pytest.raises(InputError, match="weight_streaming_budget=1.5"):
        trt_options("1.5")
    m = read_manifest(tiny_engines)
    m.components["transformer"].tensorrt = TensorRTEngine(
        file="transformer.plan", bytes=1, tensorrt="10.13.0", gpu="H100", compute_capability="9.0", profiles={},
        cache_key="0" * 64, builder={"weight_streaming": True})
    write_manifest(tmp_path, m)
    runner = make_runner("tensorrt", "transformer", engines_dir=tmp_path, device="cuda",
                         trt_options=trt_options("0.5", True))
    assert runner.weight_streaming_budget == 0.5 and runner.graphs.enabled
