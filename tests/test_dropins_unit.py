"""The drop-ins (runtime/transformer.py, runtime/vae.py, runtime/cfg.py) on small graphs, in seconds: ONNX Runtime
runs graphs that echo what they were fed (so every padded text token, mask bit and RoPE value the drop-in passes is
checked), and a tiny random Qwen-Image transformer through the torch runner equals diffusers' own forward."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput, Transformer2DModelOutput
from onnx import TensorProto, helper, save_model

from qwen_image_trt.models.transformer_export import INPUT_NAMES, RopeTables
from qwen_image_trt.runtime.backends.onnxruntime_runner import OnnxRuntimeRunner
from qwen_image_trt.runtime.cfg import combine_cfg, stack_cfg_text
from qwen_image_trt.runtime.transformer import EngineTransformer, image_grid_groups
from qwen_image_trt.runtime.vae import EngineVAE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

AXES = (8, 12, 12)  # the tiny checkpoint's axes_dims_rope: RoPE tables of 16 values per token
CONFIG = {"axes_dims_rope": AXES, "in_channels": 4, "joint_attention_dim": 8}


def _echo_graph(path, inputs, output):
    """A graph whose one output is all its inputs, flattened (bool as 0/1) and concatenated: it shows exactly what
    it was fed, with ONNX Runtime's own type checks on the way in."""
    nodes, flat = [helper.make_node("Constant", [], ["minus_one"], value=helper.make_tensor("m", TensorProto.INT64,
                                                                                            [1], [-1]))], []
    infos = []
    for name, elem, rank in inputs:
        src = name
        if elem == TensorProto.BOOL:
            nodes.append(helper.make_node("Cast", [name], [name + ".f"], to=TensorProto.FLOAT))
            src = name + ".f"
        nodes.append(helper.make_node("Reshape", [src, "minus_one"], [name + ".flat"]))
        flat.append(name + ".flat")
        infos.append(helper.make_tensor_value_info(name, elem, [f"{name}_{i}" for i in range(rank)]))
    nodes.append(helper.make_node("Concat", flat, [output], axis=0))
    graph = helper.make_graph(nodes, "echo", infos, [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["n"])])
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    return path


@pytest.fixture(scope="module")
def echo_transformer(tmp_path_factory):
    f, b = TensorProto.FLOAT, TensorProto.BOOL
    inputs = [("hidden_states", f, 3), ("encoder_hidden_states", f, 3), ("encoder_hidden_states_mask", b, 2),
              ("timestep", f, 1), ("img_rope_cos", f, 2), ("img_rope_sin", f, 2), ("txt_rope_cos", f, 2),
              ("txt_rope_sin", f, 2)]
    assert [i[0] for i in inputs] == INPUT_NAMES
    return _echo_graph(tmp_path_factory.mktemp("echo") / "transformer.onnx", inputs, "noise_pred")


def _split(out, shapes):
    parts, at = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        parts[name] = out[at:at + n].reshape(shape)
        at += n
    assert at == out.numel(), "the graph was fed more (or less) than expected"
    return parts


def _fed(out, batch, tokens, channels, text, width=8, rope=16):
    return _split(out, {"hidden_states": (batch, tokens, channels), "encoder_hidden_states": (batch, text, width),
                        "encoder_hidden_states_mask": (batch, text), "timestep": (batch,),
                        "img_rope_cos": (tokens, rope), "img_rope_sin": (tokens, rope), "txt_rope_cos": (text, rope),
                        "txt_rope_sin": (text, rope)})


def _dropin(path, **kw):
    return EngineTransformer(OnnxRuntimeRunner("transformer", path), dict(CONFIG), **kw)


def test_dropin_feeds_padded_text_mask_and_real_rope_tables(echo_transformer):
    dropin = _dropin(echo_transformer, text_bucket=4)
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(2, 6, 4, generator=g, dtype=torch.float64)  # a float64 caller: the graph still gets float32
    text = torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    t = torch.tensor([0.25, 0.75], dtype=torch.float64)
    out = dropin(hs, encoder_hidden_states=text, encoder_hidden_states_mask=mask, timestep=t,
                 img_shapes=[[(1, 2, 3)]] * 2, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and out[0].dtype == torch.float64
    fed = _fed(out[0].float(), 2, 6, 4, 8)
    assert torch.equal(fed["hidden_states"], hs.float()) and torch.equal(fed["timestep"], t.float())
    assert torch.equal(fed["encoder_hidden_states"][:, :5], text)
    assert not fed["encoder_hidden_states"][:, 5:].any()  # padded to the 4-token bucket with zeros
    assert fed["encoder_hidden_states_mask"].tolist() == [[1] * 5 + [0] * 3, [1, 1, 1, 0, 0, 0, 0, 0]]
    for name, table in zip(("img_rope_cos", "img_rope_sin", "txt_rope_cos", "txt_rope_sin"), RopeTables(AXES)(1, 2, 3, 8)):
        assert torch.equal(fed[name], table), name  # the grid's own tables, for the padded text length
    assert torch.equal(fed["img_rope_cos"][1], RopeTables(AXES)(1, 2, 3, 8)[0][1])
    assert not torch.equal(fed["img_rope_cos"], fed["img_rope_sin"])


def test_dropin_reuses_its_buffers_without_leaking_an_earlier_call(echo_transformer):
    dropin = _dropin(echo_transformer, text_bucket=8)
    kw = dict(timestep=torch.tensor([0.5]), img_shapes=[[(1, 1, 2)]], return_dict=False)
    long = torch.full((1, 7, 8), 1e6)
    dropin(torch.zeros(1, 2, 4), encoder_hidden_states=long, **kw)
    short = torch.ones(1, 3, 8)
    mask = torch.tensor([[True, False, True]])
    fed = _fed(dropin(torch.zeros(1, 2, 4), encoder_hidden_states=short, encoder_hidden_states_mask=mask, **kw)[0],
               1, 2, 4, 8)
    assert list(dropin._text_buffers) == [(1, 8, 8, torch.device("cpu"))]  # one buffer for the bucket, reused
    assert torch.equal(fed["encoder_hidden_states"][:, :3], short) and not fed["encoder_hidden_states"][:, 3:].any()
    assert fed["encoder_hidden_states_mask"].tolist() == [[1, 0, 1, 0, 0, 0, 0, 0]]
    fed = _fed(dropin(torch.zeros(1, 2, 4), encoder_hidden_states=short, encoder_hidden_states_mask=None, **kw)[0],
               1, 2, 4, 8)
    assert fed["encoder_hidden_states_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0]]  # no mask: every token valid
    fed = _fed(dropin(torch.zeros(2, 2, 4), encoder_hidden_states=torch.ones(2, 9, 8), timestep=torch.ones(2),
                      img_shapes=[[(1, 1, 2)]] * 2, return_dict=False)[0], 2, 2, 4, 16)
    assert fed["encoder_hidden_states_mask"].sum().item() == 18 and len(dropin._text_buffers) == 2


def test_dropin_returns_what_the_pipeline_expects(echo_transformer):
    dropin = _dropin(echo_transformer)
    hs = torch.zeros(1, 4, 4, dtype=torch.bfloat16)
    out = dropin(hs, torch.zeros(1, 3, 8), None, torch.ones(1, dtype=torch.bfloat16), [[(1, 2, 2)]])
    assert isinstance(out, Transformer2DModelOutput) and out.sample.dtype == torch.bfloat16
    fed = _fed(out.sample.float(), 1, 4, 4, 32)  # the default bucket: 32 tokens
    assert fed["timestep"].tolist() == [1.0] and fed["encoder_hidden_states_mask"].sum().item() == 3
    with pytest.raises(NotImplementedError) as e:
        dropin(hs, torch.zeros(1, 3, 8), None, torch.ones(1), [[(1, 2, 2)]], guidance=torch.ones(1))
    assert str(e.value) == "guidance: the exported transformer graph has no such input"


def test_dropin_attributes():
    dropin = EngineTransformer(OnnxRuntimeRunner("transformer", "unused.onnx"), dict(CONFIG), text_bucket="16",
                               device="cpu")
    assert dropin.text_bucket == 16 and dropin.padded_text_len(17) == 32 and dropin.padded_text_len(3) == 16
    assert isinstance(dropin.config, FrozenDict) and dict(dropin.config) == CONFIG
    assert dropin.device == torch.device("cpu") and isinstance(dropin.device, torch.device)
    assert dropin.dtype == torch.float32
    assert isinstance(dropin.cache_context("cond"), contextlib.nullcontext)
    one = EngineTransformer(dropin.runner, dict(CONFIG), text_bucket=0)
    assert one.text_bucket == 1 and one.padded_text_len(5) == 5
    assert EngineTransformer(dropin.runner, dict(CONFIG), text_bucket=-3).text_bucket == 1


@pytest.mark.parametrize("shapes,hidden,message", [
    (None, (1, 4), "img_shapes is required: [[(1, latent_h // 2, latent_w // 2), ...]] * batch"),
    ([], (1, 4), "img_shapes is required: [[(1, latent_h // 2, latent_w // 2), ...]] * batch"),
    ([[(1, 2, 2)], [(1, 2, 2)]], (3, 4), "img_shapes has 2 samples, hidden_states has 3"),
    ([(1, 2, 3)], (1, 5), "img_shapes[0] [(1, 2, 3)] gives 6 tokens, hidden_states has 5"),  # flat (ControlNet)
    ([[1, 2]], (1, 4), "img_shapes[0] = [1, 2]: a list of (frame, height, width) per sample"),
    ([[(1, 2, 3)]], (1, 5), "img_shapes[0] [(1, 2, 3)] gives 6 tokens, hidden_states has 5"),
    ([[(2, 2, 3)]], (1, 6), "img_shapes[0] [(2, 2, 3)] gives 12 tokens, hidden_states has 6"),
    ([[(1, 2, 2)], [(1, 2, 2), (1, 1, 1)]], (2, 4), "img_shapes[1] [(1, 2, 2), (1, 1, 1)] gives 5 tokens, "
                                                     "hidden_states has 4"),
])
def test_image_grid_checks(shapes, hidden, message):
    with pytest.raises(ValueError) as e:
        image_grid_groups(shapes, hidden)
    assert str(e.value) == message


def test_image_grid_groups_of_a_batch():
    assert image_grid_groups([[(1, 2, 3)]] * 3, (3, 6)) == {((1, 2, 3),): [0, 1, 2]}
    assert image_grid_groups([[[2, 2, 3]]], (1, 12)) == {((2, 2, 3),): [0]}  # lists as well as tuples
    assert image_grid_groups([[(1, 2, 3)]], (2, 6)) == {((1, 2, 3),): [0, 1]}  # one layout for the whole batch
    # edit: the target then condition images; samples whose layouts differ (same token count) are grouped
    mixed = [[(1, 2, 2), (1, 2, 3)], [(1, 2, 2), (1, 3, 2)], [(1, 2, 2), (1, 2, 3)]]
    assert image_grid_groups(mixed, (3, 10)) == {((1, 2, 2), (1, 2, 3)): [0, 2], ((1, 2, 2), (1, 3, 2)): [1]}
    # one entry per prompt for prompts x num_images_per_prompt rows (the stock pipelines' img_shapes), prompt-major
    two = [[(1, 2, 2), (1, 2, 3)], [(1, 2, 2), (1, 3, 2)]]
    assert image_grid_groups(two, (4, 10)) == {((1, 2, 2), (1, 2, 3)): [0, 1], ((1, 2, 2), (1, 3, 2)): [2, 3]}


# -- the same forward as diffusers' own transformer ----------------------------------------------------------------
def _stock_and_dropin():
    """A 2-block stock transformer (seed 0) and the drop-in over the torch runner of its export wrapper."""
    from diffusers import QwenImageTransformer2DModel

    from qwen_image_trt.models.tiny import TRANSFORMER_CONFIG
    from qwen_image_trt.models.transformer_export import OUTPUT_NAMES, ExportableTransformer
    from qwen_image_trt.runtime.backends.torch_runner import TorchRunner

    torch.manual_seed(0)
    stock = QwenImageTransformer2DModel(**{**TRANSFORMER_CONFIG, "num_layers": 2}).eval()
    runner = TorchRunner("transformer", lambda: ExportableTransformer(copy.deepcopy(stock)), INPUT_NAMES,
                         OUTPUT_NAMES)
    return stock, EngineTransformer(runner, dict(stock.config), text_bucket=8)


def test_dropin_over_the_torch_runner_equals_the_stock_transformer():
    from qwen_image_trt.models.tiny import TRANSFORMER_CONFIG

    stock, dropin = _stock_and_dropin()
    g = torch.Generator().manual_seed(1)
    kw = dict(hidden_states=torch.randn(2, 6, 64, generator=g),
              encoder_hidden_states=torch.randn(2, 5, TRANSFORMER_CONFIG["joint_attention_dim"], generator=g),
              timestep=torch.tensor([0.3, 0.3]), img_shapes=[[(1, 2, 3)]] * 2, return_dict=False)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    with torch.no_grad():
        for m in (None, mask):
            want = stock(**kw, encoder_hidden_states_mask=m)[0]
            got = dropin(**kw, encoder_hidden_states_mask=m)[0]
            assert (got - want).abs().max().item() <= 1e-5


def test_dropin_equals_the_stock_transformer_with_condition_images():
    """Edit pipelines: the target grid then condition grids of other sizes, each numbered as its own frame by
    RoPE; two samples with different condition layouts in one batch go through one call per layout."""
    from qwen_image_trt.models.tiny import TRANSFORMER_CONFIG

    stock, dropin = _stock_and_dropin()
    g = torch.Generator().manual_seed(2)
    layouts = [[(1, 2, 3), (1, 4, 2), (1, 1, 3)], [(1, 2, 3), (1, 2, 4), (1, 3, 1)]]  # 6 + 8 + 3 tokens each
    hidden = torch.randn(2, 17, 64, generator=g)
    text = torch.randn(2, 5, TRANSFORMER_CONFIG["joint_attention_dim"], generator=g)
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        got = dropin(hidden, text, None, t, img_shapes=layouts, return_dict=False)[0]
        for row, layout in enumerate(layouts):  # the stock model takes one layout per call
            want = stock(hidden[row:row + 1], text[row:row + 1], None, t[row:row + 1], img_shapes=[layout],
                         return_dict=False)[0]
            assert (got[row:row + 1] - want).abs().max().item() <= 1e-5
        same = dropin(hidden, text, None, t, img_shapes=[layouts[0]] * 2, return_dict=False)[0]
        assert (same[1] - got[1]).abs().max().item() > 1e-3  # the layout is not ignored


def test_dropin_refuses_inputs_the_graph_lacks():
    dropin = EngineTransformer(runner=None, config=dict(CONFIG))
    for name in ("guidance", "controlnet_block_samples", "additional_t_cond"):
        with pytest.raises(NotImplementedError, match=name):
            dropin(torch.zeros(1, 4, 4), torch.zeros(1, 2, 8), None, torch.zeros(1), img_shapes=[[(1, 2, 2)]],
                   **{name: torch.zeros(1)})


# -- the VAE drop-in --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vae_graphs(tmp_path_factory):
    """decoder: images = 2 * latents + 1; encoder: latent_params = [images; -images] along channels."""
    folder = tmp_path_factory.mktemp("vae")
    f = TensorProto.FLOAT
    dims = ["b", "c", "t", "h", "w"]
    two, one = (helper.make_tensor(n, f, [], [v]) for n, v in (("two", 2.0), ("one", 1.0)))
    dec = helper.make_graph([helper.make_node("Mul", ["latents", "two"], ["twice"]),
                             helper.make_node("Add", ["twice", "one"], ["images"])], "dec",
                            [helper.make_tensor_value_info("latents", f, dims)],
                            [helper.make_tensor_value_info("images", f, dims)], [two, one])
    enc = helper.make_graph([helper.make_node("Neg", ["images"], ["neg"]),
                             helper.make_node("Concat", ["images", "neg"], ["latent_params"], axis=1)], "enc",
                            [helper.make_tensor_value_info("images", f, dims)],
                            [helper.make_tensor_value_info("latent_params", f, dims)])
    paths = []
    for name, g in (("vae_decoder", dec), ("vae_encoder", enc)):
        save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]), str(folder / f"{name}.onnx"))
        paths.append(OnnxRuntimeRunner(name, folder / f"{name}.onnx"))
    return paths


def test_vae_decode_and_encode_through_runners(vae_graphs):
    decoder, encoder = vae_graphs
    vae = EngineVAE(decoder, {"z_dim": 16, "temperal_downsample": [False, True]}, encoder=encoder)
    z = torch.randn(2, 3, 1, 2, 2, dtype=torch.float64)
    out = vae.decode(z)
    assert isinstance(out, DecoderOutput) and out.sample.dtype == torch.float64
    assert torch.allclose(out.sample, 2 * z + 1)
    images, = vae.decode(z.float(), return_dict=False)
    assert torch.allclose(images, 2 * z.float() + 1)
    x = torch.randn(1, 3, 1, 4, 4, dtype=torch.float64)
    enc = vae.encode(x)
    assert isinstance(enc, AutoencoderKLOutput) and isinstance(enc.latent_dist, DiagonalGaussianDistribution)
    assert enc.latent_dist.mean.dtype == torch.float64 and torch.allclose(enc.latent_dist.mean, x)
    assert torch.allclose(enc.latent_dist.logvar, torch.clamp(-x, -30.0, 20.0))
    dist, = vae.encode(x.float(), return_dict=False)
    assert isinstance(dist, DiagonalGaussianDistribution) and torch.allclose(dist.mean, x.float())
    assert vae.temperal_downsample == [False, True] and vae.decoder_runner is decoder and vae.encoder_runner is encoder


def test_vae_refuses_what_it_cannot_do(vae_graphs):
    decoder, _ = vae_graphs
    vae = EngineVAE(decoder, {"z_dim": 16})
    for bad in (torch.zeros(1, 16, 2, 2), torch.zeros(1, 16, 2, 2, 2)):
        with pytest.raises(ValueError) as e:
            vae.decode(bad)
        assert str(e.value) == f"EngineVAE decodes one frame: expected latents [B, C, 1, h, w], got {list(bad.shape)}"
    with pytest.raises(RuntimeError) as e:
        vae.encode(torch.zeros(1, 3, 1, 4, 4))
    assert str(e.value) == "this engine folder has no vae_encoder graph; export it for the edit pipelines"
    assert vae.temperal_downsample == [False, True, True]  # diffusers' default: the pipeline's scale factor is 8
    assert isinstance(vae.config, FrozenDict) and dict(vae.config) == {"z_dim": 16}
    assert vae.dtype == torch.float32 and vae.device == torch.device("cpu")
    assert EngineVAE(decoder, {}, device="meta").device == torch.device("meta")
    config = {"temperal_downsample": (True, False)}
    assert EngineVAE(decoder, config).temperal_downsample == [True, False]


# -- true CFG in one forward --------------------------------------------------------------------------------------
def test_stack_cfg_text_pads_both_branches_to_one_length():
    cond = torch.arange(1.0, 1 + 2 * 3 * 2).reshape(2, 3, 2)
    uncond = -torch.arange(1.0, 1 + 2 * 1 * 2).reshape(2, 1, 2)
    cond_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    text, mask = stack_cfg_text(cond, cond_mask, uncond, None)
    assert text.shape == (4, 3, 2) and mask.dtype == torch.bool and mask.shape == (4, 3)
    assert torch.equal(text[:2], cond) and torch.equal(text[2:, :1], uncond) and not text[2:, 1:].any()
    assert mask.tolist() == [[True, True, False], [True, True, True], [True, False, False], [True, False, False]]
    text, mask = stack_cfg_text(uncond, None, cond, cond_mask.bool())  # the longer one second: padded first
    assert torch.equal(text[2:], cond) and not text[:2, 1:].any()
    assert mask.tolist() == [[True, False, False], [True, False, False], [True, True, False], [True, True, True]]
    half, _ = stack_cfg_text(cond.half(), None, uncond.half(), None)
    assert half.dtype == torch.float16


def test_combine_cfg_is_qwen_images_norm_preserving_guidance():
    cond = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])
    uncond = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    got = combine_cfg(cond, uncond, 2.0)
    comb = uncond + 2.0 * (cond - uncond)  # [[5, 8], [2, -1]]
    want = comb * (cond.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
    assert torch.allclose(got, want)
    assert torch.allclose(got.norm(dim=-1), cond.norm(dim=-1))  # each token keeps the conditional norm
    assert torch.allclose(got[0, 0], torch.tensor([5.0, 8.0]) * 5 / 89 ** 0.5)
    assert torch.allclose(combine_cfg(cond, uncond, 1), cond)  # scale 1: the conditional prediction itself
    batch_c, batch_u = torch.cat([cond, 2 * cond]), torch.cat([uncond, uncond])
    per_sample = combine_cfg(batch_c, batch_u, [2.0, 4.0])
    assert torch.allclose(per_sample[0], got[0]) and torch.allclose(per_sample[1], combine_cfg(2 * cond, uncond, 4.0)[0])
    as_tensor = combine_cfg(batch_c, batch_u, torch.tensor([2.0, 4.0], dtype=torch.float64))
    assert torch.allclose(as_tensor, per_sample) and as_tensor.dtype == torch.float32
    assert torch.allclose(combine_cfg(cond, uncond, np.float32(2.0)), got)


# -- device: every tensor a drop-in makes lives where its inputs live ----------------------------------------------
# The "meta" device stands in for a GPU here: a tensor made on the CPU next to meta inputs fails, as it would on CUDA.
class _OneDevice(torch.nn.Module):
    """Concatenates all its inputs (which fails across devices) and returns the first."""

    def forward(self, *args):
        return args[0] + 0 * torch.cat([a.float().reshape(-1) for a in args]).sum()


def test_dropin_makes_its_buffers_and_tables_on_the_inputs_device():
    from qwen_image_trt.runtime.backends.torch_runner import TorchRunner

    runner = TorchRunner("transformer", _OneDevice, INPUT_NAMES, ["noise_pred"], device="meta")
    dropin = EngineTransformer(runner, dict(CONFIG), device="meta")
    meta = dict(device="meta")
    out = dropin(torch.zeros(1, 4, 4, **meta), torch.zeros(1, 3, 8, **meta), None, torch.zeros(1, **meta),
                 [[(1, 2, 2)]]).sample
    assert out.device.type == "meta" and out.shape == (1, 4, 4)
    text, mask, padded = dropin._padded_text(torch.zeros(2, 3, 8, **meta), torch.ones(2, 3, dtype=torch.bool, **meta))
    assert (text.device.type, mask.device.type, padded) == ("meta", "meta", 32)


def test_cfg_tensors_stay_on_the_inputs_device():
    cond, uncond = torch.zeros(2, 3, 4, device="meta"), torch.zeros(2, 2, 4, device="meta")
    text, mask = stack_cfg_text(cond, None, uncond, None)
    assert text.device.type == mask.device.type == "meta" and mask.shape == (4, 3)
    assert combine_cfg(cond, cond, [1.0, 2.0]).device.type == "meta"


def test_flat_image_shapes_of_the_controlnet_pipelines_are_one_grid_per_sample():
    from qwen_image_trt.runtime.transformer import image_grid_groups

    assert image_grid_groups([(1, 2, 2)] * 2, (2, 4)) == {((1, 2, 2),): [0, 1]}
    assert image_grid_groups([(1, 2, 2)] * 2, (2, 4)) == image_grid_groups([[(1, 2, 2)]] * 2, (2, 4))
