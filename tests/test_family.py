"""The Qwen-Image family on engines: Edit, Edit-Plus (condition images of other sizes), Img2Img and Inpaint run
through the exported transformer and VAE (encoder and decoder) and equal diffusers' own pipeline at fp32.

The tiny model's images barely move with their inputs (its random VAE decoder flattens them), so every parity check
here also compares the final latents, and shows that what it compares does depend on the input under test.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_image_trt import load_pipeline
from qwen_image_trt.core.errors import InputError
from qwen_image_trt.models.pipelines import load_stock_pipeline
from qwen_image_trt.parity.metrics import psnr

RED = Image.new("RGB", (80, 48), (220, 30, 30))
BLUE = Image.new("RGB", (64, 96), (20, 40, 230))
# Two steps at 64x64: the condition images still add 4096 tokens each (the pipelines resize them to ~1024^2).
EDIT_KW = dict(prompt="the cat wears a red hat", negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=2,
               height=64, width=64)


def _export(kind, tmp_path_factory):
    from qwen_image_trt.compile.export import export_onnx
    from qwen_image_trt.models.tiny import make_tiny_checkpoint

    root = make_tiny_checkpoint(tmp_path_factory.mktemp(kind) / "ckpt", pipeline=kind)
    engines = root.parent / "engines"
    export_onnx(root, engines, precision="fp32", progress=False)
    return root, engines


_EXPORTS: dict = {}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, request):
    """kind -> (checkpoint, fp32 engines), each exported once per module (~45 s); Edit-2511 once per session."""
    def get(kind):
        if kind == "edit-2511":
            return request.getfixturevalue("tiny_edit_2511")
        if kind not in _EXPORTS:
            _EXPORTS[kind] = _export(kind, tmp_path_factory)
        return _EXPORTS[kind]

    yield get
    _EXPORTS.clear()


@pytest.fixture(scope="module")
def edit_plus(exported):
    return exported("edit-2511")


@pytest.fixture(scope="module")
def edit(exported):
    return exported("edit")


def _run(pipe, seed=0, **kw):
    """(uint8 image, final packed latents) of one call."""
    seen = {}

    def keep(p, i, t, tensors):
        seen["latents"] = tensors["latents"].clone()
        return tensors

    image = pipe(**kw, generator=torch.Generator().manual_seed(seed), callback_on_step_end=keep).images[0]
    return np.asarray(image), seen["latents"]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _assert_equal_to_stock(engine_pipe, stock_pipe, **kw):
    got_img, got_lat = _run(engine_pipe, **kw)
    want_img, want_lat = _run(stock_pipe, **kw)
    assert _rel(got_lat, want_lat) <= 1e-5
    assert psnr(want_img, got_img) >= 40
    return want_lat


# -- tiny checkpoints of every kind -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, cls, zero_cond_t", [("edit-plus", "QwenImageEditPlusPipeline", False),
                                                     ("edit-2511", "QwenImageEditPlusPipeline", True)])
def test_tiny_edit_checkpoints_are_what_their_index_says(kind, cls, zero_cond_t, tmp_path):
    from transformers import AutoTokenizer

    from qwen_image_trt.models.processor import load_processor
    from qwen_image_trt.models.tiny import EDIT_SYSTEM_PREFIX, SYSTEM_PREFIX, make_tiny_checkpoint

    root = make_tiny_checkpoint(tmp_path / kind, pipeline=kind)
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == cls and index["processor"] == ["transformers", "Qwen2VLProcessor"]
    assert json.loads((root / "transformer" / "config.json").read_text()).get("zero_cond_t", False) is zero_cond_t
    te = json.loads((root / "text_encoder" / "config.json").read_text())
    processor = load_processor(root / "processor")
    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    for key, token in (("image_token_id", "<|image_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
                       ("vision_end_token_id", "<|vision_end|>")):
        assert te[key] == tok.convert_tokens_to_ids(token) == processor.tokenizer.convert_tokens_to_ids(token)
    assert processor.image_token_id == te["image_token_id"]
    # the pipelines drop exactly this many template tokens
    assert len(tok(SYSTEM_PREFIX).input_ids) == 34 and len(tok(EDIT_SYSTEM_PREFIX).input_ids) == 64
    # one image -> (grid / merge^2) <|image_pad|> tokens, which the vision tower's features replace
    out = processor(text=["<|vision_start|><|image_pad|><|vision_end|>hi"], images=[RED], return_tensors="pt")
    n_pad = int((out["input_ids"] == te["image_token_id"]).sum())
    assert n_pad == int(out["image_grid_thw"].prod()) // 4 >= 1


# -- every pipeline on engines equals diffusers' own -------------------------------------------------------------
@pytest.mark.parametrize("kind", ["edit-2511", pytest.param("edit-plus", marks=pytest.mark.slow)])
def test_edit_plus_with_condition_images_of_two_sizes_equals_stock(exported, kind):
    """2511 (zero_cond_t: modulate_index is a graph input) by default; 2509's graph is the plain one, which the
    single-image Edit test runs with two grids of different sizes (target and condition)."""
    root, engines = exported(kind)
    pipe = load_pipeline(root, engines=engines, backend="onnxruntime")
    assert ("modulate_index" in pipe.transformer.runner.input_metadata()) is (kind == "edit-2511")
    assert type(pipe).__name__ == "QwenImageEditPlusEnginePipeline" and pipe.vae.encoder_runner is not None
    _assert_equal_to_stock(pipe, load_stock_pipeline(root), image=[RED, BLUE], **EDIT_KW)
    # what the gate compares depends on the layout: the same engine fed the condition grids in the other order (a
    # wrong RoPE frame or token split) moves its output by far more than the gate's 1e-5 (the tiny model's images
    # barely move with their inputs, so this is shown on the forward, where swapping the images moved the final
    # latents by 1e-3 relative in a pipeline run)
    g = torch.Generator().manual_seed(6)
    right, wrong = [(1, 2, 2), (1, 3, 5), (1, 4, 4)], [(1, 2, 2), (1, 4, 4), (1, 3, 5)]
    hidden, text = torch.randn(2, 35, 64, generator=g), torch.randn(2, 7, 64, generator=g)
    with torch.no_grad():
        a = pipe.transformer(hidden, text, None, torch.tensor([0.5, 0.5]), img_shapes=[right] * 2)[0]
        b = pipe.transformer(hidden, text, None, torch.tensor([0.5, 0.5]), img_shapes=[wrong] * 2)[0]
    assert _rel(b, a) >= 1e-3


@pytest.mark.slow  # its own export (~45 s); the graph with condition grids is in the default suite just below
def test_edit_single_image_equals_stock(edit):
    root, engines = edit
    pipe = load_pipeline(root, engines=engines, backend="onnxruntime")
    assert type(pipe).__name__ == "QwenImageEditEnginePipeline"
    _assert_equal_to_stock(pipe, load_stock_pipeline(root), image=BLUE, **EDIT_KW)


def test_the_text_to_image_graph_with_condition_grids_equals_stock(tiny_checkpoint, tiny_engines):
    """The plain exported graph (Edit and Edit-2509 share it with text-to-image: the condition grids only change its
    RoPE inputs) in ONNX Runtime, fed a target and two condition grids of other sizes, equals the stock model."""
    from qwen_image_trt.models.checkpoint import load_transformer
    from qwen_image_trt.runtime.backends import make_runner
    from qwen_image_trt.runtime.transformer import EngineTransformer

    stock = load_transformer(tiny_checkpoint)
    dropin = EngineTransformer(make_runner("onnxruntime", "transformer", engines_dir=tiny_engines),
                               dict(stock.config))
    g = torch.Generator().manual_seed(4)
    layout = [(1, 4, 4), (1, 3, 5), (1, 6, 2)]
    hidden, text = torch.randn(2, 43, 64, generator=g), torch.randn(2, 9, 64, generator=g)
    t = torch.tensor([0.9, 0.9])
    with torch.no_grad():
        want = stock(hidden, text, None, t, img_shapes=[layout] * 2, return_dict=False)[0]
        got = dropin(hidden, text, None, t, img_shapes=[layout] * 2, return_dict=False)[0]
        single = dropin(hidden, text, None, t, img_shapes=[[(1, 43, 1)]] * 2, return_dict=False)[0]
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    assert (single - want).abs().max().item() > 1e-2 * want.abs().max().item()  # the layout matters


@pytest.mark.parametrize("kind, extra", [
    ("img2img", dict(strength=0.75)),
    ("inpaint", dict(strength=0.9, mask_image=Image.fromarray(np.repeat([255, 0], 32 * 64).reshape(64, 64)
                                                               .astype(np.uint8)))),  # top half repainted
])
def test_img2img_and_inpaint_on_the_text_to_image_engines_equal_stock(tiny_checkpoint, tiny_engines, kind, extra):
    pipe = load_pipeline(tiny_checkpoint, engines=tiny_engines, backend="onnxruntime", pipeline=kind)
    assert type(pipe).__name__ == {"img2img": "QwenImageImg2ImgEnginePipeline",
                                   "inpaint": "QwenImageInpaintEnginePipeline"}[kind]
    kw = dict(EDIT_KW, num_inference_steps=4, image=RED.resize((64, 64)), **extra)
    want = _assert_equal_to_stock(pipe, load_stock_pipeline(tiny_checkpoint, pipeline=kind), **kw)
    _, other = _run(pipe, **dict(kw, image=BLUE.resize((64, 64))))
    assert _rel(other, want) >= 1e-3  # the input image is encoded (by the VAE encoder engine) and used


def test_the_class_comes_from_the_checkpoint_and_pipeline_picks_a_member(tiny_checkpoint, edit_plus):
    from qwen_image_trt.models.pipelines import pipeline_kind

    assert pipeline_kind(tiny_checkpoint) == "text-to-image" and pipeline_kind(edit_plus[0]) == "edit-plus"
    assert pipeline_kind(tiny_checkpoint, "inpaint") == "inpaint"
    with pytest.raises(InputError) as e:
        pipeline_kind(edit_plus[0], "img2img")
    assert str(e.value) == ("pipeline='img2img' is not allowed: one of edit-plus for a QwenImageEditPlusPipeline "
                            "checkpoint")
    with pytest.raises(InputError, match="batch_cfg"):
        load_pipeline(tiny_checkpoint, pipeline="img2img")(prompt="x", image=RED, batch_cfg=True)


def test_generate_with_images_from_python(edit_plus, tmp_path):
    from qwen_image_trt.runtime.generate import generate_image

    root, engines = edit_plus
    RED.save(tmp_path / "red.png")
    out = generate_image(root, tmp_path / "out.png", prompt="a hat", image=[tmp_path / "red.png"],
                         engines=engines, backend="onnxruntime", steps=2)
    assert Image.open(out).size == (64, 64)
    with pytest.raises(InputError, match=r"^image='4 image\(s\)' is not allowed: 1 to 3 image\(s\) for edit-plus"):
        generate_image(root, tmp_path / "x.png", prompt="a hat", image=[RED] * 4, engines=engines,
                       backend="onnxruntime")
    assert not (tmp_path / "x.png").exists()


# -- export refuses what it does not model ------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [("use_layer3d_rope", True),
                                          ("use_additional_t_cond", True), ("guidance_embeds", True)])
def test_export_refuses_unmodelled_config_fields_by_name(field, value):
    from qwen_image_trt.models.tiny import TRANSFORMER_CONFIG
    from qwen_image_trt.models.transformer_export import check_modeled_config

    check_modeled_config(dict(TRANSFORMER_CONFIG))  # the plain config passes
    with pytest.raises(NotImplementedError, match=f"transformer config {field}={value!r} is not supported"):
        check_modeled_config({**TRANSFORMER_CONFIG, field: value})


def test_a_field_a_later_diffusers_adds_is_refused_until_modelled(monkeypatch):
    from diffusers import QwenImageTransformer2DModel

    from qwen_image_trt.models.tiny import TRANSFORMER_CONFIG
    from qwen_image_trt.models.transformer_export import check_modeled_config

    stock_init = QwenImageTransformer2DModel.__init__

    def future_init(self, patch_size=2, in_channels=64, use_new_trick: bool = False):  # noqa: ARG001
        stock_init(self)

    monkeypatch.setattr(QwenImageTransformer2DModel, "__init__", future_init)
    check_modeled_config({**TRANSFORMER_CONFIG, "use_new_trick": False})
    with pytest.raises(NotImplementedError, match="use_new_trick=True.*does not model this field"):
        check_modeled_config({**TRANSFORMER_CONFIG, "use_new_trick": True})


# -- image inputs: decoded safely, named when wrong ---------------------------------------------------------------
def _png(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("make, field, allowed", [
    (lambda: _png(RED)[:70], "image", "a complete image file"),
    (lambda: b"%PDF-1.4 not an image", "image", "a PNG, JPEG or WebP image"),
    # 6000 x 6000 one-bit pixels: a few KB on the wire, 36 M pixels (108 MB as RGB) if decoded
    (lambda: _png(Image.new("1", (6000, 6000))), "image", "an image of at most 16777216 pixels"),
    (lambda: _png(Image.new("RGB", (8, 64))), "image", "an image at least 16 pixels on each side"),
    (lambda: b"", "image", "an image: PNG, JPEG or WebP bytes or a file path"),
])
def test_bad_images_are_refused_naming_the_field(make, field, allowed):
    from qwen_image_trt.runtime.images import check_image_inputs

    data = make()
    with pytest.raises(InputError) as e:
        check_image_inputs("img2img", [data])
    assert e.value.field == field and e.value.allowed.startswith(allowed)


@pytest.mark.parametrize("kind, kwargs, field", [
    ("edit-plus", dict(images=[]), "image"),
    ("edit", dict(images=[RED, RED]), "image"),
    ("text-to-image", dict(images=[RED]), "image"),
    ("edit", dict(images=[RED], mask=RED), "mask"),
    ("inpaint", dict(images=[RED]), "mask"),
    ("inpaint", dict(images=[RED], mask=Image.new("L", (10 * 8, 10 * 8))), "mask"),
    ("img2img", dict(images=[RED], strength=0), "strength"),
    ("img2img", dict(images=[RED], strength=1.5), "strength"),
    ("edit", dict(images=[RED], strength=0.5), "strength"),
])
def test_image_inputs_must_fit_the_member(kind, kwargs, field):
    from qwen_image_trt.runtime.images import check_image_inputs

    with pytest.raises(InputError) as e:
        check_image_inputs(kind, **kwargs)
    assert e.value.field == field
    ok = check_image_inputs("inpaint", [RED], mask=Image.new("L", RED.size), strength=0.5)
    assert ok["image"].mode == "RGB" and ok["mask_image"].mode == "L" and ok["strength"] == 0.5
    assert len(check_image_inputs("edit-plus", [RED, BLUE, RED])["image"]) == 3


def test_zero_cond_t_graph_module_equals_the_stock_transformer():
    """Edit-2511's forward as exported (timestep 0 for condition tokens through modulate_index, the block's chunk
    written as a slice) equals diffusers' own, for two condition layouts in one batch."""
    import copy

    from diffusers import QwenImageTransformer2DModel

    from qwen_image_trt.models.tiny import TRANSFORMER_CONFIG
    from qwen_image_trt.models.transformer_export import OUTPUT_NAMES, ExportableTransformer, input_names
    from qwen_image_trt.runtime.backends.torch_runner import TorchRunner
    from qwen_image_trt.runtime.transformer import EngineTransformer

    torch.manual_seed(0)
    config = {**TRANSFORMER_CONFIG, "num_layers": 2, "zero_cond_t": True}
    stock = QwenImageTransformer2DModel(**config).eval()
    assert input_names(dict(stock.config))[-1] == "modulate_index"
    runner = TorchRunner("transformer", lambda: ExportableTransformer(copy.deepcopy(stock)),
                         input_names(dict(stock.config)), OUTPUT_NAMES)
    dropin = EngineTransformer(runner, dict(stock.config), text_bucket=8)
    g = torch.Generator().manual_seed(3)
    layouts = [[(1, 2, 3), (1, 4, 2), (1, 1, 3)], [(1, 2, 3), (1, 2, 4), (1, 3, 1)]]
    hidden, text = torch.randn(2, 17, 64, generator=g), torch.randn(2, 5, 64, generator=g)
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        got = dropin(hidden, text, None, t, img_shapes=layouts, return_dict=False)[0]
        for row, layout in enumerate(layouts):
            want = stock(hidden[row:row + 1], text[row:row + 1], None, t[row:row + 1], img_shapes=[layout],
                         return_dict=False)[0]
            assert (got[row:row + 1] - want).abs().max().item() <= 1e-5
        plain = copy.deepcopy(stock)  # without zero_cond_t the condition tokens see the step's t: another result
        plain.zero_cond_t = False
        for b in plain.transformer_blocks:
            b.zero_cond_t = False
        other = plain(hidden[:1], text[:1], None, t[:1], img_shapes=[layouts[0]], return_dict=False)[0]
        assert (other - got[:1]).abs().max().item() > 1e-3


@pytest.fixture(scope="module")
def edit_calibration(edit_plus, tmp_path_factory):
    """Edit-2511 calibration set: the stock Edit-Plus pipeline over 2 prompts x 2 steps with the shipped condition
    images (two, of different sizes, per prompt)."""
    from qwen_image_trt.calibration.capture import calibrate

    out = tmp_path_factory.mktemp("edit-calib") / "calib"
    calibrate(edit_plus[0], out, num_prompts=2, steps=2, holdout=0, progress=False)
    return out


def test_edit_2511_calibration_records_condition_images(edit_plus, edit_calibration):
    """The recorded calls keep every grid, and the replayed inputs are the graph's: RoPE over the target and both
    condition images, and Edit-2511's modulate_index (1 over the condition tokens)."""
    from qwen_image_trt.calibration.capture import CalibrationSet
    from qwen_image_trt.models.checkpoint import read_config
    from qwen_image_trt.models.transformer_export import input_names

    root, _ = edit_plus
    cs = CalibrationSet(edit_calibration)
    calls = list(cs.calls())
    assert calls and all(len(c["grids"]) == 3 for c in calls)  # the target and two condition images
    assert len({c["grids"][1:] for c in calls}) == 2  # each sample's own condition images: the grids vary
    config = read_config(root, "transformer")
    args = next(cs.export_inputs(config["axes_dims_rope"], zero_cond_t=True))
    assert len(args) == len(input_names(config)) and args[-1].dtype == torch.int32
    hidden, (_, h, w) = args[0], calls[0]["grids"][0]
    assert args[-1].shape == hidden.shape[:2] and int(args[-1][0].sum()) == hidden.shape[1] - h * w
    assert args[4].shape[0] == hidden.shape[1]  # image RoPE rows: one per image token, conditions included


@pytest.mark.slow
def test_edit_2511_int8_from_that_calibration_passes_the_stage_check(edit_plus, edit_calibration, one_torch_thread,
                                                                      tmp_path):
    """The INT8 graph quantized from the edit calibration passes the quantize stage's own check (its ONNX Runtime
    output is ModelOpt's simulation) and runs the stock edit pipeline near the fp32 engines (~3 min: opt-in)."""
    from qwen_image_trt.compile.quantize import quantize_onnx

    root, engines = edit_plus
    m = quantize_onnx(root, edit_calibration, tmp_path / "int8", "int8", graphs=engines, progress=False)
    check = m.components["transformer"].check
    assert check["mismatch"] < 0.75, check  # the stage's own gate, with room
    pipe = load_pipeline(root, engines=tmp_path / "int8", backend="onnxruntime")
    kw = dict(EDIT_KW, image=[RED, BLUE])
    got, want = _run(pipe, **kw)[1], _run(load_stock_pipeline(root), **kw)[1]
    assert 0 < _rel(got, want) <= 0.05  # quantized: near, not equal


# -- engine profiles cover what condition images add ---------------------------------------------------------------
def test_condition_geometry_is_diffusers_own():
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    from qwen_image_trt.compile.profiles import condition_dimensions

    for ratio in np.geomspace(0.2, 5.0, 301):
        assert condition_dimensions(1024 * 1024, float(ratio)) == tuple(calculate_dimensions(1024 * 1024, ratio))


def test_edit_profiles_and_limits_cover_condition_images():
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    from qwen_image_trt.compile.profiles import (
        component_profile,
        condition_bounds,
        limits_from_sizes,
        transformer_profile,
    )
    from qwen_image_trt.core.shapes import check_shape_in_profile
    from qwen_image_trt.models.tiny import TRANSFORMER_CONFIG
    from qwen_image_trt.runtime.limits import Limits

    config = {**TRANSFORMER_CONFIG, "zero_cond_t": True}
    t2i = transformer_profile([(1024, 1024)], 1, config=config)
    plus = transformer_profile([(1024, 1024)], 1, config=config, kind="edit-plus")
    bound = condition_bounds("edit-plus")
    assert plus["hidden_states"][2][1] == 4096 + 3 * bound["image_tokens"] > t2i["hidden_states"][2][1]
    assert plus["encoder_hidden_states"][2][1] > t2i["encoder_hidden_states"][2][1]
    assert plus["modulate_index"][2] == (2, plus["hidden_states"][2][1])
    # the most extreme condition images within the aspect bound fit; a 5:1 one would not
    for ratio in (4.0, 0.25, 1.0):
        w, h = calculate_dimensions(1024 * 1024, ratio)
        tokens = 4096 + 3 * (w // 16) * (h // 16)
        check_shape_in_profile("hidden_states", (2, tokens, 64), plus)
        enc = component_profile("vae_encoder", [(1024, 1024)], 1, kind="edit-plus")
        check_shape_in_profile("images", (1, 3, 1, h, w), enc)
    w, h = calculate_dimensions(1024 * 1024, 8.0)
    with pytest.raises(InputError):
        check_shape_in_profile("images", (1, 3, 1, h, w), enc)
    limits = limits_from_sizes([(1024, 1024)], 1, "edit-plus")
    assert limits["condition_aspect"] == 4.0 and "condition_aspect" not in limits_from_sizes([(1024, 1024)], 1)
    assert Limits.from_json(limits).condition_aspect == 4.0


def test_condition_images_beyond_the_profile_aspect_are_refused_by_name():
    from qwen_image_trt.runtime.images import check_image_inputs

    wide = Image.new("RGB", (500, 100))
    with pytest.raises(InputError) as e:
        check_image_inputs("edit-plus", [RED, wide], max_aspect=4.0)
    assert e.value.field == "image[1]" and "1:4 and 4:1" in e.value.allowed
    assert check_image_inputs("edit-plus", [RED, wide])["image"][1].size == (500, 100)  # ONNX graphs: any aspect
