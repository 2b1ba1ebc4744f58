"""Calibration: the shipped prompt set, `qitrt calibrate` determinism, resume/skip, and its checks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qwen_image_trt.calibration.capture import CalibrationSet, calibrate, make_settings
from qwen_image_trt.calibration.prompts import CATEGORIES, LANGUAGES, load_prompts, select_prompts
from qwen_image_trt.core.errors import InputError

SMALL = dict(num_prompts=4, steps=2, sizes="64x64", holdout=1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_set(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("calib") / "a"
    m = calibrate(tiny_checkpoint, out, seed=3, progress=False, **SMALL)
    return out, m


def test_prompt_set_is_large_varied_and_unique():
    prompts = load_prompts()
    assert len(prompts) >= 500
    assert {p["lang"] for p in prompts} == set(LANGUAGES)
    assert {p["category"] for p in prompts} == set(CATEGORIES)
    assert {p["length"] for p in prompts} == {"short", "medium", "long"}
    assert len({p["id"] for p in prompts}) == len(prompts)
    assert len({p["text"] for p in prompts}) == len(prompts)
    for lang in LANGUAGES:
        for cat in CATEGORIES:
            assert sum(p["lang"] == lang and p["category"] == cat for p in prompts) >= 30, (lang, cat)
    lengths = sorted(len(p["text"]) for p in prompts if p["lang"] == "en")
    assert lengths[0] < 50 and lengths[-1] > 150  # short and long prompts


def test_select_prompts_is_stratified_and_deterministic():
    a, b, c = select_prompts(10, seed=1), select_prompts(10, seed=1), select_prompts(10, seed=2)
    assert [p["id"] for p in a] == [p["id"] for p in b]
    assert [p["id"] for p in a] != [p["id"] for p in c]
    assert {(p["lang"], p["category"]) for p in a} == {(lang, cat) for lang in LANGUAGES for cat in CATEGORIES}
    with pytest.raises(InputError):
        select_prompts(0)
    with pytest.raises(InputError):
        select_prompts(len(load_prompts()) + 1)


def test_calibration_records_transformer_inputs(small_set, tiny_checkpoint):
    from qwen_image_trt.models.checkpoint import checkpoint_identity, read_config

    out, m = small_set
    assert m.checkpoint.identity == checkpoint_identity(tiny_checkpoint)
    assert [s.split for s in m.samples] == ["calib"] * 3 + ["holdout"]
    # The stock pipeline with true CFG: a conditional and an unconditional call per step.
    assert m.totals["calib_calls"] == 3 * 2 * 2 and m.totals["holdout_calls"] == 2 * 2
    for s in m.samples:
        assert s.size == [64, 64] and s.prompt_id.startswith("p") and isinstance(s.seed, int)
        assert [(c.step, c.branch) for c in s.calls] == [(0, "cond"), (0, "uncond"), (1, "cond"), (1, "uncond")]
        assert all(c.batch == 1 and c.grid == [1, 4, 4] for c in s.calls)
        assert s.calls[0].text_len != s.calls[1].text_len  # prompt vs " ": each branch keeps its own length
    assert len({s.seed for s in m.samples}) == 4
    cs = CalibrationSet(out)
    calls = list(cs.calls("calib"))
    assert len(calls) == 12
    hs = calls[0]["hidden_states"]
    assert hs.shape == (1, 16, 64) and calls[0]["encoder_hidden_states_mask"].dtype == torch.bool
    assert calls[0]["timestep"].shape == (1,) and torch.equal(calls[0]["timestep"], calls[1]["timestep"])
    assert not torch.equal(calls[0]["timestep"], calls[2]["timestep"])
    # Replay inputs: text padded to the runtime bucket, RoPE rebuilt, ExportableTransformer order.
    args = next(cs.export_inputs(read_config(tiny_checkpoint, "transformer")["axes_dims_rope"]))
    assert len(args) == 8 and args[1].shape[1] % 32 == 0 and args[4].shape[0] == 16


def test_calibration_is_deterministic_and_skips_when_unchanged(small_set, tiny_checkpoint, tmp_path):
    out, m = small_set
    again = calibrate(tiny_checkpoint, tmp_path / "b", seed=3, progress=False, **SMALL)
    assert again.set_id == m.set_id
    assert [s.sha256 for s in again.samples] == [s.sha256 for s in m.samples]
    other = calibrate(tiny_checkpoint, tmp_path / "c", seed=4, progress=False, **SMALL)
    assert other.set_id != m.set_id
    # Unchanged: nothing re-recorded (a pipeline that would fail if called proves it).
    skipped = calibrate(tiny_checkpoint, tmp_path / "b", seed=3, progress=False, pipe=object(), **SMALL)
    assert not skipped.ran and skipped.set_id == m.set_id


def test_calibration_resumes_after_a_lost_shard(small_set, tiny_checkpoint, tmp_path):
    out, m = small_set
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / m.samples[1].file).unlink()
    with pytest.raises(Exception, match="missing or changed"):
        CalibrationSet(copy)
    redone = calibrate(tiny_checkpoint, copy, seed=3, progress=False, **SMALL)
    assert redone.set_id == m.set_id and redone.ran


def test_calibration_checks_before_work(tiny_checkpoint, small_set, tmp_path):
    with pytest.raises(InputError, match="num_prompts"):
        make_settings(tiny_checkpoint, num_prompts=2, steps=4, sizes="64x64,96x64,64x96")
    with pytest.raises(InputError, match="forwards per size"):
        make_settings(tiny_checkpoint, num_prompts=1, steps=2, sizes="64x64", holdout=0, record_every=2)
    with pytest.raises(InputError, match="steps"):
        make_settings(tiny_checkpoint, steps=0)
    with pytest.raises(InputError, match=r"steps=1 .*\[2, "):  # Qwen-Image's shift_terminal: 1 step is NaN
        make_settings(tiny_checkpoint, steps=1)
    with pytest.raises(InputError, match="sizes"):
        make_settings(tiny_checkpoint, sizes="65x64")
    out, _ = small_set
    cs = CalibrationSet(out)
    cs.check_sizes([(64, 64)])
    with pytest.raises(InputError, match="too few for 128x128"):
        cs.check_sizes([(64, 64), (128, 128)])
    with pytest.raises(InputError, match="recorded from this checkpoint"):
        cs.check_checkpoint("0123456789abcdef")
    with pytest.raises(InputError, match="qitrt calibrate"):
        CalibrationSet(tmp_path)


def test_calibrate_cli(tiny_checkpoint, small_set, tmp_path, capsys):
    from qwen_image_trt.cli import main

    out, m = small_set
    args = ["calibrate", str(tiny_checkpoint), "--out", str(out), "--num-prompts", "4", "--steps", "2",
            "--sizes", "64x64", "--holdout", "1", "--seed", "3"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert m.set_id in text and "skipped" in text
    assert main(["calibrate", str(tiny_checkpoint), "--out", str(tmp_path / "x"), "--num-prompts", "0"]) == 2
    assert "num_prompts" in capsys.readouterr().err
    saved = json.loads((out / "manifest.json").read_text())
    assert saved["stage"] == "calibrate" and saved["schema_version"] >= 2


def test_recorded_calls_replay_to_the_pipelines_own_noise_predictions(tiny_checkpoint, tmp_path):
    """Each recorded call, fed back through the transformer as quantization replays it (text padded to the
    runtime bucket, mask and RoPE rebuilt), gives the noise prediction the pipeline computed at that step."""
    from qwen_image_trt.calibration.capture import replay_inputs
    from qwen_image_trt.models.checkpoint import load_transformer, read_config
    from qwen_image_trt.models.pipelines import load_stock_pipeline
    from qwen_image_trt.models.transformer_export import ExportableTransformer

    pipe = load_stock_pipeline(tiny_checkpoint)
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, kw, out: seen.append(out[0].detach().clone()),
                                                  with_kwargs=True)
    calibrate(tiny_checkpoint, tmp_path / "set", num_prompts=2, steps=2, sizes="64x64", holdout=0, seed=5,
              pipe=pipe, progress=False)
    hook.remove()
    calls = list(CalibrationSet(tmp_path / "set").calls("calib"))
    assert len(calls) == len(seen) == 2 * 2 * 2
    module = ExportableTransformer(load_transformer(tiny_checkpoint)).eval()
    axes = read_config(tiny_checkpoint, "transformer")["axes_dims_rope"]
    for call, want in zip(calls, seen):
        args = replay_inputs(call, axes)
        padding = args[2][:, call["encoder_hidden_states"].shape[1]:]
        assert not padding.any(), "replay marks the padded text tokens as valid (mask not rebuilt)"
        with torch.no_grad():
            got = module(*args)
        err = (got - want).abs().max().item()
        assert err < 1e-4, f"step {call['step']} {call['branch']}: the replayed call gives a prediction {err:.2e} " \
                           "away from the pipeline's (inputs, mask or RoPE recorded or rebuilt wrongly)"
