"""Step cache (runtime.step_cache): skipped transformer calls, per branch and per row, on torch and ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qwen_image_trt.core.errors import InputError
from qwen_image_trt.runtime.limits import check_threshold
from qwen_image_trt.runtime.step_cache import ModulatedInput, step_cache

CALL = dict(prompt="a red fox in the snow", negative_prompt="blurry", true_cfg_scale=4.0, height=64, width=64,
            num_inference_steps=8, output_type="np")


def run(pipe, threshold=None, seed=0, **kw):
    image = pipe(**{**CALL, **kw}, generator=torch.Generator().manual_seed(seed), step_cache=threshold).images[0]
    return image, pipe.step_cache_stats


def psnr(a, b) -> float:
    mse = float(((a - b) ** 2).mean())
    return 10 * np.log10(1 / max(mse, 1e-20))


@pytest.mark.parametrize("value", [-0.1, 2.5, float("nan"), "fast", True])
def test_threshold_out_of_range_is_refused_by_name(value):
    with pytest.raises(InputError) as e:
        check_threshold(value)
    assert e.value.field == "step_cache" and "[0, 2]" in str(e.value)


def test_off_values_and_a_bad_threshold_before_any_work(eager_pipe):
    assert check_threshold(None) is None and check_threshold(0) is None and check_threshold("0.25") == 0.25
    with pytest.raises(InputError, match="step_cache"):
        run(eager_pipe, threshold=3.0)
    assert "step_cache" not in vars(eager_pipe.transformer)  # nothing left patched
    _, stats = run(eager_pipe, threshold=None, num_inference_steps=2)
    assert stats is None


def test_tiny_threshold_is_exactly_the_uncached_run(ort_pipe):
    plain, _ = run(ort_pipe)
    cached, stats = run(ort_pipe, threshold=1e-9)
    assert stats.skipped == 0 and stats.computed == 2 * 8  # both CFG rows, every step
    assert np.array_equal(plain, cached)


def test_skips_steps_keeps_first_and_last_and_stays_close(ort_pipe):
    plain, _ = run(ort_pipe)
    cached, stats = run(ort_pipe, threshold=0.5)
    assert stats.skipped > 0 and stats.calls < 8
    steps = {step: (done, skipped) for _branch, step, done, skipped in stats.per_step}
    assert steps[0] == (2, 0) and steps[7] == (2, 0)  # warm-up and the last step always run
    assert sum(skipped for _, skipped in steps.values()) == stats.skipped
    assert 25 < psnr(plain, cached) < 200  # close, but not the same image: steps really were reused


def test_torch_and_onnxruntime_skip_the_same_steps(eager_pipe, ort_pipe):
    """The engine's signal is read from the checkpoint; the torch module's is its own layers: same decisions."""
    eager, eager_stats = run(eager_pipe, threshold=0.3)
    engine, engine_stats = run(ort_pipe, threshold=0.3)
    assert eager_stats.per_step == engine_stats.per_step and eager_stats.skipped > 0
    assert psnr(eager, engine) > 40


def test_stock_loop_keeps_each_cfg_branch_its_own(eager_pipe):
    _, stats = run(eager_pipe, threshold=0.3, batch_cfg=False)  # diffusers' loop: cond and uncond calls
    branches = {b for b, *_ in stats.per_step}
    assert branches == {"cond", "uncond"}
    for branch in branches:
        assert [s for b, s, *_ in stats.per_step if b == branch] == list(range(8))


def _inputs(config, batch, seed):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 16, config["in_channels"], generator=g),
                encoder_hidden_states=torch.randn(batch, 7, config["joint_attention_dim"], generator=g),
                encoder_hidden_states_mask=torch.ones(batch, 7, dtype=torch.long),
                timestep=torch.full((batch,), 0.9), img_shapes=[[(1, 4, 4)]] * batch)


def test_each_row_decides_alone_and_computed_rows_equal_a_solo_call(eager_pipe):
    """Two batched requests: one whose input jumps is recomputed, one whose input holds still reuses its output;
    the recomputed row equals the transformer run on that row alone."""
    transformer = eager_pipe.transformer
    config = dict(transformer.config)
    first = _inputs(config, 2, seed=1)
    second = {**first, "hidden_states": first["hidden_states"].clone()}
    second["hidden_states"][0] = torch.randn(16, config["in_channels"], generator=torch.Generator().manual_seed(9))
    with torch.no_grad(), step_cache(eager_pipe, 0.1) as cache:
        out0 = transformer(**first, return_dict=False)[0]
        out1 = transformer(**second, return_dict=False)[0]
        assert cache.stats.per_step[-1][2:] == (1, 1)  # one row computed, one skipped
    with torch.no_grad():
        solo = transformer(**{k: v[:1] for k, v in second.items()}, return_dict=False)[0]
    assert torch.equal(out1[1], out0[1])
    torch.testing.assert_close(out1[:1], solo, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out1[0], out0[0])


def test_engine_signal_from_checkpoint_equals_the_modules(tiny_checkpoint, eager_pipe):
    config = dict(eager_pipe.transformer.config)
    x, t = torch.randn(2, 16, config["in_channels"]), torch.tensor([0.3, 0.8])
    from_file = ModulatedInput.from_checkpoint(tiny_checkpoint, config)
    torch.testing.assert_close(from_file(x, t), ModulatedInput.of_transformer(eager_pipe.transformer)(x, t))


def test_generate_and_parity_cli(tiny_checkpoint, tiny_engines, tmp_path):
    from qwen_image_trt.cli import main

    out = tmp_path / "fox.png"
    assert main(["generate", str(tiny_checkpoint), "--engines", str(tiny_engines), "--prompt", "a fox",
                 "--negative-prompt", " ", "--steps", "6", "--width", "64", "--height", "64", "--step-cache", "0.4",
                 "--out", str(out)]) in (0, None)
    assert out.stat().st_size > 0
    assert main(["generate", str(tiny_checkpoint), "--prompt", "a fox", "--step-cache", "7", "--out",
                 str(tmp_path / "x.png")]) not in (0, None)
    report = tmp_path / "parity"
    main(["parity", str(tiny_checkpoint), "--engines", str(tiny_engines), "--out", str(report), "--sizes", "64x64",
          "--batches", "1", "--image-size", "64x64", "--steps", "6", "--step-cache", "0.2,0.6"])
    data = json.loads((report / "report.json").read_text())
    rows = data["step_cache"]
    assert {r["threshold"] for r in rows} == {0.2, 0.6} and len(rows) == 2 * len(data["images"])
    by = {t: sum(r["skipped"] for r in rows if r["threshold"] == t) for t in (0.2, 0.6)}
    assert by[0.6] >= by[0.2] and by[0.6] > 0
    assert all(r["psnr_db"] > 20 for r in rows)
    assert "Step cache" in (report / "report.html").read_text()
