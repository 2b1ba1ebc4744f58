"""Calibration capture (calibration/capture.py) without running the pipeline: the settings checks with their exact
bounds and messages, the recorder as a real forward pre-hook, the sample plan, the set's content id and totals,
resume bookkeeping, a hand-written set opened for replay, and replay's text padding. The pipeline-driving parts
(`calibrate`, `_record_prompt`) are checked end to end by tests/test_calibration.py."""

from __future__ import annotations

import hashlib
import json
import logging
import math

import pytest
import torch
from safetensors.torch import save_file

from qwen_image_trt.calibration import capture as cap
from qwen_image_trt.calibration.prompts import load_prompts, prompt_seed, select_prompts
from qwen_image_trt.core.errors import InputError, QitrtError
from qwen_image_trt.core.files import file_sha256
from qwen_image_trt.core.manifest import (
    CalibrationCall,
    CalibrationManifest,
    CalibrationSample,
    CheckpointId,
    write_manifest,
)
from qwen_image_trt.models.transformer_export import RopeTables

AXES = (8, 12, 12)
N_PROMPTS = len(load_prompts())


def _refused(excinfo, field, value, allowed):
    e = excinfo.value
    assert (e.field, e.value, e.allowed) == (field, value, allowed)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Checkpoint folders with what settings read: the scheduler config, and the tiny marker for the tiny one."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from qwen_image_trt.models.checkpoint import TINY_MARKER
    from qwen_image_trt.models.tiny import SCHEDULER_CONFIG

    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for name, shift_terminal in (("tiny", 0.02), ("real", 0.02), ("no_shift", None)):
        FlowMatchEulerDiscreteScheduler(**{**SCHEDULER_CONFIG, "shift_terminal": shift_terminal}).save_pretrained(
            root / name / "scheduler")
        out[name] = root / name
    (out["tiny"] / TINY_MARKER).write_text("tiny")
    return out


# -- settings -----------------------------------------------------------------------------------------------------
def test_default_settings_per_checkpoint(checkpoints):
    assert cap.make_settings(checkpoints["tiny"]) == cap.CalibrationSettings(8, 4, ((64, 64),), 0, 1, 1)
    assert cap.make_settings(checkpoints["real"]) == cap.CalibrationSettings(32, 20, ((1024, 1024),), 0, 4, 2)
    d = cap.default_settings(checkpoints["tiny"])
    d["num_prompts"] = 99  # a copy: the defaults stay as they are
    assert cap.default_settings(checkpoints["tiny"])["num_prompts"] == 8 == cap.TINY_DEFAULTS["num_prompts"]
    assert cap.default_settings(checkpoints["real"]) == {"num_prompts": 32, "steps": 20, "sizes": ((1024, 1024),),
                                                         "record_every": 2}
    # record_every defaults to every second step, but never past the last step
    assert cap.make_settings(checkpoints["no_shift"], steps=1, num_prompts=4).record_every == 1
    assert cap.make_settings(checkpoints["real"], steps=3, num_prompts=4).record_every == 2


def test_settings_as_recorded_in_the_manifest():
    s = cap.CalibrationSettings(4, 2, ((64, 64), (96, 64)), seed=3, holdout=1, record_every=2)
    assert s.as_dict() == {"num_prompts": 4, "steps": 2, "sizes": [[64, 64], [96, 64]], "seed": 3, "holdout": 1,
                           "record_every": 2, "negative_prompt": " ", "true_cfg_scale": 4.0}
    assert cap.CalibrationSettings(4, 2, ((64, 64),)).as_dict()["record_every"] == 1


@pytest.mark.parametrize("n,holdout", [(3, 0), (4, 1), (15, 1), (16, 2), (40, 5)])
def test_default_holdout_is_an_eighth(checkpoints, n, holdout):
    assert cap.make_settings(checkpoints["tiny"], num_prompts=n).holdout == holdout


def test_steps_bounds(checkpoints):
    tiny = checkpoints["tiny"]
    assert cap.make_settings(tiny, steps=2).steps == 2 and cap.make_settings(tiny, steps=200).steps == 200
    for bad in (1, 201, 0, True, 2.0):  # Qwen-Image's shift_terminal makes a 1-step schedule NaN
        with pytest.raises(InputError) as e:
            cap.make_settings(tiny, steps=bad)
        _refused(e, "steps", bad, "an integer in [2, 200]")
    assert cap.make_settings(checkpoints["no_shift"], steps=1, num_prompts=4, record_every=1).steps == 1


def test_seed_and_record_every_bounds(checkpoints):
    tiny = checkpoints["tiny"]
    assert cap.make_settings(tiny, seed=0).seed == 0 and cap.make_settings(tiny, seed=7).seed == 7
    for bad in (-1, False, "1"):
        with pytest.raises(InputError) as e:
            cap.make_settings(tiny, seed=bad)
        _refused(e, "seed", bad, "an integer in [0, inf]")
    assert cap.make_settings(tiny, record_every=4).record_every == 4
    for bad in (0, 5, 1.0):
        with pytest.raises(InputError) as e:
            cap.make_settings(tiny, record_every=bad)
        _refused(e, "record_every", bad, "an integer in [1, 4] (steps=4)")


def test_prompt_count_and_holdout_bounds(checkpoints):
    tiny = checkpoints["tiny"]
    for bad in (0, N_PROMPTS + 1):
        with pytest.raises(InputError) as e:
            cap.make_settings(tiny, num_prompts=bad)
        _refused(e, "num_prompts", bad, f"an integer in [1, {N_PROMPTS}] (size of the shipped prompt set)")
    assert cap.make_settings(tiny, num_prompts=8, holdout=0).holdout == 0
    assert cap.make_settings(tiny, num_prompts=8, holdout=6).holdout == 6
    for bad in (-1, 8, True):
        with pytest.raises(InputError) as e:
            cap.make_settings(tiny, num_prompts=8, holdout=bad)
        _refused(e, "holdout", bad, "an integer in [0, 7] (num_prompts=8 minus one)")


def test_every_size_needs_its_own_prompts(checkpoints):
    tiny = checkpoints["tiny"]
    sizes = "64x64,96x64,64x96"
    assert cap.make_settings(tiny, num_prompts=4, sizes=sizes, holdout=1).sizes == ((64, 64), (96, 64), (64, 96))
    with pytest.raises(InputError) as e:
        cap.make_settings(tiny, num_prompts=4, sizes=sizes, holdout=2)
    _refused(e, "num_prompts", 4, "at least 5 for 3 size(s) and 2 held-out prompt(s): every size needs its own "
                                  "calibration prompts")
    assert cap.make_settings(tiny, num_prompts=2, sizes=[(64, 64), (96, 64)], holdout=0).num_prompts == 2


@pytest.mark.parametrize("kw,per_size", [
    (dict(num_prompts=1, steps=2, record_every=2), 2),
    (dict(num_prompts=3, steps=2, record_every=2, sizes="64x64,96x64"), 2),
    (dict(num_prompts=3, steps=3, record_every=3, sizes="64x64,96x64"), 2),
    (dict(num_prompts=2, steps=2, record_every=2, sizes="64x64,96x64"), 2),
])
def test_too_few_forwards_per_size_are_refused(checkpoints, kw, per_size):
    with pytest.raises(InputError) as e:
        cap.make_settings(checkpoints["tiny"], holdout=0, **kw)
    sizes = len(kw.get("sizes", "64x64").split(","))
    _refused(e, "num_prompts/steps", (kw["num_prompts"], kw["steps"]),
             f"enough to record >= 4 forwards per size (got {per_size} per size for {sizes} size(s)); raise "
             "--num-prompts or --steps")


@pytest.mark.parametrize("kw", [
    dict(num_prompts=1, steps=2, record_every=1),  # 1 prompt x 2 steps x (cond + uncond) = 4: just enough
    dict(num_prompts=1, steps=3, record_every=2),  # steps 0 and 2 are recorded: 1 x 2 x 2
    dict(num_prompts=2, steps=3, record_every=2, sizes="64x64,96x64"),  # one prompt per size: 1 x 2 x 2
])
def test_just_enough_forwards_per_size(checkpoints, kw):
    assert cap.make_settings(checkpoints["tiny"], holdout=0, **kw).num_prompts == kw["num_prompts"]


def test_held_out_prompts_do_not_count_as_calibration_forwards(checkpoints):
    with pytest.raises(InputError) as e:
        cap.make_settings(checkpoints["tiny"], num_prompts=2, steps=2, record_every=2, holdout=1)
    _refused(e, "num_prompts/steps", (2, 2), "enough to record >= 4 forwards per size (got 2 per size for 1 size(s)); "
                                             "raise --num-prompts or --steps")


def test_int_in_messages():
    assert cap._int_in("x", 3, 3) == 3 and cap._int_in("x", 5, 0, 5) == 5
    with pytest.raises(InputError) as e:
        cap._int_in("x", 6, 0, 5, " (why)")
    _refused(e, "x", 6, "an integer in [0, 5] (why)")
    with pytest.raises(InputError) as e:
        cap._int_in("x", 2, 3)
    _refused(e, "x", 2, "an integer in [3, inf]")


# -- the recorder ---------------------------------------------------------------------------------------------------
class _Transformer(torch.nn.Module):
    """Takes what diffusers' QwenImageTransformer2DModel takes (the recorder is a pre-hook: forward is irrelevant)."""

    def forward(self, hidden_states=None, encoder_hidden_states=None, encoder_hidden_states_mask=None, timestep=None,
                img_shapes=None, **kw):
        return hidden_states


def _step(module, t, branch_text_len, batch=1, mask=True, positional=False):
    g = torch.Generator().manual_seed(int(t * 1000) + branch_text_len)
    hs = torch.randn(batch, 4, 8, generator=g)
    ehs = torch.randn(batch, branch_text_len, 6, generator=g).transpose(1, 2).contiguous().transpose(1, 2)
    m = torch.ones(batch, branch_text_len, dtype=torch.long) if mask else None
    kw = dict(encoder_hidden_states=ehs, encoder_hidden_states_mask=m, timestep=torch.full((batch,), t),
              img_shapes=[[(1, 2, 2)]] * batch)
    if positional:
        module(hs, **kw)
    else:
        module(hidden_states=hs, **kw)
    return hs, ehs


def test_recorder_keeps_every_kth_step_with_both_branches():
    module, recorder = _Transformer(), cap._Recorder(record_every=2)
    hook = module.register_forward_pre_hook(recorder, with_kwargs=True)
    seen = []
    for t in (1.0, 0.75, 0.5, 0.25, 0.1):
        seen.append(_step(module, t, 5))  # cond
        seen.append(_step(module, t, 3, mask=False, positional=True))  # uncond: diffusers passes mask=None
    hook.remove()
    assert [(c["step"], c["branch"]) for c in recorder.calls] == [(0, "cond"), (0, "uncond"), (2, "cond"),
                                                                   (2, "uncond"), (4, "cond"), (4, "uncond")]
    for c, (hs, ehs) in zip(recorder.calls, [seen[i] for i in (0, 1, 4, 5, 8, 9)]):
        assert torch.equal(c["hidden_states"], hs) and torch.equal(c["encoder_hidden_states"], ehs)
        assert c["encoder_hidden_states"].is_contiguous() and c["grids"] == [(1, 2, 2)]  # the target only
        assert all(type(v) is int for v in c["grids"][0])
        assert c["encoder_hidden_states_mask"].dtype == torch.bool and c["encoder_hidden_states_mask"].all()
        assert c["encoder_hidden_states_mask"].shape == ehs.shape[:2]
        assert c["timestep"].shape == (1,)
    hs, _ = seen[0]
    hs.add_(1.0)  # the caller reuses its buffers: the recording is a copy
    assert not torch.equal(recorder.calls[0]["hidden_states"], hs)
    assert sorted(recorder.calls[0]) == ["branch", "encoder_hidden_states", "encoder_hidden_states_mask", "grids",
                                         "hidden_states", "step", "timestep"]


def test_recorder_copies_what_the_caller_may_reuse():
    """diffusers reuses its tensors between steps: every recorded tensor is a copy, never a view of the caller's."""
    module, recorder = _Transformer(), cap._Recorder(record_every=1)
    module.register_forward_pre_hook(recorder, with_kwargs=True)
    hs, ehs, t = torch.ones(1, 4, 8), torch.ones(1, 3, 6), torch.tensor([0.5])
    mask = torch.ones(1, 3, dtype=torch.bool)
    module(hidden_states=hs, encoder_hidden_states=ehs, encoder_hidden_states_mask=mask, timestep=t,
           img_shapes=[[(1, 2, 2)]])
    for x in (hs, ehs, t, mask):
        x.zero_()
    c = recorder.calls[0]
    assert c["hidden_states"].all() and c["encoder_hidden_states"].all() and c["timestep"].tolist() == [0.5]
    assert c["encoder_hidden_states_mask"].all()


def test_recorder_counts_steps_by_timestep_and_resets():
    module, recorder = _Transformer(), cap._Recorder(record_every=1)
    module.register_forward_pre_hook(recorder, with_kwargs=True)
    for t in (0.9, 0.9, 0.9, 0.4):  # a third call at one timestep is still the unconditional branch
        _step(module, t, 2, batch=2)
    assert [(c["step"], c["branch"]) for c in recorder.calls] == [(0, "cond"), (0, "uncond"), (0, "uncond"),
                                                                   (1, "cond")]
    assert recorder.calls[0]["timestep"].tolist() == [pytest.approx(0.9)] * 2 and recorder.calls[3]["hidden_states"].shape[0] == 2
    recorder.reset()
    assert recorder.calls == [] and (recorder.step, recorder.branch, recorder._last_t) == (-1, 0, None)
    _step(module, 0.4, 2)  # the same timestep as before the reset: a new prompt starts at step 0
    assert [(c["step"], c["branch"]) for c in recorder.calls] == [(0, "cond")]
    assert recorder(module, (), {"timestep": torch.tensor([0.3]), "encoder_hidden_states": torch.zeros(1, 2, 6),
                                 "hidden_states": torch.zeros(1, 4, 8), "img_shapes": [[(1, 2, 2)]]}) is None
    partial = torch.tensor([[True, False]])
    recorder(module, (), {"timestep": torch.tensor([0.2]), "encoder_hidden_states": torch.zeros(1, 2, 6),
                          "encoder_hidden_states_mask": partial, "hidden_states": torch.zeros(1, 4, 8),
                          "img_shapes": [[(1, 2, 2)]]})
    assert recorder.calls[-1]["encoder_hidden_states_mask"].tolist() == [[True, False]]
    assert recorder.calls[-1]["step"] == 2 and recorder.record_every == 1


# -- the sample plan, the set id, totals, resume -------------------------------------------------------------------
def test_plan_cycles_sizes_for_calibration_then_for_holdout():
    s = cap.CalibrationSettings(5, 2, ((64, 64), (96, 64)), seed=3, holdout=2)
    plan = cap.plan_samples(s)
    prompts = select_prompts(5, 3)
    assert [p[1] for p in plan] == [p["text"] for p in prompts]
    want = [CalibrationSample(index=i, prompt_id=p["id"], lang=p["lang"], category=p["category"],
                              seed=prompt_seed(3, i), size=list(size), split=split,
                              file=f"prompt_{i:04d}_{p['id']}.safetensors")
            for i, (p, size, split) in enumerate(zip(prompts, [(64, 64), (96, 64), (64, 64), (64, 64), (96, 64)],
                                                     ["calib"] * 3 + ["holdout"] * 2))]
    assert [p[0] for p in plan] == want


def test_holdout_sizes_cycle_from_the_first_size():
    s = cap.CalibrationSettings(6, 2, ((64, 64), (96, 64), (64, 96)), holdout=2)
    assert [(p[0].size, p[0].split) for p in cap.plan_samples(s)] == [
        ([64, 64], "calib"), ([96, 64], "calib"), ([64, 96], "calib"), ([64, 64], "calib"), ([64, 64], "holdout"),
        ([96, 64], "holdout")]


def _sample(i, split="calib", size=(64, 64), calls=2, sha="ab", n_bytes=10):
    return CalibrationSample(index=i, prompt_id=f"p{i}", lang="en", category="c", seed=i, size=list(size), split=split,
                             file=f"prompt_{i:04d}_p{i}.safetensors", sha256=sha, bytes=n_bytes,
                             calls=[CalibrationCall(key=f"{k:03d}", step=k // 2, branch=("cond", "uncond")[k % 2],
                                                    grid=[1, 2, 2], batch=1, text_len=3) for k in range(calls)])


def _manifest(samples, source=None, set_id=None):
    return CalibrationManifest(checkpoint=CheckpointId(path="/ckpt", identity="id0"),
                               source=source or {"settings": {"a": 1}}, versions={}, samples=samples, set_id=set_id)


def test_set_id_hashes_the_source_and_every_shard():
    m = _manifest([_sample(0), _sample(1, "holdout")])
    body = {"source": m.source, "samples": [(s.prompt_id, s.seed, s.size, s.split, s.sha256) for s in m.samples]}
    assert cap.set_id(m) == hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    changed = [_manifest([_sample(0, sha="cd"), _sample(1, "holdout")]),
               _manifest([_sample(0), _sample(1, "calib")]),
               _manifest([_sample(0), _sample(1, "holdout", size=(96, 64))]),
               _manifest([_sample(0), _sample(1, "holdout")], source={"settings": {"a": 2}}),
               _manifest([_sample(1, "holdout"), _sample(0)])]
    assert len({cap.set_id(c) for c in changed} | {cap.set_id(m)}) == 6
    assert cap.set_id(_manifest([_sample(0, calls=5, n_bytes=99), _sample(1, "holdout")])) == cap.set_id(m)


def test_finish_totals_and_skip(caplog):
    m = _manifest([_sample(0, calls=4, n_bytes=100), _sample(1, calls=2, n_bytes=None), _sample(2, "holdout", calls=5,
                                                                                               n_bytes=7)])
    cap._finish(m, None, 1.23456, recorded=1)
    assert m.totals == {"prompts": 3, "calib_calls": 6, "holdout_calls": 5, "bytes": 107}
    assert m.set_id == cap.set_id(m) and m.seconds == 1.235 and m.ran is True
    again = _manifest(list(m.samples))
    old = m.model_copy(update={"seconds": 9.5})
    with caplog.at_level(logging.INFO, logger=cap.log.name):
        cap._finish(again, old, 0.0004, recorded=0)
    assert again.ran is False and again.seconds == 9.5  # unchanged: the time it took to make
    assert [r.getMessage() for r in caplog.records] == [f"calibrate: unchanged (set {m.set_id}), skipped"]
    other = _manifest([_sample(0, sha="ff")])
    cap._finish(other, old, 0.0004, recorded=0)  # nothing recorded, but not the old set: its own (tiny) time
    assert other.ran is False and other.seconds == 0.0
    cap._finish(other, None, 2.0, recorded=0)
    assert other.seconds == 2.0


def test_intact_samples_of_an_earlier_run(tmp_path, caplog):
    source = {"settings": {"a": 1}}
    good, changed, unhashed = _sample(0), _sample(1), _sample(2, sha=None)
    for s in (good, changed, unhashed):
        (tmp_path / s.file).write_bytes(b"shard %d" % s.index)
    good.sha256 = file_sha256(tmp_path / good.file)
    changed.sha256 = "0" * 64
    missing = _sample(3, sha="1" * 64)
    old = _manifest([good, changed, unhashed, missing], source=source)
    assert cap._intact_samples(tmp_path, old, source) == {"p0": good}
    assert cap._intact_samples(tmp_path, None, source) == {}
    with caplog.at_level(logging.WARNING, logger=cap.log.name):
        assert cap._intact_samples(tmp_path, old, {"settings": {"a": 2}}) == {}
    assert [r.getMessage() for r in caplog.records] == [
        f"calibrate: {tmp_path} held a set with other settings or checkpoint; replacing it"]


# -- a recorded set, opened for replay ----------------------------------------------------------------------------
def _write_set(folder, text_lens=((5, 3), (4, 4), (6, 2)), split=("calib", "calib", "holdout"),
               sizes=((64, 64), (64, 64), (96, 64))):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    samples, tensors_by_file = [], {}
    for i, (lens, sp, size) in enumerate(zip(text_lens, split, sizes)):
        tensors, calls = {}, []
        for k, n in enumerate(lens):
            tensors.update({f"{k:03d}.hidden_states": torch.randn(1, 4, 8, generator=g),
                            f"{k:03d}.encoder_hidden_states": torch.randn(1, n, 6, generator=g),
                            f"{k:03d}.encoder_hidden_states_mask": torch.ones(1, n, dtype=torch.bool),
                            f"{k:03d}.timestep": torch.tensor([1.0 - 0.1 * k])})
            calls.append(CalibrationCall(key=f"{k:03d}", step=0, branch=("cond", "uncond")[k], grid=[1, 2, 2],
                                         batch=1, text_len=n))
        s = CalibrationSample(index=i, prompt_id=f"p{i}", lang="en", category="c", seed=i, size=list(size), split=sp,
                              file=f"prompt_{i:04d}_p{i}.safetensors", calls=calls)
        save_file(tensors, str(folder / s.file))
        s.sha256, s.bytes = file_sha256(folder / s.file), (folder / s.file).stat().st_size
        samples.append(s)
        tensors_by_file[s.file] = tensors
    m = _manifest(samples, source={"settings": {"steps": 1}})
    cap._finish(m, None, 1.0, recorded=len(samples))
    write_manifest(folder, m)
    return m, tensors_by_file


def test_a_set_opened_for_replay(tmp_path):
    m, tensors = _write_set(tmp_path / "set")
    cs = cap.CalibrationSet(tmp_path / "set")
    assert (cs.set_id, cs.identity, cs.settings) == (m.set_id, "id0", {"steps": 1})
    assert cs.folder == tmp_path / "set"
    assert cs.num_calls() == cs.num_calls("calib") == 4 and cs.num_calls("holdout") == 2
    assert cs.calls_per_size() == {(64, 64): 4} and cs.calls_per_size("holdout") == {(96, 64): 2}
    calls = list(cs.calls())
    assert [(c["prompt_id"], c["step"], c["branch"], c["grid"]) for c in calls] == [
        ("p0", 0, "cond", (1, 2, 2)), ("p0", 0, "uncond", (1, 2, 2)), ("p1", 0, "cond", (1, 2, 2)),
        ("p1", 0, "uncond", (1, 2, 2))]
    first = tensors[m.samples[0].file]
    for key in cap.KEYS:
        assert torch.equal(calls[0][key], first[f"000.{key}"]) and torch.equal(calls[1][key], first[f"001.{key}"])
    assert [c["prompt_id"] for c in cs.calls("holdout")] == ["p2", "p2"]
    replayed = list(cs.export_inputs(AXES, "holdout", text_bucket=4, dtype=torch.float64))
    assert len(replayed) == 2 and replayed[0][1].shape == (1, 8, 6) and replayed[1][1].shape == (1, 4, 6)
    assert replayed[0][0].dtype == torch.float64
    assert [a.shape[1] for a, *_ in cs.export_inputs(AXES)] == [4] * 4 and \
        [t.shape[1] for _, t, *_ in cs.export_inputs(AXES)] == [32] * 4


def test_a_set_checks_sizes_and_checkpoint(tmp_path):
    _write_set(tmp_path / "set")
    cs = cap.CalibrationSet(tmp_path / "set")
    cs.check_sizes([(64, 64)])
    cs.check_sizes([(64, 64)], min_calls=4)
    with pytest.raises(InputError) as e:
        cs.check_sizes([(64, 64), (96, 64), (128, 128)])
    _refused(e, "calibration", str(tmp_path / "set"),
             "a set with >= 4 recorded forwards at each size asked; too few for 96x64 (0), 128x128 (0) (set has "
             "64x64: 4). Re-run `qitrt calibrate --sizes ...`")
    with pytest.raises(InputError) as e:
        cs.check_sizes([(64, 64)], min_calls=5)
    assert "too few for 64x64 (4) (set has 64x64: 4)" in e.value.allowed
    cs.check_checkpoint("id0")
    with pytest.raises(InputError) as e:
        cs.check_checkpoint("id1")
    _refused(e, "calibration", str(tmp_path / "set"),
             "a calibration set recorded from this checkpoint (id1); it was recorded from id0 (/ckpt). Run `qitrt "
             "calibrate` for this checkpoint")


def test_a_size_the_set_never_saw_has_no_calls(tmp_path):
    _write_set(tmp_path / "set", split=("calib", "calib", "calib"))
    cs = cap.CalibrationSet(tmp_path / "set")
    cs.check_sizes([(96, 64)], min_calls=1)
    with pytest.raises(InputError) as e:
        cs.check_sizes([(128, 64)], min_calls=1)
    assert e.value.allowed == ("a set with >= 1 recorded forwards at each size asked; too few for 128x64 (0) (set has "
                               "64x64: 4, 96x64: 2). Re-run `qitrt calibrate --sizes ...`")


def test_a_set_with_nothing_to_calibrate_says_none(tmp_path):
    _write_set(tmp_path / "set", text_lens=((3,),), split=("holdout",), sizes=((64, 64),))
    with pytest.raises(InputError) as e:
        cap.CalibrationSet(tmp_path / "set").check_sizes([(64, 64)])
    assert e.value.allowed.endswith("too few for 64x64 (0) (set has none). Re-run `qitrt calibrate --sizes ...`")


def test_a_set_that_is_not_one_is_refused(tmp_path):
    with pytest.raises(InputError) as e:
        cap.CalibrationSet(tmp_path)
    assert (e.value.field, e.value.value) == ("calibration", str(tmp_path))
    assert e.value.allowed == (f"a folder made by `qitrt calibrate` ({tmp_path} has no manifest.json: not a "
                               "calibration set made by `qitrt calibrate`)")
    assert e.value.__suppress_context__
    m, _ = _write_set(tmp_path / "set")
    m.set_id = None  # interrupted: no set id yet
    write_manifest(tmp_path / "set", m)
    with pytest.raises(InputError) as e:
        cap.CalibrationSet(tmp_path / "set")
    _refused(e, "calibration", str(tmp_path / "set"), "a complete calibration set (this one was interrupted: re-run "
                                                      "`qitrt calibrate` with the same settings to finish it)")


def test_a_changed_or_lost_shard_is_refused_unless_not_verified(tmp_path):
    m, _ = _write_set(tmp_path / "set")
    shard = tmp_path / "set" / m.samples[1].file
    shard.write_bytes(shard.read_bytes()[:-1] + b" ")
    with pytest.raises(QitrtError) as e:
        cap.CalibrationSet(tmp_path / "set")
    assert str(e.value) == (f"calibration set {tmp_path / 'set'}: shard {m.samples[1].file} is missing or changed since "
                            "it was recorded; re-run `qitrt calibrate`")
    assert cap.CalibrationSet(tmp_path / "set", verify=False).num_calls() == 4
    shard.unlink()
    with pytest.raises(QitrtError, match="is missing or changed"):
        cap.CalibrationSet(tmp_path / "set")


# -- replay: what the engine will see --------------------------------------------------------------------------------
def test_replay_pads_text_to_the_bucket_and_rebuilds_rope():
    g = torch.Generator().manual_seed(0)
    call = {"hidden_states": torch.randn(2, 6, 8, generator=g), "encoder_hidden_states": torch.randn(2, 5, 6, generator=g),
            "encoder_hidden_states_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]), "timestep": torch.tensor([0.5, 0.5]),
            "grid": (1, 2, 3)}
    args = cap.replay_inputs(call, AXES, text_bucket=4)
    assert len(args) == 8
    hs, text, mask, t, *rope = args
    assert torch.equal(hs, call["hidden_states"]) and torch.equal(t, call["timestep"])
    assert text.shape == (2, 8, 6) and torch.equal(text[:, :5], call["encoder_hidden_states"]) and not text[:, 5:].any()
    assert mask.dtype == torch.bool and mask.tolist() == [[True] * 5 + [False] * 3, [True] * 3 + [False] * 5]
    for got, want in zip(rope, RopeTables(AXES)(1, 2, 3, 8)):
        assert torch.equal(got, want)
    args = cap.replay_inputs(call, list(AXES), dtype=torch.float64)  # default bucket: 32 tokens
    assert args[1].shape == (2, 32, 6) and args[1].dtype == args[0].dtype == args[3].dtype == torch.float64
    assert args[2].dtype == torch.bool and args[2].sum().item() == 8 and args[4].shape[0] == 6
    assert torch.equal(args[7], RopeTables(AXES)(1, 2, 3, 32)[3])
    assert cap._rope(AXES) is cap._rope(tuple(AXES)) and math.isfinite(float(args[4].sum()))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_recordings_of_a_gpu_pipeline_land_on_the_cpu():
    module, recorder = _Transformer(), cap._Recorder(record_every=1)
    module.register_forward_pre_hook(recorder, with_kwargs=True)
    cuda = dict(device="cuda")
    module(hidden_states=torch.ones(1, 4, 8, **cuda), encoder_hidden_states=torch.ones(1, 3, 6, **cuda),
           encoder_hidden_states_mask=None, timestep=torch.tensor([0.5], **cuda), img_shapes=[[(1, 2, 2)]])
    module(hidden_states=torch.ones(1, 4, 8, **cuda), encoder_hidden_states=torch.ones(1, 3, 6, **cuda),
           encoder_hidden_states_mask=torch.ones(1, 3, dtype=torch.long, **cuda), timestep=torch.tensor([0.5], **cuda),
           img_shapes=[[(1, 2, 2)]])
    for c in recorder.calls:
        assert {k: c[k].device.type for k in cap.KEYS} == dict.fromkeys(cap.KEYS, "cpu")
