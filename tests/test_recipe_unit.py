"""The quantization recipe (compile/recipe.py) field by field: the defaults as recorded in manifests, every check with
its message, the module patterns `keep` expands to, and the ModelOpt config those patterns become, applied by real
ModelOpt to a small block-shaped model."""

from __future__ import annotations

import copy
import hashlib
import json
import warnings

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # ModelOpt warns about the installed transformers version
    import modelopt.torch.quantization as mtq

from qwen_image_trt.compile import recipe as rc
from qwen_image_trt.core.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HP = ["img_in", "img_in.*", "txt_in", "txt_in.*", "txt_norm", "txt_norm.*", "time_text_embed", "time_text_embed.*",
      "norm_out", "norm_out.*", "proj_out", "proj_out.*"]
KEYS = "activations, algorithm, family, format, keep, keep_first_blocks, keep_last_blocks, keep_modules, precision, " \
       "quantize_modulation, smoothquant_alpha, weights"


def _refused(excinfo, field, value, allowed):
    e = excinfo.value
    assert (e.field, e.value, e.allowed) == (field, value, allowed)


def test_default_recipes_as_manifests_record_them():
    assert rc.default_recipe("int8", 6) == {
        "format": "qwen-image-trt/quant-recipe@1", "precision": "int8", "algorithm": "smoothquant",
        "smoothquant_alpha": 0.8, "weights": "int8 per-channel (axis 0)", "activations": "int8 per-tensor",
        "keep_modules": ["img_in", "txt_in", "txt_norm", "time_text_embed", "norm_out", "proj_out"],
        "keep_first_blocks": 2, "keep_last_blocks": 2, "keep": [], "quantize_modulation": True,
        "kept_blocks": [0, 1, 4, 5],
        "excluded_patterns": HP + [f"transformer_blocks.{i}.*" for i in (0, 1, 4, 5)]}
    fp8 = rc.default_recipe("fp8", 5, keep=["img_mlp"])
    assert {k: fp8[k] for k in ("format", "precision", "algorithm", "weights", "activations", "keep")} == {
        "format": "qwen-image-trt/quant-recipe@1", "precision": "fp8", "algorithm": "max",
        "weights": "fp8 e4m3 per-tensor", "activations": "fp8 e4m3 per-tensor", "keep": ["img_mlp"]}
    assert "smoothquant_alpha" not in fp8 and fp8["kept_blocks"] == [0, 1, 3, 4]
    assert fp8["excluded_patterns"][-2:] == ["transformer_blocks.*.img_mlp", "transformer_blocks.*.img_mlp.*"]
    for bad in ("int4", "fp16", "INT8"):
        with pytest.raises(InputError) as e:
            rc.default_recipe(bad, 6)
        _refused(e, "precision", bad, "one of int8, fp8 for quantization")


def test_defaults_are_not_shared_between_recipes():
    a = rc.make_recipe("int8", 6)
    a["keep_modules"].append("x"), a["keep"].append("y")
    b = rc.make_recipe("int8", 6)
    assert "x" not in b["keep_modules"] and b["keep"] == [] and "x" not in rc.HIGH_PRECISION_MODULES


def test_recipe_file(tmp_path):
    with pytest.raises(InputError) as e:
        rc.load_recipe_file(tmp_path / "nope.json")
    _refused(e, "recipe", str(tmp_path / "nope.json"), "an existing JSON file")
    with pytest.raises(InputError) as e:
        rc.load_recipe_file(tmp_path)  # a folder is not a file
    _refused(e, "recipe", str(tmp_path), "an existing JSON file")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError) as e:
        rc.load_recipe_file(bad)
    assert (e.value.field, e.value.value) == ("recipe", str(bad))
    assert e.value.allowed == "valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"
    assert e.value.__suppress_context__
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(InputError) as e:
        rc.load_recipe_file(tmp_path / "list.json")
    _refused(e, "recipe", str(tmp_path / "list.json"), "a JSON object")
    (tmp_path / "ok.json").write_text(json.dumps({"keep": ["img_mlp"], "smoothquant_alpha": 0.5}))
    assert rc.load_recipe_file(str(tmp_path / "ok.json")) == {"keep": ["img_mlp"], "smoothquant_alpha": 0.5}


def test_overrides_are_checked_and_applied():
    with pytest.raises(InputError) as e:
        rc.make_recipe("int8", 6, overrides={"zeta": 1, "alpha": 2, "keep": []})
    _refused(e, "recipe", ["alpha", "zeta"], f"keys among {KEYS}")
    with pytest.raises(InputError) as e:
        rc.make_recipe("int8", 6, overrides={"precision": "fp8"})
    _refused(e, "recipe.precision", "fp8", "int8 (the --precision asked)")
    r = rc.make_recipe("int8", 6, overrides={"precision": "int8", "format": "other@9", "keep_last_blocks": 0,
                                             "keep": ["txt_mlp"]}, keep=[" img_mlp ", "", "  ", "txt_mlp"])
    assert r["format"] == "qwen-image-trt/quant-recipe@1"  # the format is this version's, whatever a file says
    assert r["keep"] == ["img_mlp", "txt_mlp"] and r["kept_blocks"] == [0, 1]
    assert rc.make_recipe("int8", 6, overrides={}) == rc.make_recipe("int8", 6) == rc.default_recipe("int8", 6)


@pytest.mark.parametrize("field", ["keep_first_blocks", "keep_last_blocks"])
def test_block_counts_are_integers_within_the_model(field):
    assert rc.make_recipe("int8", 6, overrides={field: 0})[field] == 0
    assert rc.make_recipe("int8", 6, overrides={field: 6})["kept_blocks"] == list(range(6))
    for bad in (-1, 7, True, 1.0, "2", None):
        with pytest.raises(InputError) as e:
            rc.make_recipe("int8", 6, overrides={field: bad})
        _refused(e, f"recipe.{field}", bad, "an integer in [0, 6]")


def test_kept_blocks_from_both_ends():
    assert rc.make_recipe("fp8", 3)["kept_blocks"] == [0, 1, 2]  # the ends overlap on a small model
    assert rc.make_recipe("fp8", 6, overrides={"keep_first_blocks": 3, "keep_last_blocks": 1})["kept_blocks"] == \
        [0, 1, 2, 5]
    assert rc.make_recipe("fp8", 6, overrides={"keep_first_blocks": 0, "keep_last_blocks": 0})["kept_blocks"] == []


def test_smoothquant_alpha_is_checked_only_where_it_is_used():
    for ok in (0, 0.0, 1, 1.0, 0.5):
        assert rc.make_recipe("int8", 6, overrides={"smoothquant_alpha": ok})["smoothquant_alpha"] == ok
    for bad in (-0.1, 1.1, "0.5", None):
        with pytest.raises(InputError) as e:
            rc.make_recipe("int8", 6, overrides={"smoothquant_alpha": bad})
        _refused(e, "recipe.smoothquant_alpha", bad, "a number in [0, 1]")
    assert rc.make_recipe("int8", 6, overrides={"algorithm": "max", "smoothquant_alpha": 7})["algorithm"] == "max"
    assert rc.make_recipe("fp8", 6, overrides={"smoothquant_alpha": 7})["smoothquant_alpha"] == 7
    for bad in ("awq", "SmoothQuant", None):
        with pytest.raises(InputError) as e:
            rc.make_recipe("fp8", 6, overrides={"algorithm": bad})
        _refused(e, "recipe.algorithm", bad, "smoothquant (int8) or max")


def test_keep_expands_to_module_patterns():
    r = rc.make_recipe("int8", 4, overrides={"keep_first_blocks": 0, "keep_last_blocks": 0},
                       keep=["attn.to_q", "transformer_blocks.3.*", "img_in", "norm_out.linear", "x?y", "[ab]"])
    assert r["excluded_patterns"] == HP + [
        "[ab]", "[ab].*", "transformer_blocks.*.attn.to_q", "transformer_blocks.*.attn.to_q.*",
        "norm_out.linear", "norm_out.linear.*", "transformer_blocks.3.*", "transformer_blocks.3.*.*", "x?y", "x?y.*"]
    # "img_in" was already excluded: listed once
    for bad in ("mlp_of_doom", "to_q", "IMG_MLP", "MAX"):
        with pytest.raises(InputError) as e:
            rc.make_recipe("int8", 4, keep=[bad])
        _refused(e, "keep", bad, "a block part (attn, img_mlp, txt_mlp, img_mod, txt_mod, attn.to_q, attn.to_k, "
                                 "attn.to_v, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.to_out, "
                                 "attn.to_add_out) or a module name pattern such as 'transformer_blocks.3.*'")
    for part in rc.BLOCK_PARTS:
        assert rc.make_recipe("fp8", 4, keep=[part])["excluded_patterns"][-2:] == \
            [f"transformer_blocks.*.{part}", f"transformer_blocks.*.{part}.*"]


def test_modulation_can_be_kept_in_high_precision():
    on = rc.make_recipe("fp8", 4, overrides={"quantize_modulation": True})
    off = rc.make_recipe("fp8", 4, overrides={"quantize_modulation": False})
    assert off["excluded_patterns"] == on["excluded_patterns"] + ["transformer_blocks.*.img_mod.*",
                                                                   "transformer_blocks.*.txt_mod.*"]
    unresolved = {k: v for k, v in rc._unresolved_default("fp8").items() if k != "quantize_modulation"}
    assert rc.resolve_recipe(unresolved, 4)["excluded_patterns"] == on["excluded_patterns"]  # absent: quantized


def test_resolve_recipe_leaves_its_input_alone():
    given = rc._unresolved_default("int8")
    given["keep"] = ["img_mlp"]
    before = copy.deepcopy(given)
    out = rc.resolve_recipe(given, 6, keep=["txt_mlp"])
    assert given == before and out["keep"] == ["img_mlp", "txt_mlp"]
    no_keep = {k: v for k, v in before.items() if k != "keep"}
    assert rc.resolve_recipe(no_keep, 6)["keep"] == []


def test_recipe_hash_is_the_sorted_json_sha256():
    r = rc.default_recipe("int8", 6)
    want = hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest()[:16]
    assert rc.recipe_hash(r) == want and len(want) == 16
    assert rc.recipe_hash(dict(reversed(list(r.items())))) == want
    assert rc.recipe_hash({**r, "smoothquant_alpha": 0.5}) != want
    assert rc.recipe_hash({"a": 1}) == hashlib.sha256(b'{"a": 1}').hexdigest()[:16]


def test_is_excluded_matches_case_sensitively():
    r = rc.make_recipe("int8", 6, keep=["img_mlp"])
    assert rc.is_excluded("transformer_blocks.0.attn.to_q", r) and rc.is_excluded("img_in", r)
    assert rc.is_excluded("transformer_blocks.3.img_mlp.net.0.proj", r)
    assert not rc.is_excluded("transformer_blocks.3.attn.to_q", r)
    assert not rc.is_excluded("IMG_IN", r) and not rc.is_excluded("transformer_blocks.3.IMG_MLP.net", r)
    assert not rc.is_excluded("x", {"excluded_patterns": []})


def test_modelopt_config_entries():
    base = copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG)
    r = rc.make_recipe("int8", 4, overrides={"smoothquant_alpha": 1}, keep=["img_mlp"])
    cfg = rc.modelopt_config(r)
    assert cfg["algorithm"] == {"method": "smoothquant", "alpha": 1.0} and isinstance(cfg["algorithm"]["alpha"], float)
    added = cfg["quant_cfg"][len(base["quant_cfg"]):]
    assert cfg["quant_cfg"][:len(base["quant_cfg"])] == base["quant_cfg"]
    assert added[:2] == [{"quantizer_name": "*", "parent_class": "nn.LayerNorm", "enable": False},
                         {"quantizer_name": "*output_quantizer", "enable": False}]
    want = []
    for p in r["excluded_patterns"]:
        name = f"transformer.{p}quantizer" if p.endswith(".*") else f"transformer.{p}.*quantizer"
        want.append({"quantizer_name": name, "enable": False})
    assert added[2:] == want
    assert added[2:4] == [{"quantizer_name": "transformer.img_in.*quantizer", "enable": False}] * 2
    assert added[-2:] == [{"quantizer_name": "transformer.transformer_blocks.*.img_mlp.*quantizer", "enable": False}] * 2
    assert rc.modelopt_config(r, prefix="")["quant_cfg"][len(base["quant_cfg"]) + 2] == \
        {"quantizer_name": "img_in.*quantizer", "enable": False}
    # ModelOpt's own configs are left as they were
    assert mtq.INT8_SMOOTHQUANT_CFG == base and rc.modelopt_config(r) == cfg
    fp8 = rc.modelopt_config(rc.make_recipe("fp8", 4))
    assert fp8["algorithm"] == "max" and fp8["quant_cfg"][1] == mtq.FP8_DEFAULT_CFG["quant_cfg"][1]
    assert rc.modelopt_config(rc.make_recipe("int8", 4, overrides={"algorithm": "max"}))["algorithm"] == "max"
    assert rc.modelopt_config(rc.make_recipe("int8", 4, overrides={"algorithm": "max"}))["quant_cfg"][1] == \
        mtq.INT8_SMOOTHQUANT_CFG["quant_cfg"][1]  # int8 weights per channel either way


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.Module()
        self.attn.to_q = torch.nn.Linear(8, 8)
        self.img_mlp = torch.nn.Module()
        self.img_mlp.net = torch.nn.ModuleList([torch.nn.Linear(8, 8)])
        self.img_mod = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(8, 8))
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x):
        return self.img_mod(self.img_mlp.net[0](self.attn.to_q(self.norm(x))))


def _quantized_layers(recipe):
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.transformer = torch.nn.Module()
    model.transformer.transformer_blocks = torch.nn.ModuleList([_Block() for _ in range(4)])
    model.transformer.img_in = torch.nn.Linear(8, 8)

    def forward_loop(m):
        for _ in range(2):
            x = m.transformer.img_in(torch.randn(4, 8))
            for block in m.transformer.transformer_blocks:
                x = block(x)

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, rc.modelopt_config(recipe), forward_loop)
    on = {n.removeprefix("transformer.") for n, m in model.named_modules()
          if isinstance(m, torch.nn.Linear) and m.weight_quantizer.is_enabled}
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert all(not getattr(q, "is_enabled", False) for n in norms for q in
               (getattr(n, "input_quantizer", None), getattr(n, "weight_quantizer", None)) if q is not None)
    return on


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_modelopt_quantizes_exactly_what_the_recipe_does_not_exclude(precision):
    recipe = rc.make_recipe(precision, 4, overrides={"keep_first_blocks": 1, "keep_last_blocks": 1})
    on = _quantized_layers(recipe)
    assert on == {f"transformer_blocks.{i}.{p}" for i in (1, 2) for p in ("attn.to_q", "img_mlp.net.0", "img_mod.1")}
    assert all(not rc.is_excluded(n, recipe) for n in on)
    recipe = rc.make_recipe(precision, 4, overrides={"keep_first_blocks": 1, "keep_last_blocks": 1,
                                                     "quantize_modulation": False}, keep=["img_mlp"])
    assert _quantized_layers(recipe) == {"transformer_blocks.1.attn.to_q", "transformer_blocks.2.attn.to_q"}
