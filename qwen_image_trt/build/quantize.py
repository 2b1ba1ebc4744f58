"""Stage: fp32 transformer + calibration set -> int8 / fp8 Q/DQ ONNX graph with a manifest (`qitrt quantize`).

1. ModelOpt (`modelopt.torch.quantization.quantize`) on the tensor-only ExportableTransformer, calibrated by
   replaying a recorded set (`qitrt calibrate`) with text padded to the runtime's bucket, so the quantizers see
   exactly what the engine will. Layers the recipe keeps are disabled in the config before calibration
   (SmoothQuant folds scales into weights, so disabling afterwards would be wrong).
2. Export with the legacy exporter (dynamo=False, the only path ModelOpt's quantized modules take), opset 19,
   same I/O names and dynamic axes as the fp32 export.
3. Graph passes: FP8's `trt::TRT_FP8{Quantize,Dequantize}Linear` become standard ONNX ops with an FP8 zero point
   (what ModelOpt's own FP8 ONNX exporter hands TensorRT, and what ONNX Runtime can run); weights are stored
   quantized (int8 / float8e4m3fn initializer -> DequantizeLinear), with the Linear's weight Transpose folded
   in, so DQ feeds the MatMul/Gemm directly (TensorRT's strongly typed Q/DQ fusion pattern) and the file is
   ~4x smaller for the quantized layers. Activations keep Q -> DQ pairs in front of each quantized MatMul.
4. ONNX Runtime check on held-out calibration forwards against the eager fp32 module (cosine, rel. L2).

The VAE graphs come from an fp32 export (hard-linked, or exported here when none is given).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from qwen_image_trt.build.manifest import (MANIFEST, entry_files_intact, file_sha256, read_manifest, tool_versions,
                                           write_manifest)
from qwen_image_trt.build.recipe import QUANT_PRECISIONS, is_excluded, make_recipe, modelopt_config, recipe_hash
from qwen_image_trt.errors import InputError, QitrtError

log = logging.getLogger(__name__)

EXPORTER = "modelopt+torch.onnx.export(dynamo=False)"
QUANT_OPSET = 19  # FP8 Q/DQ with zero point needs opset >= 19
PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2
VAE_COMPONENTS = ("vae_decoder", "vae_encoder")
CHECK_CALLS = 4  # held-out forwards the ONNX Runtime check runs


def quantize_onnx(checkpoint, calibration, out_dir, precision: str, *, recipe: dict | None = None, keep=(),
                  vae_from=None, sizes=None, text_bucket: int | None = None, device: str = "cpu",
                  force: bool = False, progress: bool = True) -> dict:
    """Quantize `checkpoint`'s transformer with `calibration` into `out_dir`; return the engine manifest.

    `recipe`: overrides of the default recipe (dict, e.g. from --recipe FILE); `keep`: extra modules kept in
    high precision (e.g. ["img_mlp"]); `vae_from`: an fp32 export folder to take the VAE graphs from;
    `sizes`: [(w, h)] the engine must serve: the calibration set must cover each.
    """
    from qwen_image_trt.build.export import EXPORT_FORMAT
    from qwen_image_trt.calibration.capture import CalibrationSet
    from qwen_image_trt.models import checkpoint as ckpt
    from qwen_image_trt.runtime.transformer import DEFAULT_TEXT_BUCKET

    # --- every check before any heavy work
    if precision not in QUANT_PRECISIONS:
        raise InputError("precision", precision, f"one of {', '.join(QUANT_PRECISIONS)} (bf16/fp16 need no "
                         "calibration: `qitrt export --precision bf16`)")
    root = ckpt.validate_checkpoint(checkpoint, parts=("transformer", "vae"))
    identity = ckpt.checkpoint_identity(root)
    calib = CalibrationSet(calibration)
    calib.check_checkpoint(identity)
    if sizes:
        calib.check_sizes(sizes)
    elif calib.num_calls("calib") < 1:
        raise InputError("calibration", str(calibration), "a set with calibration forwards")
    tconfig = ckpt.read_config(root, "transformer")
    recipe = make_recipe(precision, tconfig["num_layers"], overrides=recipe, keep=keep)
    bucket = int(text_bucket or DEFAULT_TEXT_BUCKET)
    if vae_from is not None:
        vae_manifest = read_manifest(vae_from)
        if vae_manifest.get("checkpoint", {}).get("identity") != identity:
            raise InputError("vae_from", str(vae_from), f"an fp32 export of this checkpoint ({identity})")
        missing = [c for c in VAE_COMPONENTS if c not in vae_manifest.get("components", {})]
        if missing:
            raise InputError("vae_from", str(vae_from), f"an export holding {', '.join(missing)}")
    _require_modelopt()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import modelopt

    source = {"checkpoint": identity, "calibration": calib.set_id, "recipe": recipe_hash(recipe),
              "precision": precision, "opset": QUANT_OPSET, "exporter": EXPORTER, "text_bucket": bucket,
              "modelopt": modelopt.__version__}
    old = None
    if (out / MANIFEST).is_file():
        try:
            old = read_manifest(out)
        except QitrtError:
            old = None
    manifest = {
        "format": EXPORT_FORMAT, "stage": "quantize",
        "checkpoint": {"path": str(root.resolve()), "identity": identity,
                       "pipeline": _pipeline_class(root), "transformer_config": tconfig,
                       "vae_config": ckpt.read_config(root, "vae")},
        "precision": precision, "opset": QUANT_OPSET, "exporter": EXPORTER, "versions": tool_versions(),
        "quantization": None, "components": {},
    }

    # --- transformer
    entry = (old or {}).get("components", {}).get("transformer")
    if not force and entry and entry.get("source") == source and entry_files_intact(out, entry):
        log.info("quantize: transformer unchanged (calibration %s, recipe %s), skipped", calib.set_id,
                 source["recipe"])
        manifest["components"]["transformer"] = entry
        manifest["quantization"] = old["quantization"]
        skipped = True
    else:
        entry, quant_info = _quantize_transformer(root, tconfig, calib, recipe, out, source, bucket, device,
                                                  progress)
        manifest["components"]["transformer"] = entry
        manifest["quantization"] = quant_info
        skipped = False

    # --- VAE graphs (fp32)
    if vae_from is None:
        from qwen_image_trt.build.export import export_onnx

        vae_from = out / "vae-fp32"
        export_onnx(root, vae_from, precision="fp32", components=VAE_COMPONENTS, progress=False)
    manifest["components"].update(_link_components(Path(vae_from), out, VAE_COMPONENTS))
    manifest["skipped"] = skipped
    write_manifest(out, manifest)
    return manifest


def _require_modelopt() -> None:
    try:
        import modelopt.torch.quantization  # noqa: F401
    except ImportError as e:
        raise QitrtError(f"quantization needs NVIDIA ModelOpt: pip install nvidia-modelopt ({e})") from None


def _pipeline_class(root: Path) -> str:
    import json

    return json.loads((root / "model_index.json").read_text())["_class_name"]


def _link_components(src: Path, out: Path, names) -> dict:
    """Hard-link (or copy) exported graphs into `out`, keeping their manifest entries."""
    entries = {}
    src_manifest = read_manifest(src)
    for name in names:
        e = dict(src_manifest["components"][name])
        for key in ("file", "external_data"):
            if not e.get(key):
                continue
            a, b = src / e[key], out / e[key]
            if b.exists() and b.stat().st_size == a.stat().st_size and (
                    b.samefile(a) or file_sha256(b) == file_sha256(a)):
                continue
            b.unlink(missing_ok=True)
            try:
                os.link(a, b)
            except OSError:
                shutil.copy2(a, b)
        e["linked_from"] = str(src.resolve())
        entries[name] = e
    return entries


def _quantize_transformer(root, tconfig, calib, recipe, out: Path, source: dict, bucket: int, device: str,
                          progress: bool):
    import modelopt.torch.quantization as mtq
    from tqdm.auto import tqdm

    from qwen_image_trt.models.specs import TRANSFORMER

    timings = {}
    t0 = time.perf_counter()
    # High-precision layers compute in fp32 on CPU (tests, tiny model) and in bf16 on a GPU: the real 20B
    # transformer is ~80 GB in fp32, ~40 GB in bf16 (its reference precision; fp16 overflows, see NOTES).
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    module = TRANSFORMER.build_module(root, dtype).to(device)
    cfg = modelopt_config(recipe)
    axes = tconfig["axes_dims_rope"]
    n_calls = calib.num_calls("calib")

    def forward_loop(model):
        bar = tqdm(total=n_calls, desc=f"quantize {recipe['precision']} (calibrate)", unit="fwd",
                   disable=not progress)
        for args in calib.export_inputs(axes, "calib", text_bucket=bucket):
            model(*(a.to(device) for a in args))
            bar.update()
        bar.close()

    with torch.no_grad():
        module = mtq.quantize(module, cfg, forward_loop)
    timings["calibrate_s"] = time.perf_counter() - t0
    quantized, kept = _layer_report(module, recipe)
    if not quantized:
        raise QitrtError("the recipe left no layer to quantize; relax keep/keep_first_blocks/keep_last_blocks")

    # Export (legacy exporter) at a held-out sample's shape; then graph passes.
    t1 = time.perf_counter()
    example = next(calib.export_inputs(axes, "holdout", text_bucket=bucket), None) or \
        next(calib.export_inputs(axes, "calib", text_bucket=bucket))
    path = out / "transformer.onnx"
    data_name = "transformer.onnx.data"
    import onnx

    with tempfile.TemporaryDirectory(dir=out) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad():
            torch.onnx.export(module, tuple(a.to(device) for a in example), str(raw),
                              input_names=TRANSFORMER.input_names, output_names=TRANSFORMER.output_names,
                              dynamic_axes=TRANSFORMER.dynamic_axes, opset_version=QUANT_OPSET, dynamo=False,
                              do_constant_folding=True)
        timings["export_s"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        model = onnx.load(str(raw), load_external_data=True)
        model, qdq = finalize_qdq(model, recipe["precision"])
        for stale in (path, out / data_name):
            stale.unlink(missing_ok=True)
        large = model.ByteSize() > PROTOBUF_LIMIT
        onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        del model
        timings["graph_passes_s"] = time.perf_counter() - t2
    onnx.checker.check_model(str(path), full_check=False)

    t3 = time.perf_counter()
    ort_check = _ort_check(path, module, calib, axes, bucket, device)
    timings["ort_check_s"] = time.perf_counter() - t3
    del module

    graph = onnx.load(str(path), load_external_data=False).graph
    from qwen_image_trt.build.export import _io

    data = out / data_name
    entry = {
        "file": path.name, "external_data": data_name if data.exists() else None,
        "sha256": file_sha256(path),
        "bytes": path.stat().st_size + (data.stat().st_size if data.exists() else 0),
        "source": source,
        "inputs": [_io(v) for v in graph.input], "outputs": [_io(v) for v in graph.output],
        "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in TRANSFORMER.dynamic_axes.items()},
        "qdq": qdq, "ort_check": ort_check,
        "quantize_seconds": round(time.perf_counter() - t0, 3),
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    info = {"recipe": recipe, "recipe_hash": source["recipe"],
            "calibration": {"set_id": calib.set_id, "folder": str(calib.folder.resolve()),
                            "calls": calib.num_calls("calib"), "settings": calib.settings,
                            "prompts": [s["prompt_id"] for s in calib.manifest["samples"] if s["split"] == "calib"]},
            "quantized_layers": quantized, "kept_layers": kept, "text_bucket": bucket}
    return entry, info


def _layer_report(module, recipe) -> tuple[list[str], list[str]]:
    """Linear layers whose weight quantizer is on / off, by transformer-relative name; checks the recipe held."""
    quantized, kept = [], []
    for name, m in module.named_modules():
        wq = getattr(m, "weight_quantizer", None)
        if wq is None or not isinstance(m, torch.nn.Linear):
            continue
        rel = name.removeprefix("transformer.")
        (quantized if wq.is_enabled else kept).append(rel)
        if wq.is_enabled and is_excluded(rel, recipe):
            raise QitrtError(f"internal: {rel} is excluded by the recipe but ModelOpt quantized it")
    return quantized, kept


def _ort_check(path: Path, module, calib, axes, bucket: int, device: str) -> dict:
    """Quantized graph in ONNX Runtime vs the eager module (quantizers off) on held-out forwards."""
    import modelopt.torch.quantization as mtq
    import onnxruntime as ort

    from qwen_image_trt.models.transformer_export import INPUT_NAMES
    from qwen_image_trt.parity.metrics import tensor_metrics

    on_gpu = torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
    provider = "CUDAExecutionProvider" if on_gpu else "CPUExecutionProvider"
    reference = f"eager {str(module.compute_dtype).removeprefix('torch.')} ExportableTransformer, quantizers off"
    if module.compute_dtype == torch.bfloat16 and not on_gpu:  # ONNX Runtime's CPU provider has no bf16 kernels
        return {"skipped": "bf16 graph and no CUDA execution provider here: check it with `qitrt parity` on a GPU",
                "provider": provider, "reference": reference, "cosine_min": None, "rel_l2_max": None}
    sess = ort.InferenceSession(str(path), providers=[provider])
    mtq.disable_quantizer(module, "*")
    split = "holdout" if calib.num_calls("holdout") else "calib"
    rows = []
    for i, args in enumerate(calib.export_inputs(axes, split, text_bucket=bucket)):
        if i >= CHECK_CALLS:
            break
        got = torch.from_numpy(sess.run(None, {n: a.numpy() for n, a in zip(INPUT_NAMES, args)})[0])
        with torch.no_grad():
            want = module(*(a.to(device) for a in args))
        rows.append(tensor_metrics(want, got))
        if not rows[-1]["finite"]:
            raise QitrtError(f"{path.name}: ONNX Runtime output has non-finite values")
    return {"split": split, "calls": len(rows), "cosine_min": min(r["cosine"] for r in rows),
            "rel_l2_max": max(r["rel_l2"] for r in rows), "provider": provider, "reference": reference}


def finalize_qdq(model, precision: str):
    """FP8 custom ops -> standard ONNX ops; weights stored quantized with DQ feeding MatMul/Gemm. Returns
    (model, counts)."""
    import onnx

    fp8_native = _fp8_to_native(model) if precision == "fp8" else 0
    folded, transposes = _compress_weights(model, precision)
    # Types and shapes recorded at export are stale for the rewritten tensors (uint8 placeholders of the
    # TRT ops, transposed weights); ONNX Runtime and TensorRT infer them again.
    del model.graph.value_info[:]
    if not any(n.domain == "trt" for n in model.graph.node):
        keep = [o for o in model.opset_import if o.domain != "trt"]
        del model.opset_import[:]
        model.opset_import.extend(keep)
    onnx.checker.check_model(model) if model.ByteSize() < PROTOBUF_LIMIT else None
    counts = {"QuantizeLinear": 0, "DequantizeLinear": 0}
    for n in model.graph.node:
        if n.op_type in counts:
            counts[n.op_type] += 1
    return model, {"fp8_nodes_made_native": fp8_native, "weights_stored_quantized": folded,
                   "weight_transposes_folded": transposes, "activation_quantize_nodes": counts["QuantizeLinear"],
                   "dequantize_nodes": counts["DequantizeLinear"]}


def _fp8_to_native(model) -> int:
    from onnx import TensorProto, helper

    n_done = 0
    zp_name = "qitrt_fp8_zero_point"
    need_zp = False
    for node in model.graph.node:
        if node.domain != "trt":
            continue
        if node.op_type == "TRT_FP8QuantizeLinear":
            node.op_type, node.domain = "QuantizeLinear", ""
            if len(node.input) == 2:
                node.input.append(zp_name)
                need_zp = True
            node.attribute.append(helper.make_attribute("saturate", 1))
            n_done += 1
        elif node.op_type == "TRT_FP8DequantizeLinear":
            node.op_type, node.domain = "DequantizeLinear", ""
            n_done += 1
    if need_zp:
        zp = TensorProto(name=zp_name, data_type=TensorProto.FLOAT8E4M3FN, raw_data=b"\x00")
        model.graph.initializer.append(zp)
    return n_done


def _constant_values(model) -> dict:
    """{tensor name: TensorProto} of initializers and Constant node outputs."""
    values = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = node.attribute[0].t
    return values


def _as_float(tensor) -> np.ndarray:
    from onnx import numpy_helper

    arr = numpy_helper.to_array(tensor)
    return np.asarray(arr).astype(np.float32)


def _compress_weights(model, precision: str) -> tuple[int, int]:
    """Q(w const) -> DQ  ==>  DQ(w quantized const); fold DQ -> Transpose([1,0]) -> MatMul into DQ -> MatMul."""
    from onnx import TensorProto, helper

    g = model.graph
    consts = _constant_values(model)
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    remove, new_inits = set(), []
    folded = transposes = 0
    for q in list(g.node):
        if q.op_type != "QuantizeLinear" or q.input[0] not in inits:
            continue
        dqs = consumers.get(q.output[0], [])
        if len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear":
            continue
        dq = dqs[0]
        w = _as_float(inits[q.input[0]])
        scale = _as_float(consts[q.input[1]])
        axis = next((a.i for a in q.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and scale.size > 1:
            shape = [1] * w.ndim
            shape[axis] = -1
            scale_b = scale.reshape(shape)
        else:
            scale_b = scale.reshape(())
        if precision == "int8":
            zp = _as_float(consts[q.input[2]]).reshape(scale_b.shape) if len(q.input) > 2 and q.input[2] else 0
            wq = np.clip(np.rint(w / scale_b) + zp, -128, 127).astype(np.int8)
            raw, dtype = wq.tobytes(), TensorProto.INT8
            arr_shape = wq.shape
        else:
            t = torch.from_numpy(np.clip(w / scale_b, -448.0, 448.0)).to(torch.float8_e4m3fn)
            wq = t.view(torch.uint8).numpy()
            raw, dtype, arr_shape = wq.tobytes(), TensorProto.FLOAT8E4M3FN, wq.shape
        # Fold the Linear's weight Transpose into the stored weight when every consumer is a MatMul.
        after = consumers.get(dq.output[0], [])
        if (len(after) == 1 and after[0].op_type == "Transpose" and wq.ndim == 2
                and [list(a.ints) for a in after[0].attribute if a.name == "perm"] in ([[1, 0]], [])
                and consumers.get(after[0].output[0]) and all(c.op_type == "MatMul"
                                                              for c in consumers[after[0].output[0]])):
            tr = after[0]
            wq = np.ascontiguousarray(wq.T)
            raw, arr_shape = wq.tobytes(), wq.shape
            if scale.ndim == 1 and scale.size > 1:
                for a in dq.attribute:
                    if a.name == "axis":
                        a.i = 1 - a.i
            for c in consumers[tr.output[0]]:
                for k, name in enumerate(c.input):
                    if name == tr.output[0]:
                        c.input[k] = dq.output[0]
            remove.add(id(tr))
            transposes += 1
        name = q.input[0] + "_quantized"
        t = helper.make_tensor(name, dtype, list(arr_shape), vals=raw, raw=True)
        new_inits.append(t)
        dq.input[0] = name
        if len(q.input) > 2 and q.input[2] and len(dq.input) < 3:
            dq.input.append(q.input[2])
        remove.add(id(q))
        folded += 1
    kept_nodes = [n for n in g.node if id(n) not in remove]
    used = {name for n in kept_nodes for name in n.input} | {o.name for o in g.output}
    # Scale/zero-point Constants of the removed weight Q nodes are dead now.
    kept_nodes = [n for n in kept_nodes if n.op_type != "Constant" or n.output[0] in used]
    del g.node[:]
    g.node.extend(kept_nodes)
    used = {name for n in g.node for name in n.input}
    kept_inits = [i for i in g.initializer if i.name in used] + new_inits
    del g.initializer[:]
    g.initializer.extend(kept_inits)
    return folded, transposes


__all__ = ["quantize_onnx", "finalize_qdq", "QUANT_PRECISIONS"]
