"""Static checks that an ONNX graph will parse and build in TensorRT, without TensorRT.

`lint_onnx(path)` reports, per node, what TensorRT (10.x, strongly typed) would reject or mishandle.
Errors are what TensorRT's own documentation or the files themselves make certain; a rule whose truth is
not certain for every TensorRT 10.x/11.x release is a warning, so it never blocks a build (`qitrt build`
stops on errors only):

errors
- ops the parser support matrix marks "N" (onnx-tensorrt docs/operators.md, release/10.1-GA: the last
  matrix published there; later releases only add ops);
- tensor types outside TensorRT's list (complex, string, int16, uint16/32/64, FP8 other than E4M3FN);
- Q/DQ with a non-zero zero point (the matrix: "zero point must be 0");
- opset below 9; external data files missing, or shorter than an initializer's offset + length.
warnings
- ops not in the matrix (newer ONNX ops, custom domains, ONNX Runtime contrib ops): TensorRT then looks for
  a plugin of that name;
- float64 tensors (TensorRT casts them to float32, clamping to +-FLT_MAX);
- Resize on bf16 (the 10.1 matrix lists BF16 Resize, earlier notes say it has none: cast if it fails);
- FP8 attention whose head_dim is not a multiple of 16 (the fused FP8 attention kernels need it);
- a Q not followed only by DQs of its own kind (TensorRT fuses Q/DQ pairs);
- opsets newer than the matrix documents; failed shape inference.
The model is read without its external data (`load_external_data=False`): a 40 GB graph lints in seconds.
`qitrt lint MODEL.onnx` prints the report and exits 1 when it has errors.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qwen_image_trt.core.errors import InputError
from qwen_image_trt.core.manifest import read_manifest

ERROR, WARNING = "error", "warning"

# Default-domain ONNX ops TensorRT 10's ONNX parser imports: the "Y" rows of onnx-tensorrt's
# docs/operators.md at release/10.1-GA (opsets 9-20). Restrictions of single ops are in the doc, not checked.
TENSORRT_ONNX_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil Celu
Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div
Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid
HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min
Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal
RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign
Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax
Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu
Unsqueeze Upsample Where Xor
""".split())
# Listed as "N" in the same table: the parser rejects them.
TENSORRT_UNSUPPORTED_OPS = frozenset("""
AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor BlackmanWindow Col2Im CenterCropPad Compress
ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear HammingWindow HannWindow ImageDecoder MatMulInteger
MaxRoiPool MaxUnpool MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement
OptionalHasElement QLinearConv QLinearMatMul RegexFullMatch STFT SequenceAt SequenceConstruct SequenceEmpty
SequenceErase SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat
StringNormalizer StringSplit TfIdfVectorizer Unique
""".split())
# Ops ModelOpt's ONNX export puts in the `trt` domain; TensorRT imports them natively.
TRT_DOMAIN_OPS = frozenset({"TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear",
                            "TRT_INT4QuantizeLinear", "TRT_INT4DequantizeLinear"})
DEFAULT_DOMAINS = ("", "ai.onnx")
TRT_DOMAINS = ("trt",)
KNOWN_FOREIGN_DOMAINS = ("com.microsoft", "ai.onnx.ml", "ai.onnx.preview.training", "com.microsoft.nchwc",
                         "com.ms.internal.nhwc", "org.pytorch.aten")
DOCUMENTED_OPSETS = (9, 20)  # the 10.1 matrix; TensorRT 11 documents opsets up to 25

QUANTIZE_OPS = frozenset({"QuantizeLinear", "TRT_FP8QuantizeLinear", "TRT_INT4QuantizeLinear"})
DEQUANTIZE_OPS = frozenset({"DequantizeLinear", "TRT_FP8DequantizeLinear", "TRT_INT4DequantizeLinear"})
PASSTHROUGH_OPS = frozenset({"Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Cast", "Flatten"})
FP8_HEAD_DIM_MULTIPLE = 16


def _onnx_dtypes():
    from onnx import TensorProto as T

    unsupported = {T.COMPLEX64: "complex64", T.COMPLEX128: "complex128", T.STRING: "string", T.UINT16: "uint16",
                   T.UINT32: "uint32", T.UINT64: "uint64", T.INT16: "int16"}
    for name in ("FLOAT8E5M2", "FLOAT8E4M3FNUZ", "FLOAT8E5M2FNUZ"):
        if hasattr(T, name):
            unsupported[getattr(T, name)] = name.lower()
    return T, unsupported


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" | "warning"
    rule: str  # op | dtype | resize-bf16 | fp8-head-dim | qdq | external-data | opset | shape-inference
    node: str
    op: str
    message: str

    def __str__(self):
        where = f"{self.node} ({self.op})" if self.op else self.node
        return f"{self.severity}: [{self.rule}] {where}: {self.message}"


@dataclass
class LintReport:
    path: str
    findings: list[Finding] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    def rules(self, severity: str | None = None) -> set[str]:
        return {f.rule for f in self.findings if severity is None or f.severity == severity}

    def add(self, severity, rule, node, op, message):
        finding = Finding(severity, rule, node, op, message)
        if finding not in self.findings:  # one tensor may be seen twice (declared type and Cast's `to`)
            self.findings.append(finding)

    def summary(self) -> str:
        head = (f"{self.path}: {'OK' if self.ok else 'FAILED'} - {len(self.errors)} error(s), "
                f"{len(self.warnings)} warning(s), {sum(self.op_counts.values())} nodes")
        return "\n".join([head, *(f"  {f}" for f in self.findings)])

    def to_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "findings": [asdict(f) for f in self.findings],
                "op_counts": self.op_counts}


# -- the linter ---------------------------------------------------------------------------------------
def lint_onnx(path, *, check_external_data: bool = True) -> LintReport:
    """Statically check one ONNX file for TensorRT; never loads the weights' data."""
    import onnx

    path = Path(path)
    report = LintReport(str(path))
    model = onnx.load(str(path), load_external_data=False)
    if check_external_data:
        _check_external_data(model, path.parent, report)
    _check_opsets(model, report)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as e:  # lint what we can without shapes
        report.add(WARNING, "shape-inference", "<graph>", "", f"ONNX shape inference failed ({e}); "
                   "dtype and head_dim checks see only declared types")
        inferred = model
    functions = {(f.domain, f.name) for f in model.functions}
    types = _value_types(inferred.graph)
    for f in model.functions:
        _lint_nodes(f.node, f"{f.domain}:{f.name}/", report, functions, types)
    _lint_graph(inferred.graph, "", report, functions, types)
    return report


def _check_opsets(model, report):
    for opset in model.opset_import:
        if opset.domain in DEFAULT_DOMAINS:
            lo, hi = DOCUMENTED_OPSETS
            if opset.version < lo:
                report.add(ERROR, "opset", "<model>", "", f"opset {opset.version} < {lo}: TensorRT's parser needs >= {lo}")
            elif opset.version > hi:
                report.add(WARNING, "opset", "<model>", "", f"opset {opset.version} is newer than TensorRT 10.1's "
                           f"operator matrix ({lo}-{hi}); later TensorRT releases (11.x: up to 25) import more")


def _check_external_data(model, folder: Path, report):
    from onnx.external_data_helper import uses_external_data

    sizes: dict[str, int | None] = {}
    for t in _all_initializers(model.graph):
        if not uses_external_data(t):
            continue
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        if location not in sizes:
            f = folder / location
            sizes[location] = f.stat().st_size if location and f.is_file() else None
        size = sizes[location]
        if size is None:
            report.add(ERROR, "external-data", t.name, "", f"external data file {location!r} is missing next to the "
                       "model: copy it with the .onnx (TensorRT's parse_from_file reads it from the same folder)")
            continue
        end = int(info.get("offset", 0) or 0) + _external_length(t, info)
        if end > size:
            report.add(ERROR, "external-data", t.name, "", f"external data {location!r} has {size} bytes, the tensor "
                       f"needs bytes up to {end}: the data file is truncated or belongs to another model")


def _external_length(tensor, info: dict) -> int:
    """Bytes an external initializer occupies: its recorded length, else dims x element size."""
    if info.get("length"):
        return int(info["length"])
    import math

    from onnx import helper

    try:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return 0
    return math.prod(tensor.dims) * itemsize


def _all_initializers(graph):
    yield from graph.initializer
    for node in graph.node:
        for g in _subgraphs(node):
            yield from _all_initializers(g)


def _subgraphs(node):
    import onnx

    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _value_types(graph) -> dict[str, tuple[int, list]]:
    """{tensor name: (elem_type, dims)} from inputs, outputs, value_info and initializers (dims: int or str)."""
    out = {}
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        t = v.type.tensor_type
        if v.type.HasField("tensor_type"):
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim] \
                if t.HasField("shape") else None
            out[v.name] = (t.elem_type, dims)
    for init in graph.initializer:
        out[init.name] = (init.data_type, list(init.dims))
    for node in graph.node:
        for g in _subgraphs(node):
            out.update(_value_types(g))
    return out


def _node_name(node, index: int, prefix: str) -> str:
    return prefix + (node.name or f"{node.op_type}_{index}")


def _lint_graph(graph, prefix, report, functions, types):
    _, unsupported = _onnx_dtypes()
    initializers = {i.name: i for i in graph.initializer}
    # dtypes of graph I/O and initializers
    for v in list(graph.input) + list(graph.output):
        _check_dtype(report, v.name, "", types.get(v.name, (0, None))[0], unsupported, compute=True)
    for init in graph.initializer:
        _check_dtype(report, init.name, "", init.data_type, unsupported, compute=False)
    _lint_nodes(graph.node, prefix, report, functions, types, initializers=initializers)


def _lint_nodes(nodes, prefix, report, functions, types, initializers=None):
    """`initializers`: {name: TensorProto} of the enclosing graph (weights, zero points)."""
    T, unsupported = _onnx_dtypes()
    initializers = initializers or {}
    nodes = list(nodes)
    consumers: dict[str, list] = {}
    producers: dict[str, object] = {}
    for node in nodes:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
        for o in node.output:
            producers[o] = node
    names = {id(n): _node_name(n, i, prefix) for i, n in enumerate(nodes)}

    for node in nodes:
        name, op, domain = names[id(node)], node.op_type, node.domain
        report.op_counts[f"{domain + '::' if domain else ''}{op}"] = \
            report.op_counts.get(f"{domain + '::' if domain else ''}{op}", 0) + 1
        _check_op(report, name, node, functions)
        for o in node.output:
            if o:
                _check_dtype(report, name, op, types.get(o, (0, None))[0], unsupported, compute=True, tensor=o)
        if op == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to is not None:
                _check_dtype(report, name, op, to, unsupported, compute=True, tensor=node.output[0])
        if op == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type:
                    _check_dtype(report, name, op, a.t.data_type, unsupported, compute=False, tensor=node.output[0])
        if op == "Resize" and node.input and types.get(node.input[0], (0,))[0] == T.BFLOAT16:
            report.add(WARNING, "resize-bf16", name, op, "Resize on a bfloat16 tensor: not every TensorRT release "
                       "has a bf16 Resize; if the build fails here, cast to float16/float32 around it in the export")
        if op in QUANTIZE_OPS:
            _check_quantize(report, name, node, consumers, types)
        if op in QUANTIZE_OPS | DEQUANTIZE_OPS:
            _check_zero_point(report, name, node, nodes, initializers)
        if op == "MatMul":
            _check_fp8_attention(report, name, node, producers, initializers, types)
        for g in _subgraphs(node):
            _lint_graph(g, name + "/", report, functions, types)


def _check_op(report, name, node, functions):
    op, domain = node.op_type, node.domain
    if (domain, op) in functions:
        return  # a local function: TensorRT imports its body, which is linted on its own
    if domain in DEFAULT_DOMAINS:
        if op in TENSORRT_ONNX_OPS or op in TRT_DOMAIN_OPS:
            return
        if op in TENSORRT_UNSUPPORTED_OPS:
            report.add(ERROR, "op", name, op, f"{op} is not supported by TensorRT's ONNX parser")
        else:
            report.add(WARNING, "op", name, op, f"{op} is not in TensorRT 10.1's ONNX operator matrix (a newer op?); "
                       "a later TensorRT may import it, else it looks for a plugin of that name")
    elif domain in TRT_DOMAINS:
        if op not in TRT_DOMAIN_OPS:
            report.add(WARNING, "op", name, op, f"trt::{op} is not a built-in TensorRT op: it needs a TensorRT "
                       "plugin of that name registered before parsing")
    elif domain in KNOWN_FOREIGN_DOMAINS:
        report.add(WARNING, "op", name, op, f"{domain}::{op} belongs to another runtime (ONNX Runtime contrib op?): "
                   "TensorRT parses it only through a plugin of that name; build TensorRT engines from the plain "
                   "export, not from an ONNX Runtime-optimized model")
    else:
        report.add(WARNING, "op", name, op, f"custom op {domain}::{op}: TensorRT imports it only as a plugin "
                   "registered before parsing")


def _dtype_name(elem_type) -> str:
    import onnx

    try:
        return onnx.TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return str(elem_type)


def _check_dtype(report, name, op, elem_type, unsupported, *, compute: bool, tensor: str | None = None):
    from onnx import TensorProto as T

    if not elem_type:
        return
    what = f"tensor {tensor!r}" if tensor and tensor != name else "tensor"
    if elem_type in unsupported:
        report.add(ERROR, "dtype", name, op, f"{what} is {unsupported[elem_type]}: TensorRT has no such type")
    elif elem_type == T.DOUBLE:
        kind = "" if compute else " constant"
        report.add(WARNING, "dtype", name, op, f"{what} is a float64{kind}: TensorRT casts float64 down to float32 "
                   "(clamping to +-FLT_MAX), so results can differ from ONNX Runtime's; cast the export to float32")


def _check_quantize(report, name, node, consumers, types):
    out = node.output[0] if node.output else ""
    users = consumers.get(out, [])
    if not users:
        report.add(WARNING, "qdq", name, node.op_type, "quantized output is not consumed by a DequantizeLinear "
                   "(TensorRT fuses Q/DQ pairs; an unpaired Q is a graph output or dead)")
        return
    bad = [u for u in users if u.op_type not in DEQUANTIZE_OPS]
    if bad:
        ops = sorted({u.op_type for u in bad})
        report.add(WARNING, "qdq", name, node.op_type, f"quantized output feeds {', '.join(ops)} instead of a "
                   "DequantizeLinear: TensorRT expects every Q followed by a DQ")
    mixed = [u for u in users if u.op_type in DEQUANTIZE_OPS and _family(u.op_type) != _family(node.op_type)]
    if mixed:
        report.add(WARNING, "qdq", name, node.op_type, f"{node.op_type} is paired with {mixed[0].op_type}: "
                   "Q and DQ should be of one kind")


def _family(op_type: str) -> str:
    return "fp8" if "FP8" in op_type else "int4" if "INT4" in op_type else "onnx"


def _check_zero_point(report, name, node, nodes, initializers):
    if len(node.input) < 3 or not node.input[2]:
        return
    zp = _constant_value(node.input[2], nodes, initializers)
    if zp is not None and zp.size and bool((zp.astype("float64") != 0).any()):
        report.add(ERROR, "qdq", name, node.op_type, "non-zero zero point: TensorRT supports symmetric "
                   "quantization only (zero point must be 0)")


def _constant_value(tensor_name, nodes, initializers):
    """The value of an initializer or Constant node output, or None when it is computed or external."""
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    if tensor_name in initializers:
        init = initializers[tensor_name]
        if uses_external_data(init):
            return None
        try:
            return numpy_helper.to_array(init)
        except Exception:
            return None
    for n in nodes:
        if n.op_type == "Constant" and n.output and n.output[0] == tensor_name:
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
    return None


def _is_fp8_dq(node, producers, types) -> bool:
    from onnx import TensorProto as T

    if node.op_type == "TRT_FP8DequantizeLinear":
        return True
    if node.op_type != "DequantizeLinear":
        return False
    fp8 = {T.FLOAT8E4M3FN, getattr(T, "FLOAT8E5M2", -1)}
    if types.get(node.input[0], (0,))[0] in fp8:
        return True
    if len(node.input) > 2 and types.get(node.input[2], (0,))[0] in fp8:
        return True
    q = producers.get(node.input[0])
    if q is not None and q.op_type in QUANTIZE_OPS:
        if q.op_type == "TRT_FP8QuantizeLinear":
            return True
        if len(q.input) > 2 and types.get(q.input[2], (0,))[0] in fp8:
            return True
        if any(a.name == "output_dtype" and a.i in fp8 for a in q.attribute):
            return True
    return False


def _trace(tensor, producers, initializers, stop):
    """Follow layout-only ops and Q/DQ upstream; return the first node for which stop(node) holds, or None."""
    seen = set()
    while tensor and tensor not in initializers and tensor not in seen:
        seen.add(tensor)
        node = producers.get(tensor)
        if node is None:
            return None
        if stop(node):
            return node
        if node.op_type in PASSTHROUGH_OPS or node.op_type in QUANTIZE_OPS | DEQUANTIZE_OPS:
            tensor = node.input[0] if node.input else None
            continue
        return None
    return None


def _is_activation(tensor, producers, initializers) -> bool:
    """True when a tensor is computed from graph inputs, not only from weights/constants."""
    seen, stack = set(), [tensor]
    while stack:
        t = stack.pop()
        if t in seen or not t:
            continue
        seen.add(t)
        if t in initializers:
            continue
        node = producers.get(t)
        if node is None:
            return True  # a graph input
        if node.op_type == "Constant":
            continue
        stack.extend(node.input)
        if len(seen) > 64:
            return True
    return False


def _check_fp8_attention(report, name, node, producers, initializers, types):
    if len(node.input) < 2:
        return
    a, b = node.input[0], node.input[1]
    if not all(_is_activation(t, producers, initializers) for t in (a, b)):
        return  # a weight matmul, not attention
    fp8 = [_trace(t, producers, initializers, lambda n: _is_fp8_dq(n, producers, types)) is not None for t in (a, b)]
    if not any(fp8):
        return
    softmax_side = _trace(a, producers, initializers, lambda n: n.op_type == "Softmax") is not None
    # QK^T: head_dim is A's contraction (last) dim; softmax(QK^T)V: head_dim is V's last dim.
    tensor, which = (b, "V") if softmax_side else (a, "Q")
    dims = (types.get(tensor) or (0, None))[1]
    head_dim = dims[-1] if dims else None
    if isinstance(head_dim, int) and head_dim > 0:
        if head_dim % FP8_HEAD_DIM_MULTIPLE:
            report.add(WARNING, "fp8-head-dim", name, node.op_type, f"FP8 attention with head_dim {head_dim} "
                       f"({which} last dim): TensorRT's fused FP8 attention needs head_dim % {FP8_HEAD_DIM_MULTIPLE} "
                       "== 0; keep this attention in bf16/fp16")
    else:
        report.add(WARNING, "fp8-head-dim", name, node.op_type, "FP8 attention whose head_dim is not known statically: "
                   f"TensorRT needs head_dim % {FP8_HEAD_DIM_MULTIPLE} == 0")


# -- CLI (`qitrt lint`, registered by build/cli.py) ------------------------------------------------------
def add_lint_parser(sub):
    p = sub.add_parser("lint", help="static TensorRT checks of an ONNX graph (ops, dtypes, Q/DQ, FP8 attention, "
                       "external data); exits 1 on errors")
    p.add_argument("model", nargs="+", help="ONNX file(s) or engine folder(s) with manifest.json")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")
    p.add_argument("--strict", action="store_true", help="fail on warnings too")
    p.set_defaults(func=lint_main)
    return p


def _expand(paths) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            manifest = read_manifest(p)
            out.extend(c.graph.path(p) for c in manifest.components.values())
        else:
            out.append(p)
    return out


def lint_main(args) -> int:
    files = _expand(args.model)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise InputError("model", missing, "existing .onnx files or engine folders")
    reports = [lint_onnx(f) for f in files]
    if getattr(args, "json", False):
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        for r in reports:
            print(r.summary())
    strict = getattr(args, "strict", False)
    failed = any(not r.ok or (strict and r.warnings) for r in reports)
    return 1 if failed else 0


__all__ = ["lint_onnx", "LintReport", "Finding", "lint_main", "add_lint_parser", "TENSORRT_ONNX_OPS",
           "TRT_DOMAIN_OPS"]

if __name__ == "__main__":  # python -m qwen_image_trt.compile.lint MODEL.onnx
    import argparse

    parser = argparse.ArgumentParser(prog="qitrt")
    add_lint_parser(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(["lint", *sys.argv[1:]])
    sys.exit(ns.func(ns))
