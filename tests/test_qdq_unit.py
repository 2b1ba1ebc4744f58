"""The Q/DQ writer (compile/qdq.py) on small objects, in milliseconds: real ModelOpt quantizers on a few Linear layers,
hand-built ONNX graphs of the same layers (as the exporter lays them out: MatMul on W^T, Gemm with transB=1), and
ONNX Runtime running what was written. What the slow tests in test_quantize.py check on the tiny checkpoint, these
check number by number, so a wrong scale, rounding, layout or message fails here (and `mutmut run` is fast).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # ModelOpt warns about the installed transformers version
    import modelopt.torch.quantization as mtq

from qwen_image_trt.compile import qdq
from qwen_image_trt.compile.onnx_io import NAME_SCOPES
from qwen_image_trt.compile.recipe import make_recipe, modelopt_config
from qwen_image_trt.core.errors import QitrtError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WIDTH = 16
Q = "transformer_blocks.1.attn.to_q"  # quantized, MatMul on W^T (+ Add for its bias)
MLP = "transformer_blocks.1.img_mlp"  # quantized, Gemm(transB=1) on W


# -- a tiny transformer-shaped model: 3 blocks of (to_q, img_mlp), proj_out ---------------------------------------
class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.Module()
        self.attn.to_q = torch.nn.Linear(WIDTH, WIDTH)
        self.img_mlp = torch.nn.Linear(WIDTH, WIDTH, bias=False)

    def forward(self, x):
        return self.img_mlp(self.attn.to_q(x))


class _Transformer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([_Block() for _ in range(3)])
        self.proj_out = torch.nn.Linear(WIDTH, 8)

    def forward(self, x):
        for block in self.transformer_blocks:
            x = block(x)
        return self.proj_out(x)


class _Wrapper(torch.nn.Module):  # ExportableTransformer's layout: the transformer lives under `transformer.`
    def __init__(self):
        super().__init__()
        self.transformer = _Transformer()

    def forward(self, x):
        return self.transformer(x)


def _inputs(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, WIDTH, generator=g) * torch.linspace(0.1, 5.0, WIDTH)  # uneven channels: smoothing matters


def _calibrate(precision):
    torch.manual_seed(0)
    model = _Wrapper().eval()
    high = copy.deepcopy(model)
    recipe = make_recipe(precision, 3, overrides={"keep_first_blocks": 1, "keep_last_blocks": 1})
    batches = [_inputs(8, s) for s in range(4)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = mtq.quantize(model, modelopt_config(recipe), lambda m: [m(x) for x in batches])
    return model, high


@pytest.fixture(scope="module")
def int8():
    return _calibrate("int8")


@pytest.fixture(scope="module")
def fp8():
    return _calibrate("fp8")


def _linear(nodes, inits, x, module, name, gemm: bool, dtype=np.float32):
    full = f"transformer.{name}"
    w = module.weight.detach().numpy().astype(dtype)
    bias = module.bias.detach().numpy().astype(dtype) if module.bias is not None else None
    out = f"{name}/out"
    if gemm:
        inits.append(numpy_helper.from_array(w, f"{full}.weight"))
        if bias is not None:
            inits.append(numpy_helper.from_array(bias, f"{full}.bias"))
        node = helper.make_node("Gemm", [x, f"{full}.weight"] + ([f"{full}.bias"] if bias is not None else []), [out],
                                name=f"{name}/gemm", transB=1)
        nodes.append(node)
    else:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"{full}.weight.T"))
        node = helper.make_node("MatMul", [x, f"{full}.weight.T"], [out + ".mm" if bias is not None else out],
                                name=f"{name}/matmul")
        nodes.append(node)
        if bias is not None:
            inits.append(numpy_helper.from_array(bias, f"{full}.bias"))
            nodes.append(helper.make_node("Add", [out + ".mm", f"{full}.bias"], [out], name=f"{name}/add"))
    entry = node.metadata_props.add()  # what the dynamo exporter records: the module path, then the op
    entry.key, entry.value = NAME_SCOPES, repr(["", full, "linear"])
    return out


def _graph(model, dtype=np.float32, extra_inits=()):
    """The ONNX graph of `model` (its current weights), as ONNX IR."""
    nodes, inits, x = [], list(extra_inits), "x"
    t = model.transformer
    for i, block in enumerate(t.transformer_blocks):
        x = _linear(nodes, inits, x, block.attn.to_q, f"transformer_blocks.{i}.attn.to_q", False, dtype)
        x = _linear(nodes, inits, x, block.img_mlp, f"transformer_blocks.{i}.img_mlp", True, dtype)
    x = _linear(nodes, inits, x, t.proj_out, "proj_out", False, dtype)
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, ["n", WIDTH])],
                          [helper.make_tensor_value_info("y", elem, ["n", 8])], inits)
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]))


def _run(model, x):
    proto = ir.serde.serialize_model(model)
    from qwen_image_trt.core.ort_options import session_options

    sess = ort.InferenceSession(proto.SerializeToString(), sess_options=session_options(),
                                providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])


def _written(calibrated, precision):
    model, _ = calibrated
    layers, kept = qdq.from_modelopt(model, precision)
    graph = _graph(model)
    counts = qdq.insert_qdq(graph, layers, qdq.graph_float_dtype(graph))
    return graph, layers, kept, counts


def _nodes(graph):
    return {n.name: n for n in graph.graph}


# -- quantize_weight / dequantize: the arithmetic, in exact numbers (levels = value / scale, rounded half to even) ---
def test_int8_weights_round_half_to_even_per_channel_and_clamp():
    w = torch.tensor([[1.0, -0.5, 0.25, 2.0, -3.0], [2.0, 3.0, -4.0, 0.0, 63.5 * 4 / 127]])
    amax = torch.tensor([[1.0], [4.0]])
    q, scale = qdq.quantize_weight(w, amax, "int8")
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (2,)
    np.testing.assert_allclose(scale, [1 / 127, 4 / 127], rtol=1e-7)
    # -0.5 * 127 = -63.5 -> -64 and 63.5 -> 64 (half to even); past amax: 127 and -128 (narrow range off)
    assert q.tolist() == [[127, -64, 32, 127, -128], [64, 95, -127, 0, 64]]


def test_per_tensor_amax_gives_a_scalar_scale():
    q, scale = qdq.quantize_weight(torch.tensor([[0.5, -1.0]]), torch.tensor(2.0), "int8")
    assert scale.shape == () and float(scale) == pytest.approx(2 / 127) and q.tolist() == [[32, -64]]
    q, scale = qdq.quantize_weight(torch.tensor([[0.5, -1.0]]), torch.tensor([[2.0]]), "int8")  # one channel
    assert scale.shape == () and q.tolist() == [[32, -64]]


def test_fp8_weights_saturate_and_round_to_e4m3():
    w = torch.tensor([[500.0, -1000.0, 0.3, 1.0, -17.0, 0.0]])
    q, scale = qdq.quantize_weight(w, torch.tensor(448.0), "fp8")
    assert q.dtype == np.uint8 and scale.shape == () and float(scale) == 1.0
    values = torch.from_numpy(q).view(torch.float8_e4m3fn).float()
    assert values[0].tolist() == pytest.approx([448.0, -448.0, 0.3125, 1.0, -16.0, 0.0])
    _, scale = qdq.quantize_weight(w, torch.tensor(224.0), "fp8")
    assert float(scale) == 0.5


def test_a_quantizer_that_saw_only_zeros_keeps_a_finite_scale():
    q, scale = qdq.quantize_weight(torch.zeros(2, 3), torch.zeros(2, 1), "int8")
    assert np.all(scale > 0) and np.all(np.isfinite(scale)) and not q.any()
    np.testing.assert_allclose(scale, [qdq.MIN_AMAX / 127] * 2)
    assert qdq.BOUNDS == {"int8": 127.0, "fp8": 448.0} and qdq.MIN_AMAX == 1e-12


def test_dequantize_per_channel_along_either_axis_and_fp8():
    q = np.array([[1, -2, 3], [4, 5, -6]], np.int8)
    assert qdq.dequantize(q, np.array([0.5, 2.0], np.float32), "int8").tolist() == [[0.5, -1, 1.5], [8, 10, -12]]
    assert qdq.dequantize(q, np.array([1.0, 10.0, 100.0], np.float32), "int8", axis=1).tolist() == \
        [[1, -20, 300], [4, 50, -600]]
    assert qdq.dequantize(q, np.float32(0.5), "int8").tolist() == [[0.5, -1, 1.5], [2, 2.5, -3]]
    bits = torch.tensor([[2.0, -0.5]]).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert qdq.dequantize(bits, np.float32(3.0), "fp8").tolist() == [[6.0, -1.5]]


# -- from_modelopt: exactly the calibrated numbers, layer by layer --------------------------------------------------
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_from_modelopt_reads_the_calibrated_numbers(precision, request):
    model, _ = request.getfixturevalue(precision)
    layers, kept = qdq.from_modelopt(model, precision)
    assert sorted(layers) == [Q, MLP]
    assert kept == ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.img_mlp", "transformer_blocks.2.attn.to_q",
                    "transformer_blocks.2.img_mlp", "proj_out"]
    bound = {"int8": 127.0, "fp8": 448.0}[precision]
    for name, layer in layers.items():
        m = model.transformer.get_submodule(name)
        assert layer.name == name and layer.precision == precision
        assert layer.input_scale == pytest.approx(float(m.input_quantizer.amax) / bound, rel=1e-6)
        assert layer.weight_q.shape == (WIDTH, WIDTH) and layer.weight_scale.dtype == np.float32
        if precision == "int8":  # per output channel, smoothed
            assert layer.weight_q.dtype == np.int8
            np.testing.assert_allclose(layer.weight_scale, m.weight_quantizer.amax.reshape(-1).numpy() / bound,
                                       rtol=1e-6)
            np.testing.assert_array_equal(layer.pre_quant_scale, m.input_quantizer.pre_quant_scale.reshape(-1).numpy())
            assert layer.pre_quant_scale.dtype == np.float32 and np.std(layer.pre_quant_scale) > 0.05
        else:  # per tensor, not smoothed
            assert layer.weight_q.dtype == np.uint8 and layer.weight_scale.shape == ()
            assert float(layer.weight_scale) == pytest.approx(float(m.weight_quantizer.amax) / bound, rel=1e-6)
            assert layer.pre_quant_scale is None
        # the stored weight is ModelOpt's fake-quantized weight
        want = m.weight_quantizer(m.weight.detach()).float()
        got = qdq.dequantize(layer.weight_q, layer.weight_scale, precision)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)
        pqs = layer.pre_quant_scale.nbytes if layer.pre_quant_scale is not None else 0
        assert layer.nbytes == layer.weight_q.nbytes + layer.weight_scale.nbytes + pqs


def test_from_modelopt_names_layers_under_the_prefix_it_is_given(int8):
    model, _ = int8
    layers, kept = qdq.from_modelopt(model.transformer, "int8", prefix="")
    assert sorted(layers) == [Q, MLP] and "proj_out" in kept
    layers, _ = qdq.from_modelopt(model, "int8", prefix="transformer.transformer_blocks.")
    assert sorted(layers) == ["1.attn.to_q", "1.img_mlp"]


def test_from_modelopt_refuses_a_weight_only_layer(int8):
    model = copy.deepcopy(int8[0])
    model.transformer.get_submodule(MLP).input_quantizer.disable()
    with pytest.raises(QitrtError) as e:
        qdq.from_modelopt(model, "int8")
    assert str(e.value) == (f"{MLP}: weight quantizer on but input quantizer off or uncalibrated; the recipe quantizes "
                            "weights and activations together (no calibration data reached it?)")
    model = copy.deepcopy(int8[0])
    model.transformer.get_submodule(Q).input_quantizer.reset_amax()  # enabled but never calibrated
    with pytest.raises(QitrtError, match=f"^{Q}: weight quantizer on but input quantizer off or uncalibrated"):
        qdq.from_modelopt(model, "int8")
    model = copy.deepcopy(int8[0])
    model.transformer.get_submodule(Q).weight_quantizer.reset_amax()
    with pytest.raises(QitrtError, match=f"^{Q}: weight quantizer on but input quantizer off or uncalibrated"):
        qdq.from_modelopt(model, "int8")


def test_from_modelopt_checks_its_numbers_against_modelopts_quantizers(int8):
    """agree_with_modelopt: a weight scale that is not ModelOpt's, or an input scale off, is refused."""
    model, _ = int8
    layer = qdq.from_modelopt(model, "int8")[0][Q]
    linear = model.transformer.get_submodule(Q)
    qdq.agree_with_modelopt(linear, layer)
    bad = copy.deepcopy(layer)
    bad.weight_scale = bad.weight_scale * 1.01
    with pytest.raises(QitrtError, match=f"^{Q}: the stored quantized weight does not dequantize"):
        qdq.agree_with_modelopt(linear, bad)
    bad = copy.deepcopy(layer)
    bad.input_scale *= 1.3
    with pytest.raises(QitrtError, match=f"^{Q}: our input quantization"):
        qdq.agree_with_modelopt(linear, bad)


def test_modules_that_are_not_linear_are_not_read():
    class Odd(torch.nn.Module):  # carries a weight quantizer but is not an nn.Linear
        weight_quantizer = None

    class Conv(torch.nn.Conv1d):
        pass

    conv = Conv(2, 2, 1)
    conv.weight_quantizer = object()  # would fail if it were read
    root = torch.nn.Module()
    root.odd, root.conv = Odd(), conv
    assert qdq.from_modelopt(root, "int8") == ({}, [])


# -- insert_qdq: the graph ONNX Runtime runs is the quantization ModelOpt simulated ---------------------------------
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_written_graph_runs_as_modelopt_simulates(precision, request):
    calibrated = request.getfixturevalue(precision)
    model, high = calibrated
    graph, _, _, _ = _written(calibrated, precision)
    x = _inputs(32, seed=9)
    with torch.no_grad():
        fake, reference = model(x), high(x)
    got = _run(graph, x)
    quant_error = (fake - reference).abs().max().item()
    assert quant_error > 1e-3  # the quantized blocks do change the output
    assert (got - fake).abs().max().item() < 1e-3 * quant_error  # ... exactly as ModelOpt's fake quantizers do
    assert (_run(_graph(high), x) - reference).abs().max().item() < 1e-5  # the hand-built graph is the model


def test_insert_qdq_rewires_each_layer(int8):
    graph, layers, _, counts = _written(int8, "int8")
    assert counts == {"quantized_matmuls": 2, "smoothed_inputs": 2, "weights_stored_quantized": 2, "dead_layers": [],
                      "quantize_nodes": 2, "dequantize_nodes": 4}
    nodes = _nodes(graph)
    inits = graph.graph.initializers
    for name, node_name, transposed in ((Q, f"{Q}/matmul", True), (MLP, f"{MLP}/gemm", False)):
        layer, node = layers[name], nodes[node_name]
        smooth, quant, dequant, w_dq = (nodes[f"{name}/{s}"] for s in
                                        ("smooth", "input_quantize", "input_dequantize", "weight_dequantize"))
        assert (smooth.op_type, quant.op_type, dequant.op_type, w_dq.op_type) == \
            ("Mul", "QuantizeLinear", "DequantizeLinear", "DequantizeLinear")
        # x -> Mul(pre_quant_scale) -> Q -> DQ -> MatMul <- DQ <- W_q
        assert node.inputs[0] is dequant.outputs[0] and node.inputs[1] is w_dq.outputs[0]
        assert dequant.inputs[0] is quant.outputs[0] and quant.inputs[0] is smooth.outputs[0]
        assert quant.inputs[1] is dequant.inputs[1] and quant.inputs[2] is dequant.inputs[2]  # one scale, one zero
        names = {f"{name}.{s}" for s in ("input_quantizer.pre_quant_scale", "input_quantizer.scale",
                                         "input_quantizer.zero_point", "weight.quantized", "weight_quantizer.scale",
                                         "weight_quantizer.zero_point")}
        assert names <= set(inits)
        assert [v.name for v in (smooth.inputs[1], quant.inputs[1], quant.inputs[2], *w_dq.inputs)] == [
            f"{name}.input_quantizer.pre_quant_scale", f"{name}.input_quantizer.scale",
            f"{name}.input_quantizer.zero_point", f"{name}.weight.quantized", f"{name}.weight_quantizer.scale",
            f"{name}.weight_quantizer.zero_point"]
        stored = inits[f"{name}.weight.quantized"].const_value
        assert stored.dtype == ir.DataType.INT8
        np.testing.assert_array_equal(stored.numpy(), layer.weight_q.T if transposed else layer.weight_q)
        assert w_dq.attributes["axis"].value == (1 if transposed else 0)
        np.testing.assert_array_equal(inits[f"{name}.weight_quantizer.scale"].const_value.numpy(), layer.weight_scale)
        zp = inits[f"{name}.weight_quantizer.zero_point"].const_value
        assert zp.dtype == ir.DataType.INT8 and zp.shape == (WIDTH,) and not zp.numpy().any()
        a_zp = inits[f"{name}.input_quantizer.zero_point"].const_value
        assert a_zp.dtype == ir.DataType.INT8 and a_zp.shape == () and not a_zp.numpy().any()
        a_scale = inits[f"{name}.input_quantizer.scale"].const_value
        assert a_scale.dtype == ir.DataType.FLOAT and a_scale.shape == ()
        assert float(a_scale.numpy()) == np.float32(layer.input_scale)
        np.testing.assert_array_equal(inits[f"{name}.input_quantizer.pre_quant_scale"].const_value.numpy(),
                                      layer.pre_quant_scale)
        # the high-precision weight is gone; kept layers' weights stay
        assert not {f"transformer.{name}.weight", f"transformer.{name}.weight.T"} & set(inits)
    assert {"transformer.transformer_blocks.0.attn.to_q.weight.T", "transformer.proj_out.weight.T",
            "transformer.transformer_blocks.2.img_mlp.weight"} <= set(inits)
    assert qdq.graph_numbers_problems(graph, qdq.expected_numbers(layers)) == []


def test_fp8_layers_are_per_tensor_without_smoothing(fp8):
    graph, layers, _, counts = _written(fp8, "fp8")
    assert counts["smoothed_inputs"] == 0 and counts["quantized_matmuls"] == 2 and counts["dequantize_nodes"] == 4
    nodes, inits = _nodes(graph), graph.graph.initializers
    for name in (Q, MLP):
        assert f"{name}/smooth" not in nodes and "axis" not in nodes[f"{name}/weight_dequantize"].attributes
        assert nodes[f"{name}/input_quantize"].inputs[0].name != f"{name}.input_quantizer.pre_quant_scale"
        for init in ("weight.quantized", "weight_quantizer.zero_point", "input_quantizer.zero_point"):
            assert inits[f"{name}.{init}"].const_value.dtype == ir.DataType.FLOAT8E4M3FN, init
        assert inits[f"{name}.weight_quantizer.zero_point"].const_value.shape == ()
        bits = inits[f"{name}.weight.quantized"].const_value.numpy().view(np.uint8)
        np.testing.assert_array_equal(bits, layers[name].weight_q.T if name == Q else layers[name].weight_q)
    assert qdq.graph_numbers_problems(graph, qdq.expected_numbers(layers)) == []


def test_dead_layers_are_dropped_and_unmatched_ones_refused(int8):
    model, _ = int8
    layers, _ = qdq.from_modelopt(model, "int8")
    dead = copy.deepcopy(layers[Q])
    layers["transformer_blocks.9.attn.to_q"] = dead  # the exporter dropped it with its weight: nothing to quantize
    layers["transformer_blocks.0.attn.add_q_proj"] = dead
    graph = _graph(model)
    counts = qdq.insert_qdq(graph, layers, ir.DataType.FLOAT)
    assert counts["dead_layers"] == ["transformer_blocks.0.attn.add_q_proj", "transformer_blocks.9.attn.to_q"]
    assert sorted(layers) == [Q, MLP] and counts["quantized_matmuls"] == 2
    # a weight in the graph but no MatMul that reads it as a Linear: not this exporter's graph
    for weight in ("transformer.transformer_blocks.7.img_mlp.weight", "transformer.transformer_blocks.7.img_mlp.weight.T"):
        layers, _ = qdq.from_modelopt(model, "int8")
        layers["transformer_blocks.7.img_mlp"] = layers[MLP]
        layers["transformer_blocks.8.img_mlp"] = layers[MLP]
        stray = [numpy_helper.from_array(np.zeros((2, 2), np.float32), w)
                 for w in (weight, weight.replace(".7.", ".8."))]
        with pytest.raises(QitrtError) as e:
            qdq.insert_qdq(_graph(model, extra_inits=stray), layers, ir.DataType.FLOAT)
        assert str(e.value) == ("2 layer(s) the recipe quantizes have no matrix multiplication with a weight in the "
                                "exported graph (first: transformer_blocks.7.img_mlp): was the graph exported by this "
                                "version of `qitrt export`?")


def test_a_weight_read_elsewhere_too_is_kept(int8):
    model, _ = int8
    layers, _ = qdq.from_modelopt(model, "int8")
    graph = _graph(model)
    weight = graph.graph.initializers[f"transformer.{MLP}.weight"]
    graph.graph.append(ir.Node("", "Identity", [weight], name="also_reads_it"))
    qdq.insert_qdq(graph, layers, ir.DataType.FLOAT)
    assert f"transformer.{MLP}.weight" in graph.graph.initializers
    assert f"transformer.{Q}.weight.T" not in graph.graph.initializers


@pytest.mark.parametrize("dtype,ir_dtype", [(np.float16, ir.DataType.FLOAT16), ("bf16", ir.DataType.BFLOAT16)])
def test_half_precision_graphs_get_scales_in_their_own_type(int8, dtype, ir_dtype):
    model, _ = int8
    layers, _ = qdq.from_modelopt(model, "int8")
    graph = _graph(model, np.float16 if dtype == "bf16" else dtype)
    if dtype == "bf16":  # no numpy bfloat16: relabel the half graph's weights as bf16 bits of the same values
        for v in list(graph.graph.initializers.values()):
            arr = v.const_value.numpy().astype(np.float32)
            bits = torch.from_numpy(arr).to(torch.bfloat16).view(torch.uint16).numpy()
            v.const_value = ir.tensor(bits, dtype=ir.DataType.BFLOAT16, name=v.name)
    assert qdq.graph_float_dtype(graph) == ir_dtype
    qdq.insert_qdq(graph, layers, qdq.graph_float_dtype(graph))
    inits = graph.graph.initializers
    for name in (Q, MLP):
        for init in ("input_quantizer.scale", "weight_quantizer.scale", "input_quantizer.pre_quant_scale"):
            tensor = inits[f"{name}.{init}"].const_value
            assert tensor.dtype == ir_dtype, init
        got = np.asarray(inits[f"{name}.weight_quantizer.scale"].const_value.numpy(), dtype=np.float32)
        np.testing.assert_allclose(got, layers[name].weight_scale, rtol=2 ** -8)
    assert qdq.graph_numbers_problems(graph, qdq.expected_numbers(layers)) == []  # exact up to the graph's type


def test_graph_float_dtype_is_that_of_the_largest_float_initializer():
    def model(*arrays):
        inits = [numpy_helper.from_array(a, f"w{i}") for i, a in enumerate(arrays)]
        g = helper.make_graph([], "g", [], [], inits)
        return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]))

    assert qdq.graph_float_dtype(model(np.zeros(3, np.float32), np.zeros(8, np.float16))) == ir.DataType.FLOAT16
    assert qdq.graph_float_dtype(model(np.zeros(9, np.float32), np.zeros(8, np.float16))) == ir.DataType.FLOAT
    assert qdq.graph_float_dtype(model(np.zeros(100, np.int64), np.zeros(2, np.float16))) == ir.DataType.FLOAT16
    assert qdq.graph_float_dtype(model(np.zeros(100, np.int64))) == ir.DataType.FLOAT
    assert qdq.graph_float_dtype(model()) == ir.DataType.FLOAT


def test_expected_numbers_are_the_layers_own(int8):
    layers, _ = qdq.from_modelopt(int8[0], "int8")
    numbers = qdq.expected_numbers(layers)
    assert sorted(numbers) == [Q, MLP]
    for name, n in numbers.items():
        assert sorted(n) == ["input_scale", "pre_quant_scale", "weight_scale"]
        assert n["input_scale"] == np.float32(layers[name].input_scale) and n["input_scale"].dtype == np.float32
        assert n["weight_scale"] is layers[name].weight_scale and n["pre_quant_scale"] is layers[name].pre_quant_scale


# -- graph_numbers_problems: every number that can be wrong is named ------------------------------------------------
def _const(value, name="tampered"):
    return ir.Value(name=name, const_value=ir.tensor(np.asarray(value), name=name))


def _scaled(value, factor):
    return _const(value.const_value.numpy() * np.float32(factor))


# Breaks that multiply one node's second input (its scale, or the smoothing factors) by a factor.
SCALED = {"activation_scale": ("input_quantize", 4), "dequantize_scale": ("input_dequantize", 0.5),
          "weight_scale": ("weight_dequantize", 0.25), "weight_scale_slightly": ("weight_dequantize", 1.05),
          "weight_scale_bf16_rounding": ("weight_dequantize", 1.005), "smoothing": ("smooth", 2)}


def _break(graph, how):
    nodes = _nodes(graph)
    q, dq, w_dq, smooth = (nodes[f"{Q}/{s}"] for s in ("input_quantize", "input_dequantize", "weight_dequantize",
                                                        "smooth"))
    if how in SCALED:
        node_name, factor = SCALED[how]
        node = nodes[f"{Q}/{node_name}"]
        node.replace_input_with(1, _scaled(node.inputs[1], factor))
    elif how == "activation_zero_point":
        q.replace_input_with(2, _const(np.array(3, np.int8)))
    elif how == "weight_zero_point":
        zp = np.zeros(WIDTH, np.int8)
        zp[5] = -1
        w_dq.replace_input_with(2, _const(zp))
    elif how == "weight_scale_size":
        w_dq.replace_input_with(1, _const(np.ones(3, np.float32)))
    elif how == "weight_scale_not_constant":
        w_dq.replace_input_with(1, ir.Value(name="computed"))
    elif how == "axis":
        w_dq.attributes["axis"] = ir.AttrInt64("axis", 0)
    elif how == "no_axis_on_gemm":
        del nodes[f"{MLP}/weight_dequantize"].attributes["axis"]
    elif how == "no_axis_on_matmul":  # ONNX's default axis is 1: right for the MatMul's [in, out] layout
        del w_dq.attributes["axis"]
    elif how == "smoothing_removed":
        q.replace_input_with(0, smooth.inputs[0])
    elif how == "smoothing_not_constant":
        smooth.replace_input_with(1, ir.Value(name="computed"))
    elif how == "no_quantize":  # DQ straight from the smoothed activation
        dq.replace_input_with(0, smooth.outputs[0])
    elif how == "dequantize_of_input":
        dq.replace_input_with(0, graph.graph.inputs[0])
    elif how == "weight_not_dequantized":
        nodes[f"{Q}/matmul"].replace_input_with(1, w_dq.inputs[0])
    elif how == "activation_not_dequantized":
        nodes[f"{Q}/matmul"].replace_input_with(0, q.inputs[0])
    elif how == "zero_points_omitted":  # optional inputs: absent means 0
        for node in (q, w_dq):
            node.resize_inputs(2)
    return graph


@pytest.mark.parametrize("how,problems", [
    ("activation_scale", [f"{Q}: activation scale in the graph is 4x the calibrated one"]),
    ("dequantize_scale", [f"{Q}: activation scale (dequantize) in the graph is 0.5x the calibrated one"]),
    ("weight_scale", [f"{Q}: weight scale in the graph is 0.25x the calibrated one"]),
    ("weight_scale_slightly", [f"{Q}: weight scale in the graph is 1.05x the calibrated one"]),
    ("weight_scale_bf16_rounding", []),  # within what a bf16 graph's 8 mantissa bits can hold
    ("smoothing", [f"{Q}: smoothing factor (pre_quant_scale) in the graph is 2x the calibrated one"]),
    ("activation_zero_point", [f"{Q}: activation zero point is not 0"]),
    ("weight_zero_point", [f"{Q}: weight zero point is not 0"]),
    ("weight_scale_size", [f"{Q}: weight scale missing or of size 3, calibrated {WIDTH}"]),
    ("weight_scale_not_constant", [f"{Q}: weight scale missing or of size None, calibrated {WIDTH}"]),
    ("axis", [f"{Q}: weight scale axis 0, the stored layout needs 1"]),
    ("no_axis_on_gemm", [f"{MLP}: weight scale axis 1, the stored layout needs 0"]),
    ("no_axis_on_matmul", []),
    ("smoothing_removed", [f"{Q}: SmoothQuant's smoothing (Mul by pre_quant_scale) is missing before its quantizer"]),
    ("smoothing_not_constant", [(f"{Q}: SmoothQuant's smoothing (Mul by pre_quant_scale) is missing before its "
                                 "quantizer")]),
    ("no_quantize", [f"{Q}: its activation DequantizeLinear is not fed by a QuantizeLinear"]),
    ("dequantize_of_input", [f"{Q}: its activation DequantizeLinear is not fed by a QuantizeLinear"]),
    ("weight_not_dequantized", [f"{Q}: activation or weight of its MatMul is not dequantized"]),
    ("activation_not_dequantized", [f"{Q}: activation or weight of its MatMul is not dequantized"]),
    ("zero_points_omitted", []),
])
def test_graph_numbers_problems_names_what_is_wrong(int8, how, problems):
    graph, layers, _, _ = _written(int8, "int8")
    assert qdq.graph_numbers_problems(_break(graph, how), qdq.expected_numbers(layers)) == problems


def test_graph_numbers_problems_of_graphs_without_quantization(int8):
    model, high = int8
    layers, _ = qdq.from_modelopt(model, "int8")
    expected = qdq.expected_numbers(layers)
    plain = _graph(high)
    assert qdq.graph_numbers_problems(plain, expected) == [
        f"{Q}: activation or weight of its MatMul is not dequantized",
        f"{MLP}: activation or weight of its MatMul is not dequantized"]  # sorted by layer name
    assert qdq.graph_numbers_problems(plain, dict(reversed(expected.items()))) == \
        qdq.graph_numbers_problems(plain, expected)
    graph, _, _, _ = _written(int8, "int8")
    missing = {**expected, "transformer_blocks.5.attn.to_q": expected[Q]}
    assert qdq.graph_numbers_problems(graph, missing) == [
        "transformer_blocks.5.attn.to_q: no quantized matrix multiplication in the graph"]
    # the first layer reads the graph input directly: nothing produces its activation
    first = {"transformer_blocks.0.attn.to_q": expected[Q]}
    assert qdq.graph_numbers_problems(plain, first) == [
        "transformer_blocks.0.attn.to_q: no quantized matrix multiplication in the graph"]
    assert qdq.graph_numbers_problems(graph, {f"x.{Q}": expected[Q]}, prefix="transformer.x.") == [
        f"x.{Q}: no quantized matrix multiplication in the graph"]
    assert qdq.graph_numbers_problems(graph, {Q[len("transformer_blocks."):]: expected[Q]},
                                      prefix="transformer.transformer_blocks.") == []


def test_graph_numbers_problems_ratio_with_zero_calibrated_values(int8):
    graph, layers, _, _ = _written(int8, "int8")
    w_dq = _nodes(graph)[f"{Q}/weight_dequantize"]
    w_dq.replace_input_with(1, _const(np.ones(3, np.float32)))
    w_dq.attributes["axis"] = ir.AttrInt64("axis", 1)
    expected = {Q: {**qdq.expected_numbers(layers)[Q], "weight_scale": np.array([0.0, 0.0, 0.5], np.float32)}}
    assert qdq.graph_numbers_problems(graph, expected) == [f"{Q}: weight scale in the graph is 1x the calibrated one"]
    fp8_like = {Q: {**expected[Q], "weight_scale": np.float32(1.0), "pre_quant_scale": None}}
    w_dq.replace_input_with(1, _const(np.float32(1.0)))
    del w_dq.attributes["axis"]
    assert qdq.graph_numbers_problems(graph, fp8_like) == []  # per tensor: no axis asked; smoothing not asked


def test_per_channel_amax_may_come_flat():
    w = torch.tensor([[1.0, -0.5, 0.25, 2.0, -3.0], [2.0, 3.0, -4.0, 0.0, 1.0]])
    q, scale = qdq.quantize_weight(w, torch.tensor([1.0, 4.0]), "int8")  # [out] rather than ModelOpt's [out, 1]
    assert q.tolist() == [[127, -64, 32, 127, -128], [64, 95, -127, 0, 32]] and scale.shape == (2,)


def test_dequantize_returns_float32_whatever_the_scale_type():
    out = qdq.dequantize(np.array([[3, -1]], np.int8), [0.1, 0.2], "int8", axis=1)  # float64 scales
    assert out.dtype == torch.float32 and out[0].tolist() == pytest.approx([0.3, -0.2])


def test_two_channel_layers_stay_per_channel():
    torch.manual_seed(1)
    model = torch.nn.Module()
    model.transformer = torch.nn.Module()
    model.transformer.lin = torch.nn.Linear(4, 2)
    cfg = copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, cfg, lambda m: [m.transformer.lin(torch.randn(8, 4)) for _ in range(2)])
    layer = qdq.from_modelopt(model, "int8")[0]["lin"]
    assert layer.weight_scale.shape == (2,)
    np.testing.assert_allclose(layer.weight_scale, model.transformer.lin.weight_quantizer.amax.reshape(-1) / 127,
                               rtol=1e-6)


def test_written_initializers_carry_their_names(int8):
    graph, _, _, _ = _written(int8, "int8")
    for name, value in graph.graph.initializers.items():
        assert value.const_value.name == name


def test_exactly_one_percent_off_is_still_the_same_number(int8):
    """The tolerance (a bf16 graph's rounding) is inclusive: 1% is accepted, anything past it is not."""
    graph, layers, _, _ = _written(int8, "int8")
    nodes = _nodes(graph)
    nodes[f"{Q}/input_quantize"].replace_input_with(1, _const(np.float32(101.0)))
    nodes[f"{Q}/input_dequantize"].replace_input_with(1, _const(np.float32(101.0)))
    expected = {Q: {**qdq.expected_numbers(layers)[Q], "input_scale": np.float32(100.0)}}
    assert qdq.graph_numbers_problems(graph, expected) == []
    nodes[f"{Q}/input_quantize"].replace_input_with(1, _const(np.float32(101.5)))
    assert qdq.graph_numbers_problems(graph, expected) == [
        f"{Q}: activation scale in the graph is 1.01x the calibrated one"]


def test_missing_matmul_inputs_are_problems_not_crashes(int8):
    graph, layers, _, _ = _written(int8, "int8")
    _nodes(graph)[f"{Q}/matmul"].replace_input_with(1, None)
    _nodes(graph)[f"{MLP}/gemm"].replace_input_with(0, None)
    assert qdq.graph_numbers_problems(graph, qdq.expected_numbers(layers)) == [
        f"{Q}: no quantized matrix multiplication in the graph",  # without a weight it is no Linear's MatMul
        f"{MLP}: no quantized matrix multiplication in the graph"]


def test_every_layer_is_checked_after_a_broken_one(int8):
    graph, layers, _, _ = _written(int8, "int8")
    expected = qdq.expected_numbers(layers)
    _break(graph, "no_quantize")
    mlp_dq = _nodes(graph)[f"{MLP}/weight_dequantize"]
    mlp_dq.replace_input_with(1, _scaled(mlp_dq.inputs[1], 4))
    first = {"transformer_blocks.0.attn.to_q": expected[Q], **expected}
    assert qdq.graph_numbers_problems(graph, first) == [
        "transformer_blocks.0.attn.to_q: no quantized matrix multiplication in the graph",
        f"{Q}: its activation DequantizeLinear is not fed by a QuantizeLinear",
        f"{MLP}: weight scale in the graph is 4x the calibrated one"]
    graph, layers, _, _ = _written(int8, "int8")
    _break(graph, "weight_not_dequantized")
    mlp_dq = _nodes(graph)[f"{MLP}/weight_dequantize"]
    mlp_dq.replace_input_with(1, _scaled(mlp_dq.inputs[1], 4))
    assert qdq.graph_numbers_problems(graph, expected) == [
        f"{Q}: activation or weight of its MatMul is not dequantized",
        f"{MLP}: weight scale in the graph is 4x the calibrated one"]


def test_two_channel_scales_need_the_right_axis_too(int8):
    graph, layers, _, _ = _written(int8, "int8")
    w_dq = _nodes(graph)[f"{Q}/weight_dequantize"]
    w_dq.replace_input_with(1, _const(np.array([0.5, 0.25], np.float32)))
    w_dq.attributes["axis"] = ir.AttrInt64("axis", 0)
    expected = {Q: {**qdq.expected_numbers(layers)[Q], "weight_scale": np.array([0.5, 0.25], np.float32)}}
    assert qdq.graph_numbers_problems(graph, expected) == [f"{Q}: weight scale axis 0, the stored layout needs 1"]
