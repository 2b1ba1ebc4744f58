"""Quantization by sensitivity (compile/sensitivity.py): targets refused by name and range, the selection logic on a
hand-made table (against the brute-force optimum), the variant graphs bracketed by the graphs they stand between,
and, on the tiny checkpoint, a written recipe that `qitrt build --recipe` takes unchanged and that reaches the target
on the held-out calls in ONNX Runtime."""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil

import numpy as np
import pytest

from qwen_image_trt.compile import sensitivity as sens
from qwen_image_trt.core.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------ targets, flags
@pytest.mark.parametrize("kwargs,field,allowed", [
    ({}, "target", "exactly one of target_cosine"),
    ({"target_cosine": 0.999, "target_psnr": 40.0}, "target", "exactly one of target_cosine"),
    ({"target_cosine": 1.0}, "target_cosine", "a number in (0, 1)"),
    ({"target_cosine": 0.0}, "target_cosine", "a number in (0, 1)"),
    ({"target_cosine": True}, "target_cosine", "a number in (0, 1)"),
    ({"target_psnr": 0.0}, "target_psnr", "a number of dB in (0, 200)"),
    ({"target_psnr": 200.0}, "target_psnr", "a number of dB in (0, 200)"),
    ({"target_psnr": -3}, "target_psnr", "a number of dB in (0, 200)"),
])
def test_targets_out_of_range_are_refused_by_name(kwargs, field, allowed):
    with pytest.raises(InputError) as e:
        sens.check_target(**kwargs)
    assert e.value.field == field and e.value.allowed.startswith(allowed)
    assert sens.check_target(target_cosine=0.999) == sens.Target("cosine", 0.999)
    assert sens.check_target(target_psnr=40) == sens.Target("psnr_db", 40.0)


def test_cli_refuses_a_bad_target_in_one_line_before_any_work(capsys, tmp_path):
    from qwen_image_trt.cli import main

    # the checkpoint does not exist: the flags are checked first
    assert main(["sensitivity", str(tmp_path / "none"), "--precision", "int8", "--target-cosine", "1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: target_cosine=1.5 is not allowed: a number in (0, 1), e.g. 0.999"
    assert main(["sensitivity", str(tmp_path / "none"), "--precision", "int8"]) == 2
    assert "exactly one of target_cosine (--target-cosine, in (0, 1)) or target_psnr" in capsys.readouterr().err
    assert main(["sensitivity", str(tmp_path / "none"), "--precision", "int4", "--target-psnr", "40"]) == 2
    assert "precision='int4' is not allowed: one of int8, fp8" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --help exits through argparse
        main(["sensitivity", "--help"])
    assert "--target-psnr" in capsys.readouterr().out


def test_evaluated_calls_are_spread_over_the_held_out_set():
    assert sorted(sens._spread(80, 8)) == [0, 11, 23, 34, 45, 56, 68, 79]  # early and late steps, several prompts
    assert sens._spread(4, 8) == {0, 1, 2, 3} and sens._spread(5, None) == set(range(5))
    assert sens._spread(10, 1) == {0}


def test_a_bf16_graph_is_refused_where_onnx_runtime_cannot_run_it():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("ONNX Runtime's CUDA provider runs bf16 graphs")
    with pytest.raises(InputError) as e:
        sens._provider("bf16", "/models/onnx-bf16")
    assert e.value.field == "graphs" and "an fp32 or fp16 export" in e.value.allowed
    assert sens._provider("fp32", "x") == "CPUExecutionProvider"


# ------------------------------------------------------------------------------------------ selection, hand-made
def _psnr(damage: float) -> dict:
    """Metrics of an output whose MSE / peak^2 is `damage`."""
    return {"psnr_db": -10 * math.log10(damage) if damage > 0 else sens.PSNR_CAP_DB, "cosine": 1 - damage / 2,
            "finite": True}


# name -> (FLOPs, MSE / peak^2 when quantized alone). Quantized units' errors add up, plus an interaction when c and
# e are both quantized: a sum of per-unit errors underestimates the combined graph, only measuring it tells.
TABLE = {"a": (1, 4e-7), "b": (100, 1e-5), "c": (120, 3e-6), "d": (10, 2e-6), "e": (400, 2e-6), "f": (50, 2e-5)}
INTERACTION = 6e-6


def _hand_made(table=TABLE):
    names = set(table)

    def combined(kept) -> float:
        quantized = names - set(kept)
        return sum(table[n][1] for n in quantized) + (INTERACTION if {"c", "e"} <= quantized else 0.0)

    measured = []

    def measure(kept):
        measured.append(frozenset(kept))
        return _psnr(combined(kept))

    units = [{"name": n, "flops": f, "metrics": _psnr(combined(names - {n}))} for n, (f, _) in table.items()]
    return units, measure, measured, combined


def _optimum(table, combined, limit):
    """Brute force: the kept set with the fewest FLOPs (ties: fewer units) whose combined damage is within `limit`,
    among those that quantize something."""
    best = None
    for r in range(len(table)):
        for kept in itertools.combinations(sorted(table), r):
            if combined(kept) <= limit:
                cost = (sum(table[n][0] for n in kept), len(kept))
                best = min(best, (cost, kept)) if best else (cost, kept)
    return best


def test_selection_keeps_the_fewest_flops_that_meet_the_target_measured_combined():
    units, measure, measured, combined = _hand_made()
    target = sens.Target("psnr_db", 48.0)  # damage limit 1.58e-5: f alone (2e-5) misses it
    sel = sens.select_units(units, target, measure)
    assert sel.forced == ["f"]
    # ranked by damage per FLOP: a (4e-7 per FLOP), d, b, c, e; f is ranked too but kept outright
    assert [n for n in sel.order if n != "f"] == ["a", "d", "b", "c", "e"]
    # the shortest ranked prefix whose combined graph meets the target keeps f, a, d, b (161 FLOPs); pruning then
    # quantizes d and a again (still within the target); b cannot go
    assert sel.kept == ["b", "f"]
    assert combined(sel.kept) <= target.damage_limit and sel.metrics == _psnr(combined(sel.kept))
    (cost, kept) = _optimum(TABLE, combined, target.damage_limit)
    assert list(kept) == sel.kept and cost[0] == 150
    # decisions are taken on the measured combined graph: summed per-unit errors say keeping f, a, d leaves
    # b + c + e = 1.5e-5, within the target; measured (with the c-e interaction) it is 2.1e-5, refused
    trial = {frozenset(t["kept"]): t for t in sel.trials}
    assert sum(TABLE[n][1] for n in "bce") < target.damage_limit
    assert trial[frozenset("fad")]["meets"] is False and frozenset("fad") in measured
    assert trial[frozenset("fadb")]["meets"] is True
    # pruning, largest first: b (its trial f, a, d was measured already), then d, then a
    assert [t["kept"] for t in sel.trials if t["why"].endswith("quantized again")] == [["a", "b", "f"], ["b", "f"]]
    assert all(t["flops_kept"] >= 150 for t in sel.trials if t["meets"])
    assert sel.trials[0]["why"] == "everything quantized" and sel.trials[0]["meets"] is False
    # one-unit graphs are the per-unit rows, not measured again; nothing is measured twice
    assert all(len(k) < len(TABLE) - 1 for k in measured) and len(measured) == len(set(measured))
    # deterministic
    again = sens.select_units(units, target, _hand_made()[1])
    assert (again.kept, again.trials, again.order) == (sel.kept, sel.trials, sel.order)


@pytest.mark.parametrize("target_db", [44.0, 47.0, 49.0, 52.0, 55.0])
def test_selection_matches_the_brute_force_optimum_on_the_table(target_db):
    units, measure, _, combined = _hand_made()
    target = sens.Target("psnr_db", target_db)
    sel = sens.select_units(units, target, measure)
    (cost, kept) = _optimum(TABLE, combined, target.damage_limit)
    assert sum(TABLE[n][0] for n in sel.kept) == cost[0], (sel.kept, kept)
    assert target.met(sel.metrics)


def test_selection_is_locally_minimal_on_random_tables():
    """Random tables (seeded), errors that add up: the kept set meets the target, quantizing any one of its units
    again misses it, and it keeps no more FLOPs than the shortest ranked prefix that meets the target."""
    rng = np.random.default_rng(0)
    for _ in range(25):
        n = int(rng.integers(3, 12))
        table = {f"u{i}": (float(rng.choice([1, 10, 100, 1000])), float(10 ** rng.uniform(-7, -4))) for i in range(n)}
        units, measure, _, combined = _hand_made(table)
        alone = sorted(d for _, d in table.values())
        limit = float(rng.uniform(alone[0], sum(alone)))  # between the least sensitive unit and everything
        target = sens.Target("psnr_db", -10 * math.log10(limit))
        sel = sens.select_units(units, target, measure)
        kept = set(sel.kept)
        assert combined(kept) <= target.damage_limit * (1 + 1e-9)
        for u in kept:
            assert combined(kept - {u}) > target.damage_limit, (table, target, sel.kept, u)
        order = [u for u in sel.order if u not in sel.forced]
        shortest = next(k for k in range(len(order) + 1)
                        if combined(set(sel.forced) | set(order[:k])) <= target.damage_limit)
        prefix_flops = sum(table[u][0] for u in set(sel.forced) | set(order[:shortest]))
        assert sum(table[u][0] for u in kept) <= prefix_flops


def test_selection_quantizes_everything_when_it_meets_the_target_and_refuses_an_unreachable_one():
    units, measure, _, _ = _hand_made()
    sel = sens.select_units(units, sens.Target("psnr_db", 40.0), measure)  # all quantized: 4.3e-5 -> 43.6 dB
    assert sel.kept == [] and len(sel.trials) == 1 and sel.metrics["psnr_db"] > 40
    best = max(u["metrics"]["psnr_db"] for u in units)  # quantizing a alone: 63.8 dB
    with pytest.raises(InputError) as e:
        sens.select_units(units, sens.Target("psnr_db", 70.0), measure)
    assert e.value.field == "target_psnr" and e.value.value == 70.0
    assert e.value.allowed.startswith(f"a value in (0, {best:.7g}]") and "(a)" in e.value.allowed
    with pytest.raises(InputError, match=r"target_cosine=0\.9999999999 .* a value in \(0, 0\.99999"):
        sens.select_units(units, sens.Target("cosine", 0.9999999999), measure)


# the 14 Linears of a double-stream block, as the exported graph names them
BLOCK_LINEARS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                 "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
                 "txt_mlp.net.2", "img_mod.1", "txt_mod.1")


def test_recipe_keeps_exactly_the_chosen_units():
    from qwen_image_trt.compile.recipe import is_excluded, make_recipe

    dim = 8
    layers = [f"transformer_blocks.{b}.{n}" for b in range(4) for n in BLOCK_LINEARS]
    units = sens.make_units(layers, {n: (dim, dim) for n in layers}, image_tokens=16, text_tokens=32)
    assert len(units) == 24 and sorted(n for u in units for n in u["layers"]) == sorted(layers)
    by = {u["name"]: u for u in units}
    assert by["2.img_attn"]["flops"] == 2 * 16 * dim * dim * 4 and by["2.txt_mod"]["flops"] == 2 * dim * dim
    kept = [u for u in units if u["block"] == 0 or u["block"] == 2 or u["name"] in ("1.img_mlp", "1.txt_attn")]
    recipe = sens.recipe_for(kept, units, "fp8", 4)
    assert recipe["keep_first_blocks"] == 1 and recipe["keep_last_blocks"] == 0
    assert recipe["keep"] == ["transformer_blocks.1.attn.add_q_proj", "transformer_blocks.1.attn.add_k_proj",
                              "transformer_blocks.1.attn.add_v_proj", "transformer_blocks.1.attn.to_add_out",
                              "transformer_blocks.1.img_mlp", "transformer_blocks.2.*"]
    resolved = make_recipe("fp8", 4, overrides=json.loads(json.dumps(recipe)))
    chosen = {n for u in kept for n in u["layers"]}
    assert {n for n in layers if is_excluded(n, resolved)} == chosen
    last = sens.recipe_for([u for u in units if u["block"] >= 2], units, "int8", 4)
    assert (last["keep_first_blocks"], last["keep_last_blocks"], last["keep"]) == (0, 2, [])


# -------------------------------------------------------------------------------------------- the tiny checkpoint
@pytest.fixture(scope="module")
def small_calibration(tiny_checkpoint, tmp_path_factory):
    from qwen_image_trt.calibration.capture import calibrate

    out = tmp_path_factory.mktemp("sens-calib") / "set"
    calibrate(tiny_checkpoint, out, num_prompts=4, steps=2, progress=False)  # 12 calibration + 4 held-out forwards
    return out


@pytest.fixture(scope="module")
def table_run(tiny_checkpoint, tiny_engines, small_calibration, tmp_path_factory):
    """A run whose target everything-quantized meets: the per-unit table, measured once (later runs reuse it)."""
    out = tmp_path_factory.mktemp("sens") / "int8"
    return sens.run_sensitivity(tiny_checkpoint, "int8", target_psnr=20.0, out_dir=out, calibration=small_calibration,
                                graphs=tiny_engines, verify=False, progress=False)


@pytest.fixture(scope="module")
def chosen_run(table_run, tiny_checkpoint, tiny_engines, small_calibration):
    """The same folder with a target 5 dB above everything quantized: some units must stay in high precision."""
    target = round(table_run.report["all_quantized"]["psnr_db"] + 5.0, 2)
    assert target < max(u["metrics"]["psnr_db"] for u in table_run.report["units"])  # reachable by construction
    return sens.run_sensitivity(tiny_checkpoint, "int8", target_psnr=target, out_dir=table_run.out,
                                calibration=small_calibration, graphs=tiny_engines, progress=False)


def _held_out(checkpoint, calibration):
    from qwen_image_trt.calibration.capture import CalibrationSet
    from qwen_image_trt.models import checkpoint as ckpt

    axes = ckpt.read_config(checkpoint, "transformer")["axes_dims_rope"]
    return list(CalibrationSet(calibration).export_inputs(axes, "holdout"))


def test_unit_graphs_lie_between_the_graphs_they_are_cut_from(table_run, tiny_checkpoint, tiny_engines,
                                                              small_calibration):
    """Nothing quantized: the high-precision export, output for output. Everything quantized: the graph
    `qitrt quantize` wrote, output for output. One unit: the table's row, measured again."""
    from qwen_image_trt.compile.sensitivity import Evaluator, VariantGraphs
    from qwen_image_trt.core.manifest import read_manifest
    from qwen_image_trt.models.transformer_export import INPUT_NAMES

    r = table_run.report
    units = r["units"]
    layers = [n for u in units for n in u["layers"]]
    q = read_manifest(table_run.out / "work" / "quantized")
    assert sorted(layers) == sorted(q.quantization.quantized_layers) and len(set(layers)) == len(layers)
    # 6 blocks x 6 parts, less the last block's text MLP (dead code in the graph: it feeds nothing)
    assert len(units) == 35 and "5.txt_mlp" not in {u["name"] for u in units}
    assert r["dead_layers"] == ["transformer_blocks.5.attn.to_add_out", "transformer_blocks.5.txt_mlp.net.0.proj",
                                "transformer_blocks.5.txt_mlp.net.2"]
    calls = _held_out(tiny_checkpoint, small_calibration)
    assert r["inputs"]["calibration"]["split"] == "holdout" and r["inputs"]["calibration"]["calls"] == len(calls) == 4
    ev = Evaluator(tiny_engines / "transformer.onnx", calls, INPUT_NAMES, "CPUExecutionProvider")
    v = VariantGraphs(table_run.out / "work" / "variants", layers)
    for got, ref in zip(ev.outputs(v.write(set())), ev.refs):
        np.testing.assert_array_equal(got, ref)
    quantized = ev.outputs(q.components["transformer"].graph.path(table_run.out / "work" / "quantized"))
    for got, want in zip(ev.outputs(v.write(set(layers))), quantized):
        np.testing.assert_array_equal(got, want)
    assert r["all_quantized"] == sens.forward_metrics(ev.refs, quantized)
    u = units[7]
    assert ev.metrics(v.write(set(u["layers"]))) == u["metrics"]
    # each unit alone moves the output, and differently: the table measures something
    assert all(u["metrics"]["psnr_db"] < sens.PSNR_CAP_DB for u in units)
    assert len({round(u["metrics"]["psnr_db"], 3) for u in units}) > 30


def test_unit_flops_add_up_to_the_flop_models_block_linears(table_run, tiny_checkpoint):
    from qwen_image_trt.models import checkpoint as ckpt
    from qwen_image_trt.models.flops import MLP_MULT, TransformerShape, forward_cost

    config = ckpt.read_config(tiny_checkpoint, "transformer")
    shape = TransformerShape.from_config(config)
    f = table_run.report["inputs"]["flops_per_sample"]
    i, t = f["image_tokens"], f["text_tokens"]
    assert i == 16  # 64x64: (64 / 8 / 2)^2 packed latent tokens
    blocks = forward_cost(shape, i, t).linear_flops - forward_cost(
        TransformerShape(**{**shape.__dict__, "layers": 0}), i, t).linear_flops
    d = shape.dim
    dead = 2 * t * (d * d + 2 * d * MLP_MULT * d)  # the last block's to_add_out and text MLP
    assert sum(u["flops"] for u in table_run.report["units"]) + dead == pytest.approx(blocks, rel=1e-12)
    assert table_run.report["quantizable_flops"] == pytest.approx(blocks - dead, rel=1e-12)


def test_written_recipe_meets_the_target_and_quantize_reproduces_the_derived_graph(chosen_run, table_run):
    from qwen_image_trt.compile.recipe import ALLOWED_KEYS, is_excluded, make_recipe

    r = chosen_run.report
    target = sens.Target(**r["inputs"]["target"])
    c = r["chosen"]
    assert r["all_quantized"]["psnr_db"] < target.value  # the target needs units kept...
    assert c["meets"] and 0 < c["flops_kept_fraction"] < 0.5  # ...and is met keeping a minority of the FLOPs
    assert c["metrics"]["psnr_db"] >= target.value
    # the recipe through the real quantize path (a fresh ModelOpt calibration): the same graph, the same error
    v = r["verified"]
    assert v["meets"] and v["metrics"]["psnr_db"] == pytest.approx(c["metrics"]["psnr_db"], abs=0.01)
    assert v["quantized_layers"] == sum(len(u["layers"]) for u in r["units"] if not u["kept"])
    # the file as written: only recipe fields, accepted as it is, keeping exactly the chosen units' layers
    recipe = json.loads(chosen_run.recipe_path.read_text())
    assert set(recipe) <= ALLOWED_KEYS and recipe == r["recipe"]
    resolved = make_recipe("int8", 6, overrides=recipe)
    for u in r["units"]:
        assert all(is_excluded(n, resolved) == u["kept"] for n in u["layers"]), u["name"]
    assert sorted(u["name"] for u in r["units"] if u["kept"]) == c["kept"]
    # every measured combined graph that met the target kept at least as many FLOPs as the chosen one
    assert all(t["flops_kept"] >= c["flops_kept"] for t in r["trials"] if t["meets"])
    assert any(not t["meets"] for t in r["trials"])
    # the per-unit table was reused from the first run, not measured again: graphs run = combined graphs measured
    # (one-unit graphs are table rows) + the re-quantized recipe's
    assert [u["metrics"] for u in r["units"]] == [u["metrics"] for u in table_run.report["units"]]
    assert r["evaluations"] == sum(len(t["kept"]) != len(r["units"]) - 1 for t in r["trials"]) + 1
    # inputs recorded, outputs written
    i = r["inputs"]
    assert i["precision"] == "int8" and i["target"] == {"metric": "psnr_db", "value": target.value}
    assert len(i["checkpoint"]["identity"]) == 16 and len(i["calibration"]["set_id"]) == 16
    assert json.loads(chosen_run.paths["json"].read_text())["chosen"] == json.loads(json.dumps(c))
    md = chosen_run.paths["md"].read_text()
    assert md.count("\n| ") >= 35 + len(r["trials"]) and f"target PSNR {target.value:.2f} dB" in md
    assert chosen_run.paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_build_with_the_written_recipe_reaches_the_target_on_held_out_calls(chosen_run, tiny_checkpoint,
                                                                          tiny_engines, small_calibration, tmp_path):
    """`qitrt build --recipe recipe.json --calibration SET` (stages.build, the command's function), its ONNX Runtime
    engine run on the held-out calls against the high-precision graph."""
    from qwen_image_trt.compile import onnx_io
    from qwen_image_trt.compile.stages import BuildOptions, build
    from qwen_image_trt.core.manifest import read_manifest
    from qwen_image_trt.models.transformer_export import INPUT_NAMES

    out = tmp_path / "engines"
    shutil.copytree(tiny_engines, out / "onnx")  # the export stage finds its graphs unchanged and skips
    result = build(tiny_checkpoint, out, BuildOptions(precision="int8", calibration=str(small_calibration),
                                                      recipe=str(chosen_run.recipe_path), progress=False))
    assert [s.status for s in result.stages][:3] == ["skipped", "reused", "ran"]
    m = read_manifest(out)
    kept = {n for u in chosen_run.report["units"] if u["kept"] for n in u["layers"]}
    assert kept <= set(m.quantization.kept_layers) and not kept & set(m.quantization.quantized_layers)
    engine = out / m.components["transformer"].onnxruntime.file
    calls = _held_out(tiny_checkpoint, small_calibration)
    ref = onnx_io.ort_session(tiny_engines / "transformer.onnx")
    got = onnx_io.ort_session(engine)
    refs = [ref.run(None, dict(zip(INPUT_NAMES, (a.numpy() for a in args))))[0] for args in calls]
    outs = [got.run(None, dict(zip(INPUT_NAMES, (a.numpy() for a in args))))[0] for args in calls]
    metrics = sens.forward_metrics(refs, outs)
    target = chosen_run.report["inputs"]["target"]
    assert metrics["psnr_db"] >= target["value"], (metrics, target)
    assert metrics["psnr_db"] == pytest.approx(chosen_run.report["chosen"]["metrics"]["psnr_db"], abs=0.05)


def test_a_target_no_unit_reaches_alone_is_refused_with_the_reachable_range(table_run, tiny_checkpoint, tiny_engines,
                                                                          small_calibration):
    best = max(u["metrics"]["psnr_db"] for u in table_run.report["units"])
    with pytest.raises(InputError) as e:
        sens.run_sensitivity(tiny_checkpoint, "int8", target_psnr=150.0, out_dir=table_run.out,
                             calibration=small_calibration, graphs=tiny_engines, progress=False)
    assert e.value.field == "target_psnr" and e.value.value == 150.0
    assert re.match(rf"a value in \(0, {best:.7g}\] for this model, precision and calibration set", e.value.allowed)
