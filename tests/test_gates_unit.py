"""Parity gates and image metrics (parity/gates.py, parity/metrics.py) in exact numbers: each gate at its limit, the
documented defaults, overrides and their messages, PSNR/SSIM on images whose answers are known."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from qwen_image_trt.core.errors import InputError
from qwen_image_trt.parity import metrics as pm
from qwen_image_trt.parity.gates import DEFAULT_GATES, Gates, apply_gates, gates_for

NAMES = ("forward_cosine_min, forward_rel_l2_max, image_psnr_min, image_ssim_min, quant_block_rel_err_max, "
         "quant_mismatch_max, step_cosine_min")


def _refused(excinfo, field, value, allowed):
    e = excinfo.value
    assert (e.field, e.value, e.allowed) == (field, value, allowed)


def test_documented_defaults():  # docs/parity.md lists these
    assert {p: g.as_dict() for p, g in DEFAULT_GATES.items()} == {
        "fp32": dict(forward_cosine_min=0.99999, forward_rel_l2_max=1e-3, step_cosine_min=0.9999, image_psnr_min=40.0,
                     image_ssim_min=0.99, quant_mismatch_max=None, quant_block_rel_err_max=None),
        "fp16": dict(forward_cosine_min=0.999, forward_rel_l2_max=5e-2, step_cosine_min=0.99, image_psnr_min=30.0,
                     image_ssim_min=0.95, quant_mismatch_max=None, quant_block_rel_err_max=None),
        "bf16": dict(forward_cosine_min=0.995, forward_rel_l2_max=1e-1, step_cosine_min=0.98, image_psnr_min=28.0,
                     image_ssim_min=0.93, quant_mismatch_max=None, quant_block_rel_err_max=None),
        "int8": dict(forward_cosine_min=0.99, forward_rel_l2_max=0.15, step_cosine_min=0.98, image_psnr_min=35.0,
                     image_ssim_min=0.95, quant_mismatch_max=0.75, quant_block_rel_err_max=0.25),
        "fp8": dict(forward_cosine_min=0.99, forward_rel_l2_max=0.15, step_cosine_min=0.98, image_psnr_min=35.0,
                    image_ssim_min=0.95, quant_mismatch_max=0.25, quant_block_rel_err_max=0.25)}


def test_gates_for_each_precision():
    for p in ("fp32", "fp16", "bf16", "int8", "fp8"):
        assert gates_for(p) is DEFAULT_GATES[p]
    with pytest.raises(InputError) as e:
        gates_for("int4")
    _refused(e, "precision", "int4", "one of fp32, fp16, bf16, int8, fp8")


def test_override_by_name():
    g = gates_for("fp16").override(["image_psnr_min=25", "forward_cosine_min=0.9", "image_psnr_min=26.5"])
    assert g.image_psnr_min == 26.5 and g.forward_cosine_min == 0.9 and isinstance(g.image_psnr_min, float)
    assert g.step_cosine_min == 0.99 and gates_for("fp16").image_psnr_min == 30.0  # the defaults are untouched
    assert gates_for("fp16").override([]) == gates_for("fp16")
    assert gates_for("fp32").override(["quant_mismatch_max=0.5"]).quant_mismatch_max == 0.5
    assert gates_for("fp32").override(["image_ssim_min= 0.5 "]).image_ssim_min == 0.5
    for bad in ("psnr=30", "=3", "IMAGE_PSNR_MIN=3", "image_psnr_min 30"):
        with pytest.raises(InputError) as e:
            gates_for("fp16").override([bad])
        _refused(e, "gate", bad, f"NAME=VALUE with NAME one of {NAMES}")
    for item, value in (("image_psnr_min=high", "high"), ("image_psnr_min=", ""), ("step_cosine_min=1=2", "1=2"),
                        ("image_psnr_min", "")):
        with pytest.raises(InputError) as e:
            gates_for("fp16").override([item])
        _refused(e, f"gate {item.partition('=')[0]}", value, "a number")
        assert e.value.__suppress_context__


def _data(cos=(0.999, 0.9995), rel=(0.01, 0.02), step=(0.995, 0.999), psnr=(36.0, 40.0), ssim=(0.97, 0.99),
          finite=(True, True), quantization=None):
    return {"forward": [{"cosine": c, "rel_l2": r, "finite": f} for c, r, f in zip(cos, rel, finite)],
            "per_step": [{"cosine": c} for c in step], "images": [{"psnr_db": p, "ssim": s} for p, s in zip(psnr, ssim)],
            "quantization": quantization}


def _gates(**kw):
    base = dict(forward_cosine_min=0.999, forward_rel_l2_max=0.02, step_cosine_min=0.995, image_psnr_min=36.0,
                image_ssim_min=0.97)
    return Gates(**{**base, **kw})


def test_worst_figures_against_their_limits():
    out = apply_gates(_data(), _gates())
    assert out == [  # each worst figure equal to its limit: passes
        {"name": "forward_cosine_min", "kind": "min", "value": 0.999, "limit": 0.999, "ok": True},
        {"name": "forward_rel_l2_max", "kind": "max", "value": 0.02, "limit": 0.02, "ok": True},
        {"name": "step_cosine_min", "kind": "min", "value": 0.995, "limit": 0.995, "ok": True},
        {"name": "image_psnr_min", "kind": "min", "value": 36.0, "limit": 36.0, "ok": True},
        {"name": "image_ssim_min", "kind": "min", "value": 0.97, "limit": 0.97, "ok": True},
        {"name": "all_outputs_finite", "kind": "min", "value": 1.0, "limit": 1.0, "ok": True}]
    assert all(type(r["ok"]) is bool for r in out)
    worse = apply_gates(_data(), _gates(forward_cosine_min=0.9991, forward_rel_l2_max=0.0199, step_cosine_min=0.9951,
                                        image_psnr_min=36.01, image_ssim_min=0.9701))
    assert [r["ok"] for r in worse] == [False] * 5 + [True]
    assert [r["value"] for r in worse] == [0.999, 0.02, 0.995, 36.0, 0.97, 1.0]


def test_one_non_finite_forward_fails():
    out = apply_gates(_data(finite=(True, False)), _gates())
    assert out[-1] == {"name": "all_outputs_finite", "kind": "min", "value": 0.0, "limit": 1.0, "ok": False}
    assert type(out[-1]["value"]) is float


def test_quantization_evidence_is_gated_when_there_is_some():
    q = {"mismatch": 0.3, "block_rel_err": 0.2}

    def names(out):
        return [r["name"] for r in out]
    assert "quant_mismatch_max" not in names(apply_gates(_data(quantization=q), _gates()))  # no quantization gates
    assert "quant_mismatch_max" not in names(apply_gates(_data(quantization={}), _gates(quant_mismatch_max=1.0)))
    assert "quant_mismatch_max" not in names(apply_gates(_data(quantization={"skipped": "bf16"}),
                                                         _gates(quant_mismatch_max=1.0)))
    out = apply_gates(_data(quantization=q), _gates(quant_mismatch_max=0.3, quant_block_rel_err_max=0.19))
    assert out[5:] == [
        {"name": "quant_mismatch_max", "kind": "max", "value": 0.3, "limit": 0.3, "ok": True},
        {"name": "quant_block_rel_err_max", "kind": "max", "value": 0.2, "limit": 0.19, "ok": False},
        {"name": "all_outputs_finite", "kind": "min", "value": 1.0, "limit": 1.0, "ok": True}]
    data = {k: v for k, v in _data().items() if k != "quantization"}  # older reports have no such key
    assert len(apply_gates(data, _gates(quant_mismatch_max=0.3))) == 6


def _images(seed=0, shape=(16, 16, 3)):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, size=shape, dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, size=shape), 0, 255).astype(np.uint8)
    return a, b


def test_psnr_in_decibels():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # identical images: the cap, not a division by zero
        assert pm.psnr(a, b) == 200.0 == pm.PSNR_CAP_DB
    b[0, 0, 0] = 255  # one value off by 255 over 48: mse = 255^2 / 48
    assert pm.psnr(a, b) == pytest.approx(10 * math.log10(48))
    assert pm.psnr(b, a) == pm.psnr(a, b)  # no uint8 wrap-around either way
    c = np.full((2, 2, 3), 10, np.uint8)
    assert pm.psnr(c, c + 1) == pytest.approx(20 * math.log10(255))  # mse 1
    x, y = _images()
    mse = np.mean((x.astype(float) - y.astype(float)) ** 2)
    assert pm.psnr(x, y) == pytest.approx(10 * math.log10(255 ** 2 / mse))


@pytest.mark.parametrize("shape,win", [((16, 16, 3), 7), ((7, 9, 3), 7), ((5, 9, 3), 5), ((9, 3, 3), 3)])
def test_ssim_of_rgb_images_with_a_window_that_fits(shape, win):
    x, y = _images(1, shape)
    want = structural_similarity(x, y, channel_axis=-1, data_range=255, win_size=win)
    assert pm.ssim(x, y) == pytest.approx(want, abs=1e-12) and isinstance(pm.ssim(x, y), float)
    assert pm.ssim(x, x) == pytest.approx(1.0)


def test_ssim_of_images_in_0_255_whatever_their_type():
    x, y = _images(2, (16, 16, 3))
    assert pm.ssim(x.astype(np.float64), y.astype(np.float64)) == pytest.approx(pm.ssim(x, y), abs=1e-12)


def test_diff_image_amplifies_and_saturates():
    ref = np.array([[[0, 100, 255], [7, 7, 7]]], np.uint8)
    got = np.array([[[10, 90, 0], [7, 7, 7]]], np.uint8)
    d = pm.diff_image(ref, got)
    assert d.dtype == np.uint8 and d.tolist() == [[[80, 80, 255], [0, 0, 0]]]
    assert pm.diff_image(ref, got, gain=1.0).tolist() == [[[10, 10, 255], [0, 0, 0]]]
    assert pm.diff_image(got, ref, gain=0.5).tolist() == [[[5, 5, 127], [0, 0, 0]]]


@pytest.mark.parametrize("side", [3, 4, 5, 6])
def test_ssim_of_images_smaller_than_its_window(side):
    """The window shrinks to the largest odd size that fits (it was one too large for 4 and 6 px)."""
    from qwen_image_trt.parity.metrics import ssim

    a = np.random.default_rng(side).integers(0, 256, (side, side + 5, 3), dtype=np.uint8)
    b = a.copy()
    b[0, 0] = 255 - b[0, 0]
    assert ssim(a, a) == pytest.approx(1.0) and ssim(a, b) < 1.0


def test_ssim_refuses_images_too_small_for_any_window():
    from qwen_image_trt.core.errors import InputError
    from qwen_image_trt.parity.metrics import ssim

    with pytest.raises(InputError, match="at least 3x3"):
        ssim(np.zeros((2, 9, 3), np.uint8), np.zeros((2, 9, 3), np.uint8))
