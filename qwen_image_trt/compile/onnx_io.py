"""ONNX graphs of any size: traced with torch's dynamo exporter, written with streamed external data.

No step here holds a serialized proto of a whole model, nor a second copy of its weights:
- `trace` runs `torch.onnx.export(dynamo=True)`; the ONNX IR it returns references the module's own
  parameters (and numpy views of them for folded transposes), so tracing costs no weight memory;
- `save` writes initializers one at a time into one data file (aligned, hashed while written), then the
  small graph proto, each under a temporary name renamed at the end, so a crash or a full disk never
  leaves a graph that a later run would take for finished;
- tensors that already live in another graph's data file are copied with plain reads, not memory maps,
  so the copy's pages are not counted as (or kept in) the process's memory.

`name_linear_weights` gives the weights the exporter folded (Transpose of a Linear weight -> `val_123`)
the module's name, so later stages (quantization, LoRA refit) find every Linear by name.
"""

from __future__ import annotations

import ast
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen_image_trt.core.errors import QitrtError
from qwen_image_trt.core.files import HashingWriter, copy_range, disk_error, file_sha256, temporary_name
from qwen_image_trt.core.manifest import GraphFile, TensorInfo
from qwen_image_trt.core.ort_options import session_options

log = logging.getLogger(__name__)

EXTERNAL_MIN_BYTES = 1024  # smaller tensors (scales, norms' eps) stay inside the graph proto
ALIGNMENT = 4096  # page-aligned offsets: ONNX Runtime and TensorRT can map tensors straight from the file
NAME_SCOPES = "pkg.torch.onnx.name_scopes"
TRANSPOSED_SUFFIX = ".weight.T"


# onnxscript rewrite rules the exporter's optimizer runs that never match a Qwen-Image graph but cost the most:
# SlicesSplit (two Slices covering a tensor -> one Split) is a two-output pattern, matched by scanning the graph
# from every Slice, so its cost grows with the square of the graph: ~10 s per pass on the 6-block tiny transformer,
# a third of the whole export, for no node changed (tests/test_export.py checks the graph is the same without it).
SKIPPED_REWRITES = ("SlicesSplit",)


@contextmanager
def without_rewrites(names=SKIPPED_REWRITES):
    """The exporter's optimizer, minus the rewrite rules in `names` (its rule list is read at each call)."""
    try:
        from onnxscript import rewriter
        rules = rewriter._DEFAULT_REWRITE_RULES
    except (ImportError, AttributeError):  # another onnxscript: optimize as it does
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in rules if getattr(r, "name", None) not in names)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


def trace(module, args, spec, opset: int, skip_rewrites=SKIPPED_REWRITES):
    """Trace `module` with the dynamo exporter; return the ONNX IR model (weights not copied)."""
    import torch

    for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))
    with torch.no_grad(), without_rewrites(skip_rewrites):
        program = torch.onnx.export(module, tuple(args), input_names=spec.input_names,
                                    output_names=spec.output_names, dynamic_shapes=dynamic_shapes(spec),
                                    opset_version=opset, dynamo=True, optimize=True, verbose=False)
    model = program.model
    for node in model.graph.all_nodes():  # stack traces and FX text: most of the proto's bytes, read by no one
        for key in [k for k in node.metadata_props if k != NAME_SCOPES]:
            del node.metadata_props[key]
    return model


def dynamic_shapes(spec) -> tuple:
    """The spec's named dynamic axes as torch.export Dims, one Dim per name (inputs that share a name share
    a size), positional like the inputs."""
    from torch.export import Dim

    dims: dict[str, object] = {}
    out = []
    for name in spec.input_names:
        axes = spec.dynamic_axes.get(name, {})
        out.append({axis: dims.setdefault(label, Dim(label, min=1)) for axis, label in axes.items()} or None)
    return tuple(out)


def linear_module(node) -> str | None:
    """The torch module path of a MatMul/Gemm node made from an nn.Linear, from the exporter's metadata."""
    scopes = node.metadata_props.get(NAME_SCOPES)
    if not scopes:
        return None
    try:
        path = ast.literal_eval(scopes)
    except (ValueError, SyntaxError):
        return None
    # [..., 'transformer.transformer_blocks.0.attn.to_q', 'linear_12']: the last entry is the op itself; only
    # aten.linear ops carry a weight (attention's own MatMuls sit in the `attn` scope too).
    if len(path) < 2 or not path[-2] or not str(path[-1]).startswith("linear"):
        return None
    return path[-2]


@dataclass(frozen=True)
class LinearWeight:
    """Where an nn.Linear's weight sits in the graph: node, initializer name, layout."""

    module: str  # module path inside the exported wrapper, e.g. transformer.transformer_blocks.0.attn.to_q
    node: object  # onnx_ir Node (MatMul or Gemm)
    weight: object  # onnx_ir Value (initializer)
    transposed: bool  # True: stored [in, out] (MatMul); False: [out, in] (Gemm transB=1)


def linear_weights(model, initializers_only: bool = True) -> dict[str, LinearWeight]:
    """{module path: LinearWeight} for every MatMul/Gemm made from an nn.Linear; with `initializers_only`,
    only those whose weight is an initializer (a high-precision graph; in a Q/DQ graph it is a DequantizeLinear)."""
    found: dict[str, LinearWeight] = {}
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if weight is None or (initializers_only and not weight.is_initializer()):
            continue
        module = linear_module(node)
        if module is None:
            continue
        if node.op_type == "Gemm":
            trans_b = node.attributes.get("transB")
            transposed = not (trans_b is not None and trans_b.value == 1)
        else:
            transposed = True
        if module in found:
            raise QitrtError(f"{module} appears as two matrix multiplications in the exported graph; cannot tell "
                             "which holds its weight")
        found[module] = LinearWeight(module, node, weight, transposed)
    return found


def name_linear_weights(model) -> int:
    """Rename folded Linear weights after their module (`<module>.weight.T` when stored transposed)."""
    renamed = 0
    taken = set(model.graph.initializers)
    for lw in linear_weights(model).values():
        want = f"{lw.module}{TRANSPOSED_SUFFIX}" if lw.transposed else f"{lw.module}.weight"
        if lw.weight.name == want or want in taken or len(lw.weight.uses()) != 1:
            continue
        graph = model.graph
        old = lw.weight.name
        graph.initializers.pop(old)
        lw.weight.name = want
        graph.register_initializer(lw.weight)
        taken.discard(old)
        taken.add(want)
        renamed += 1
    return renamed


def _tensor_bytes(tensor) -> memoryview:
    """Raw little-endian bytes of one tensor (evaluates a lazy or transposed view: one tensor at a time)."""
    return memoryview(tensor.tobytes())


def save(model, path: str | os.PathLike, *, external_min_bytes: int = EXTERNAL_MIN_BYTES) -> GraphFile:
    """Write `model` as `path` + `path.data` (every initializer of external_min_bytes or more); return what
    was written, hashes included. Safe to interrupt: nothing is in place until both files are complete."""
    import onnx_ir as ir

    path = Path(path)
    data_path = path.with_name(path.name + ".data")
    # Both files are written under temporary names and renamed at the end, so a graph may be saved over the
    # very files its tensors are read from.
    sources: dict[str, object] = {}
    external = 0
    t0 = time.perf_counter()
    with HashingWriter(data_path) as out:
        for value in list(model.graph.initializers.values()):
            tensor = value.const_value
            if tensor is None or tensor.nbytes < external_min_bytes:
                continue
            offset = out.pad_to(ALIGNMENT)
            if isinstance(tensor, ir.ExternalTensor):  # from another graph's data file: stream it across
                src = os.path.join(tensor.base_dir, tensor.location)
                fh = sources.get(src) or sources.setdefault(src, open(src, "rb"))
                copy_range(fh, tensor.offset or 0, tensor.length or tensor.nbytes, out)
                try:
                    tensor.release()  # unmap, if something read it through a map before
                except BufferError:  # a caller still holds an array over the map: it closes when that goes
                    pass
            else:
                out.write(_tensor_bytes(tensor))
            value.const_value = ir.ExternalTensor(data_path.name, offset, out.size - offset, tensor.dtype,
                                                  shape=tensor.shape, name=value.name, base_dir=str(path.parent))
            external += 1
        for fh in sources.values():
            fh.close()
        data_sha, data_bytes = out.sha256, out.size
        out.commit()
    tmp = temporary_name(path)
    try:
        ir.save(model, tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        data_path.unlink(missing_ok=True)
        raise disk_error(e, path) from e
    log.info("onnx: wrote %s (%d external tensors, %.2f GB) in %.1fs", path.name, external, data_bytes / 1e9,
             time.perf_counter() - t0)
    if not external:
        data_path.unlink()
    return GraphFile(file=path.name, sha256=file_sha256(path), external_data=data_path.name if external else None,
                     external_data_sha256=data_sha if external else None,
                     bytes=path.stat().st_size + (data_bytes if external else 0))


def load_structure(path: str | os.PathLike):
    """The graph of an ONNX file as ONNX IR, weights left in their data file (read only when asked)."""
    import onnx_ir as ir

    return ir.load(str(path))


def io_info(path: str | os.PathLike) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """Names, dtypes and (symbolic) shapes of a graph's inputs and outputs, read without its weights."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def info(v):
        t = v.type.tensor_type
        return TensorInfo(name=v.name, dtype=onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                          shape=[d.dim_param or d.dim_value for d in t.shape.dim])

    return [info(v) for v in graph.input], [info(v) for v in graph.output]


def check_graph(path: str | os.PathLike) -> None:
    """ONNX checker and strict shape inference, both from the path (neither loads the weights)."""
    import tempfile

    import onnx

    onnx.checker.check_model(str(path), full_check=False)
    with tempfile.TemporaryDirectory(dir=Path(path).parent) as tmp:
        onnx.shape_inference.infer_shapes_path(str(path), str(Path(tmp) / "inferred.onnx"), strict_mode=True)


def ort_session(path: str | os.PathLike, provider: str = "CPUExecutionProvider"):
    """An ONNX Runtime session that keeps one copy of the weights: no offline prepacking of MatMul weights
    (a second, repacked copy), no spinning threads."""
    import onnxruntime as ort

    opts = session_options()
    opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=[provider])


def as_numpy(tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy() if hasattr(tensor, "detach") else np.asarray(tensor)


__all__ = ["trace", "save", "load_structure", "io_info", "check_graph", "ort_session", "linear_weights",
           "name_linear_weights", "LinearWeight", "EXTERNAL_MIN_BYTES"]
