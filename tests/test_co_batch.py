"""Co-batching (runtime.co_batch): edit requests with their own condition images run diffusers' own pipeline each, in
threads, and their transformer forwards go as one engine call per step. Each result must equal its call alone."""

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_image_trt import load_pipeline
from qwen_image_trt.runtime.co_batch import call_together, merge_forwards

RED = Image.new("RGB", (80, 48), (220, 30, 30))
BLUE = Image.new("RGB", (64, 96), (20, 40, 230))
GREEN = Image.new("RGB", (160, 96), (20, 200, 30))  # the same aspect as RED: the same resized size and grid
GRAY = Image.new("RGB", (64, 96), (120, 120, 120))


def _call(prompt, images, seed, n=1, negative=" ", steps=2, **kw):
    return dict(prompt=prompt, image=images, negative_prompt=negative, true_cfg_scale=4.0, height=64, width=64,
                num_inference_steps=steps, num_images_per_prompt=n, output_type="np",
                generator=[torch.Generator("cpu").manual_seed(seed + k) for k in range(n)], **kw)


@pytest.fixture(scope="module")
def edit_pipe(tiny_edit_2511):
    root, engines = tiny_edit_2511
    return load_pipeline(root, engines=engines, backend="onnxruntime")


def _calls():
    # different prompts, negative prompts of different lengths (text padded per call), different images, n 2 and 1;
    # the first two resize their condition images to the same sizes, the third has one image: another token count
    return [_call("a red cat wearing a hat", [RED, BLUE], 1, n=2),
            _call("green", [GREEN, GRAY], 7, negative="blurry, low quality, extra words"),
            _call("one image", [GRAY], 3)]


def test_edit_calls_share_each_steps_engine_call_and_equal_their_runs_alone(edit_pipe):
    alone = [edit_pipe(**c).images for c in _calls()]
    outs, batcher = call_together(edit_pipe, _calls())
    for want, got in zip(alone, outs):
        assert want.shape == got.images.shape
        np.testing.assert_allclose(got.images, want, atol=1e-5)
    # 2 steps x 2 CFG branches; each round: the first two requests' forwards in one engine call, the third alone
    assert (batcher.rounds, batcher.forwards) == (4, 12)
    assert batcher.engine_calls == [(2, 1)] * 4


def test_a_failing_call_leaves_and_the_others_finish(edit_pipe):
    ended = []

    def stop(_pipe, i, _t, _kw):
        raise RuntimeError(f"stopped at step {i}")

    def watch(_pipe, i, _t, _kw):
        ended.append(i)
        return {}

    calls = [_call("a red cat wearing a hat", [RED, BLUE], 1, steps=2, callback_on_step_end=watch),
             _call("green", [GREEN, GRAY], 7, steps=2, callback_on_step_end=stop)]
    with pytest.raises(RuntimeError, match="stopped at step 0"):
        call_together(edit_pipe, calls)
    assert ended == [0, 1]  # the other call did not wait for the one that left
    assert edit_pipe.transformer.co_batcher is None  # the drop-in is back to plain calls


def test_merge_pads_text_and_keeps_each_samples_grids(edit_pipe):
    tr = edit_pipe.transformer
    g = torch.Generator().manual_seed(0)
    width, text_width = tr.config["in_channels"], tr.config["joint_attention_dim"]

    def forward(batch, text_len, shapes):
        tokens = sum(f * h * w for f, h, w in shapes)
        return dict(hidden_states=torch.randn(batch, tokens, width, generator=g),
                    encoder_hidden_states=torch.randn(batch, text_len, text_width, generator=g),
                    encoder_hidden_states_mask=torch.ones(batch, text_len, dtype=torch.long),
                    timestep=torch.rand(batch, generator=g), img_shapes=[shapes] * batch)

    # same token count (40), other grid layouts: the drop-in groups them by layout inside the merged call
    a, b = forward(2, 20, [(1, 4, 4), (1, 2, 6), (1, 6, 2)]), forward(1, 45, [(1, 4, 4), (1, 4, 6)])
    merged, sizes = merge_forwards([a, b])
    assert sizes == [2, 1] and merged["encoder_hidden_states"].shape[1] == 45
    assert merged["encoder_hidden_states_mask"][:2, 20:].any().item() is False
    out = tr.forward_tensor(**merged)
    np.testing.assert_allclose(out[:2], tr.forward_tensor(**a), atol=1e-5)
    np.testing.assert_allclose(out[2:], tr.forward_tensor(**b), atol=1e-5)
