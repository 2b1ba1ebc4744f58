"""`qitrt lint`: clean on the tiny export, and each TensorRT constraint caught on a small crafted graph.

Errors are only what TensorRT's operator matrix (or the files themselves) make certain; everything else is
a warning, which never blocks `qitrt build`. Each test checks the severity as well as the rule.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T, helper, numpy_helper

from qwen_image_trt.compile.lint import add_lint_parser, lint_main, lint_onnx


def _save(tmp_path, nodes, inputs, outputs, inits=(), name="m.onnx", opsets=(("", 19),), **save):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    path = tmp_path / name
    onnx.save_model(model, str(path), **save)
    return path


def _vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


@pytest.mark.parametrize("component", ["transformer", "vae_decoder", "vae_encoder"])
def test_tiny_export_is_clean(tiny_engines, component):
    report = lint_onnx(tiny_engines / f"{component}.onnx")
    assert report.ok, report.summary()
    assert not report.findings, report.summary()
    assert sum(report.op_counts.values()) > 100


def test_unsupported_and_foreign_ops(tmp_path):
    path = _save(tmp_path, [helper.make_node("Unique", ["x"], ["u"], name="uniq"),
                            helper.make_node("FusedMatMul", ["x", "x"], ["f"], domain="com.microsoft", name="fused"),
                            helper.make_node("MyPlugin", ["x"], ["p"], domain="acme", name="plug"),
                            helper.make_node("Relu", ["x"], ["y"])],
                 [_vi("x", T.FLOAT, [4, 4])], [_vi("u", T.FLOAT, None), _vi("f", T.FLOAT, None),
                                               _vi("p", T.FLOAT, None), _vi("y", T.FLOAT, [4, 4])],
                 opsets=(("", 19), ("com.microsoft", 1), ("acme", 1)))
    report = lint_onnx(path)
    assert not report.ok
    assert [(f.node, f.rule) for f in report.errors] == [("uniq", "op")]  # "N" in TensorRT's operator matrix
    # not in the matrix: TensorRT looks for a plugin of that name, which may exist
    assert [(f.node, f.rule) for f in report.warnings] == [("fused", "op"), ("plug", "op")]


@pytest.mark.parametrize("op", ["Attention", "RMSNormalization", "RotaryEmbedding"])
def test_ops_newer_than_the_matrix_are_warnings(tmp_path, op):
    path = _save(tmp_path, [helper.make_node(op, ["x"], ["y"], name="new")], [_vi("x", T.FLOAT, [4])],
                 [_vi("y", T.FLOAT, [4])], opsets=(("", 23),))
    report = lint_onnx(path)
    assert report.ok and report.rules("warning") >= {"op", "opset"}, report.summary()


def test_op_tables_follow_the_10x_matrix():
    from qwen_image_trt.compile.lint import TENSORRT_ONNX_OPS, TENSORRT_UNSUPPORTED_OPS

    assert not TENSORRT_ONNX_OPS & TENSORRT_UNSUPPORTED_OPS
    # rows that changed between the 8.x and 10.x matrices
    assert {"Mod", "NonZero", "Reciprocal", "Hardmax", "IsInf", "OneHot", "GroupNormalization"} <= TENSORRT_ONNX_OPS
    assert {"Unique", "DFT", "STFT", "RegexFullMatch", "Col2Im"} <= TENSORRT_UNSUPPORTED_OPS


@pytest.mark.parametrize("dtype,severity", [(T.COMPLEX64, "error"), (T.STRING, "error"), (T.DOUBLE, "warning"),
                                            (T.UINT32, "error"), (T.INT16, "error"), (T.FLOAT8E5M2, "error")])
def test_unsupported_dtypes(tmp_path, dtype, severity):
    path = _save(tmp_path, [helper.make_node("Identity", ["x"], ["y"], name="id")],
                 [_vi("x", dtype, [2])], [_vi("y", dtype, [2])])
    report = lint_onnx(path)
    assert "dtype" in report.rules(severity), report.summary()


def test_cast_to_float64_in_compute(tmp_path):
    path = _save(tmp_path, [helper.make_node("Cast", ["x"], ["d"], to=T.DOUBLE, name="to64"),
                            helper.make_node("Cast", ["d"], ["y"], to=T.FLOAT, name="back")],
                 [_vi("x", T.FLOAT, [2])], [_vi("y", T.FLOAT, [2])])
    report = lint_onnx(path)
    assert report.ok  # TensorRT casts float64 down (onnx-tensorrt: "limited support for DOUBLE")
    assert [(f.node, f.rule) for f in report.warnings] == [("to64", "dtype")]
    assert "float64" in report.warnings[0].message


def test_float64_constant_is_a_warning(tmp_path):
    c = numpy_helper.from_array(np.array([2.0]), "c")  # float64 initializer
    path = _save(tmp_path, [helper.make_node("Cast", ["c"], ["cf"], to=T.FLOAT), helper.make_node("Mul", ["x", "cf"], ["y"])],
                 [_vi("x", T.FLOAT, [1])], [_vi("y", T.FLOAT, [1])], inits=[c])
    report = lint_onnx(path)
    assert report.ok and report.rules("warning") == {"dtype"}


@pytest.mark.parametrize("dtype,bad", [(T.BFLOAT16, True), (T.FLOAT, False), (T.FLOAT16, False)])
def test_bf16_resize(tmp_path, dtype, bad):
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    path = _save(tmp_path, [helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="nearest", name="up")],
                 [_vi("x", dtype, [1, 4, 8, 8])], [_vi("y", dtype, [1, 4, 16, 16])], inits=[scales])
    report = lint_onnx(path)
    assert report.ok and ("resize-bf16" in report.rules("warning")) == bad  # the 10.1 matrix lists BF16 Resize


def _fp8_qdq(x, tag):
    """x -> QuantizeLinear(FP8 E4M3) -> DequantizeLinear, default domain (opset 19)."""
    return [helper.make_node("QuantizeLinear", [x, "s", "zp"], [f"{tag}_q"], name=f"q_{tag}"),
            helper.make_node("DequantizeLinear", [f"{tag}_q", "s", "zp"], [f"{tag}_dq"], name=f"dq_{tag}")]


FP8_INITS = [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
             helper.make_tensor("zp", T.FLOAT8E4M3FN, [], [0.0])]


def _attention(tmp_path, head_dim, fp8=True, name="attn.onnx"):
    shape = [1, 2, 8, head_dim]
    q, k, v = ("q_dq", "k_dq", "v_dq") if fp8 else ("q", "k", "v")
    nodes = (_fp8_qdq("q", "q") + _fp8_qdq("k", "k") + _fp8_qdq("v", "v")) if fp8 else []
    nodes += [helper.make_node("Transpose", [k], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", [q, "kt"], ["scores"], name="qk"),
              helper.make_node("Softmax", ["scores"], ["probs"], axis=-1)]
    if fp8:
        nodes += _fp8_qdq("probs", "p")
    nodes += [helper.make_node("MatMul", ["p_dq" if fp8 else "probs", v], ["out"], name="pv")]
    return _save(tmp_path, nodes, [_vi(n, T.FLOAT, shape) for n in "qkv"], [_vi("out", T.FLOAT, shape)],
                 inits=FP8_INITS if fp8 else [], name=name)


def test_fp8_attention_head_dim(tmp_path):
    bad = lint_onnx(_attention(tmp_path, 24, name="bad.onnx"))
    assert bad.ok, bad.summary()  # a fusion requirement, not a documented parser rule: a warning
    assert {(f.node, f.rule) for f in bad.warnings} == {("qk", "fp8-head-dim"), ("pv", "fp8-head-dim")}, bad.summary()
    assert "head_dim 24" in bad.warnings[0].message
    good = lint_onnx(_attention(tmp_path, 32, name="good.onnx"))
    assert good.ok and not good.findings, good.summary()
    plain = lint_onnx(_attention(tmp_path, 24, fp8=False, name="plain.onnx"))  # not FP8: any head_dim
    assert plain.ok and not plain.findings


def test_fp8_weight_matmul_is_not_attention(tmp_path):
    w = numpy_helper.from_array(np.ones((24, 24), np.float32), "w")
    nodes = _fp8_qdq("x", "x") + _fp8_qdq("w", "w") + [helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"], name="linear")]
    report = lint_onnx(_save(tmp_path, nodes, [_vi("x", T.FLOAT, [2, 24])], [_vi("y", T.FLOAT, [2, 24])],
                             inits=[*FP8_INITS, w]))
    assert report.ok and not report.findings, report.summary()


def test_modelopt_trt_domain_fp8_ops(tmp_path):
    nodes = [helper.make_node("TRT_FP8QuantizeLinear", ["x", "s"], ["xq"], domain="trt", name="q"),
             helper.make_node("TRT_FP8DequantizeLinear", ["xq", "s"], ["y"], domain="trt", name="dq")]
    path = _save(tmp_path, nodes, [_vi("x", T.FLOAT, [2, 16])], [_vi("y", T.FLOAT, [2, 16])],
                 inits=[numpy_helper.from_array(np.array(0.1, np.float32), "s")], opsets=(("", 19), ("trt", 1)))
    report = lint_onnx(path)
    assert report.ok and "op" not in report.rules(), report.summary()
    # the same Q feeding a non-DQ op is unpaired
    nodes[1] = helper.make_node("Relu", ["xq"], ["y"], name="relu")
    report = lint_onnx(_save(tmp_path, nodes, [_vi("x", T.FLOAT, [2, 16])], [_vi("y", T.FLOAT, [2, 16])],
                             inits=[numpy_helper.from_array(np.array(0.1, np.float32), "s")],
                             opsets=(("", 19), ("trt", 1)), name="unpaired.onnx"))
    assert report.ok and [(f.node, f.rule) for f in report.warnings] == [("q", "qdq")]


def test_qdq_pairing_and_zero_point(tmp_path):
    s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zp0 = numpy_helper.from_array(np.array(0, np.int8), "zp")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
             helper.make_node("Cast", ["xq"], ["y"], to=T.FLOAT, name="cast")]
    report = lint_onnx(_save(tmp_path, nodes, [_vi("x", T.FLOAT, [4])], [_vi("y", T.FLOAT, [4])], inits=[s, zp0]))
    assert report.ok and [(f.node, f.rule) for f in report.warnings] == [("q", "qdq")]
    assert "instead of a DequantizeLinear" in report.warnings[0].message

    dangling = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q")]
    report = lint_onnx(_save(tmp_path, dangling, [_vi("x", T.FLOAT, [4])], [_vi("xq", T.INT8, [4])], inits=[s, zp0],
                             name="dangling.onnx"))
    assert report.ok and [(f.node, f.rule) for f in report.warnings] == [("q", "qdq")]

    zp3 = numpy_helper.from_array(np.array(3, np.int8), "zp")
    paired = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
              helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["y"], name="dq")]
    report = lint_onnx(_save(tmp_path, paired, [_vi("x", T.FLOAT, [4])], [_vi("y", T.FLOAT, [4])], inits=[s, zp3],
                             name="asym.onnx"))
    assert {(f.node, f.rule) for f in report.errors} == {("q", "qdq"), ("dq", "qdq")}  # the matrix: must be 0
    assert "zero point" in report.errors[0].message
    report = lint_onnx(_save(tmp_path, paired, [_vi("x", T.FLOAT, [4])], [_vi("y", T.FLOAT, [4])], inits=[s, zp0],
                             name="sym.onnx"))
    assert report.ok and not report.findings


def _external_model(tmp_path):
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    return _save(tmp_path, [helper.make_node("MatMul", ["x", "w"], ["y"])], [_vi("x", T.FLOAT, [1, 64])],
                 [_vi("y", T.FLOAT, [1, 64])], inits=[w], save_as_external_data=True, location="m.onnx.data",
                 size_threshold=0)


def test_external_data(tmp_path):
    path = _external_model(tmp_path)
    assert lint_onnx(path).ok
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    report = lint_onnx(path)
    assert report.rules("error") == {"external-data"} and "truncated" in report.errors[0].message
    data.unlink()
    report = lint_onnx(path)
    assert report.rules("error") == {"external-data"} and "missing" in report.errors[0].message


def test_external_data_without_length_uses_the_tensor_size(tmp_path):
    path = _external_model(tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    entries = model.graph.initializer[0].external_data
    keep = [(e.key, e.value) for e in entries if e.key != "length"]
    del entries[:]
    for k, v in keep:
        entries.add(key=k, value=v)
    onnx.save_model(model, str(path))
    assert lint_onnx(path).ok  # 64 x 64 float32 = 16384 bytes, all there
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:16000])
    assert lint_onnx(path).rules("error") == {"external-data"}


def test_lint_never_reads_external_data(tmp_path, monkeypatch):
    """A 40 GB graph lints in seconds: only the data file's size is looked at, never its bytes."""
    import onnx.external_data_helper as edh

    path = _external_model(tmp_path)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(b"\xff" * data.stat().st_size)  # garbage of the right size: never interpreted
    for name in ("load_external_data_for_model", "load_external_data_for_tensor"):
        monkeypatch.setattr(edh, name, lambda *a, **k: pytest.fail("lint loaded external data"))
    real_open = open

    def guarded_open(file, *args, **kwargs):
        assert str(file) != str(data), "lint opened the external data file"
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr("builtins.open", guarded_open)
    report = lint_onnx(path)
    assert report.ok and not report.findings, report.summary()


def test_opset_warning(tmp_path):
    path = _save(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [_vi("x", T.FLOAT, [1])], [_vi("y", T.FLOAT, [1])],
                 opsets=(("", 21),))
    report = lint_onnx(path)
    assert report.ok and report.rules("warning") == {"opset"}


def _cli(argv):
    parser = argparse.ArgumentParser(prog="qitrt")
    add_lint_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    assert args.func is lint_main
    return args.func(args)


def test_lint_command(tmp_path, tiny_engines, capsys):
    assert _cli(["lint", str(tiny_engines / "vae_decoder.onnx")]) == 0
    assert "OK" in capsys.readouterr().out
    assert _cli(["lint", str(tiny_engines), "--json"]) == 0  # an engine folder: every graph in its manifest
    reports = json.loads(capsys.readouterr().out)
    assert len(reports) == 3 and all(r["ok"] for r in reports)

    bad = _save(tmp_path, [helper.make_node("Unique", ["x"], ["y"], name="uniq")], [_vi("x", T.FLOAT, [4])],
                [_vi("y", T.FLOAT, None)], name="bad.onnx")
    assert _cli(["lint", str(bad)]) == 1  # errors fail the command (and `qitrt build`)
    assert "not supported by TensorRT" in capsys.readouterr().out
    attention = _attention(tmp_path, 24)
    assert _cli(["lint", str(attention)]) == 0  # warnings alone do not
    assert "fp8-head-dim" in capsys.readouterr().out
    warn = _save(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [_vi("x", T.FLOAT, [1])], [_vi("y", T.FLOAT, [1])],
                 opsets=(("", 21),), name="new.onnx")
    assert _cli(["lint", str(warn)]) == 0
    assert _cli(["lint", str(warn), "--strict"]) == 1
    from qwen_image_trt.core.errors import InputError

    with pytest.raises(InputError):
        _cli(["lint", str(tmp_path / "nope.onnx")])
