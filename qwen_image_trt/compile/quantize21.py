"""Stage quantize for Qwen-Image-2.1: its two transformer graphs (the prefix cache's extract and cached passes) ->
int8 / fp8 Q/DQ graphs, from one calibration of the shared weights.

The passes run the same Linear layers on different tokens (extract: text and condition images at t = 0; cached:
the target at the step's timestep), and each layer gets one set of quantizer numbers used by both graphs. So ModelOpt
calibrates `Passes21`, which runs both passes on every recorded call (extract, then cached on the K/V it just made),
and the calibrated numbers are written into each graph (`qdq.insert_qdq`; layers a graph does not hold, such as the
last block's MLP in the extract graph, are skipped there). Calls are replayed from a 2.1 calibration set
(`qitrt calibrate` records the stock forward's inputs with `img_mask`) through `layout_21`, as the engine drop-in
feeds the graphs. The optional uncached graph is not quantized (a build leaves it out).

Evidence (core.quant_evidence): a call is the first denoising step end to end (extract then cached; inputs
`E2E_INPUTS`), with high-precision, fake-quantized and blocks-bypassed references; the written graphs are checked
layer by layer against the calibrated numbers and end to end in ONNX Runtime (the extract graph's K/V fed to the
cached graph), and refused when they disagree with ModelOpt's simulation.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch
from torch import nn

from qwen_image_trt.compile import onnx_io, qdq
from qwen_image_trt.core import quant_evidence
from qwen_image_trt.core.errors import InputError, QitrtError
from qwen_image_trt.core.manifest import Component, Quantization
from qwen_image_trt.core.resources import PeakRSS
from qwen_image_trt.core.shapes import torch_dtype
from qwen_image_trt.models import checkpoint as ckpt
from qwen_image_trt.models.transformer21_export import Cached21, Extract21, layout_21

GRAPHS = ("transformer_extract", "transformer_cached")
E2E_INPUTS = quant_evidence.E2E_INPUTS_21  # the graphs' own names (tests/test_qwen21_quantize.py pins them)
run_end_to_end = quant_evidence.run_end_to_end_21


class Passes21(nn.Module):
    """Both passes over one transformer; `forward` (E2E_INPUTS) is a first step end to end: extract, then cached on
    those K/V. Setting `skip_blocks` skips them in both passes (the evidence's `bypassed` reference)."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer
        self.extract_pass, self.cached_pass = Extract21(transformer), Cached21(transformer)

    @property
    def skip_blocks(self):
        return self.cached_pass.skip_blocks

    @skip_blocks.setter
    def skip_blocks(self, blocks):
        self.extract_pass.skip_blocks = self.cached_pass.skip_blocks = frozenset(blocks)

    def forward(self, encoder_hidden_states, hidden_states, prefix_index, prefix_block_ids, prefix_key_valid,
                prefix_rope_cos, prefix_rope_sin, latents, latents_rope_cos, latents_rope_sin, timestep):
        kv = self.extract_pass(encoder_hidden_states, hidden_states, prefix_index, prefix_block_ids, prefix_key_valid,
                               prefix_rope_cos, prefix_rope_sin)
        return self.cached_pass(latents, kv, prefix_key_valid, latents_rope_cos, latents_rope_sin, timestep)


def replay_21(call: dict, axes_dims_rope, dtype=torch.float32) -> tuple:
    """One recorded stock forward (a 2.1 calibration call) as `E2E_INPUTS`, laid out as the engine drop-in does."""
    grids = call.get("grids") or (call["grid"],)
    shapes = [[(*g,) for g in (*grids[1:], grids[0])]]  # the stock order: condition images, then the target
    lay = layout_21(call["img_mask"], shapes, call["encoder_hidden_states_mask"], axes_dims_rope,
                    batch=call["hidden_states"].shape[0])
    hidden = call["hidden_states"].to(dtype)
    prefix = lay.prefix_inputs(call["encoder_hidden_states"].to(dtype), hidden)
    latents = hidden[:, hidden.shape[1] - lay.target_tokens:]
    return (*prefix, latents, *lay.latents_rope(latents.shape[0]), call["timestep"].to(dtype))


def check_source(m) -> dict[str, Component]:
    """The two high-precision transformer graphs of a 2.1 export."""
    missing = [c for c in GRAPHS if c not in m.components]
    if missing:
        raise InputError("graphs", "export", f"a Qwen-Image-2.1 export holding {', '.join(missing)}")
    out = {}
    for name in GRAPHS:
        c = m.components[name]
        if c.precision not in ("fp32", "bf16", "fp16") or c.qdq:
            raise InputError("graphs", name, f"a high-precision export (it is {c.precision})")
        out[name] = c
    return out


def quantize_transformer_21(root, calib, recipe, graphs: Path, sources: dict[str, Component], out: Path,
                            stage_source: dict, device: str, progress: bool) -> tuple[dict[str, Component], Quantization]:
    """Calibrate once, write both Q/DQ graphs into `out`, check them; ({graph: entry}, quantization info)."""
    from qwen_image_trt.compile.quantize import _calibrate_module

    precision = sources["transformer_cached"].precision
    timings = {}
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        module = Passes21(ckpt.load_transformer(root, torch_dtype(precision))).to(device)
        axes = module.transformer.config.axes_dims_rope
        dtype = module.extract_pass.compute_dtype
        split = "holdout" if calib.num_calls("holdout") else "calib"
        held_out = [replay_21(c, axes, dtype) for _, c in zip(range(quant_evidence.CHECK_CALLS), calib.calls(split))]
        n_calls = calib.num_calls("calib")

        def calls():
            for c in calib.calls("calib"):
                yield replay_21(c, axes, dtype)

        layers, kept, refs = _calibrate_module(module, recipe, held_out, calls, n_calls, device, progress)
        timings["calibrate_s"] = time.perf_counter() - t0
        del module
        gc.collect()

        t1 = time.perf_counter()
        entries, counts_by_graph, dead = {}, {}, None
        numbers = qdq.expected_numbers(layers)
        for name in GRAPHS:
            model = onnx_io.load_structure(sources[name].graph.path(graphs))
            mine = dict(layers)  # insert_qdq drops (from its argument) the layers this graph does not hold
            counts = qdq.insert_qdq(model, mine, qdq.graph_float_dtype(model))
            counts_by_graph[name] = counts
            dead = set(counts["dead_layers"]) if dead is None else dead & set(counts["dead_layers"])
            graph = onnx_io.save(model, out / f"{name}.onnx")
            del model
            gc.collect()
            onnx_io.check_graph(graph.path(out))
            entries[name] = graph
        if dead:
            raise QitrtError(f"{len(dead)} quantized layer(s) are in neither 2.1 graph (first: {sorted(dead)[0]})")
        timings["write_s"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        evidence_path = quant_evidence.save(out, held_out, *refs, E2E_INPUTS, numbers=numbers)
        check = verify_graphs_21({n: g.path(out) for n, g in entries.items()}, evidence_path, precision,
                                 recipe["precision"])
        timings["check_s"] = time.perf_counter() - t2
    components = {}
    for name, graph in entries.items():
        inputs, outputs = onnx_io.io_info(graph.path(out))
        components[name] = Component(
            graph=graph, precision=recipe["precision"], source=stage_source, inputs=inputs, outputs=outputs,
            dynamic_axes=sources[name].dynamic_axes, seconds=round(time.perf_counter() - t0, 3),
            peak_rss_bytes=mem.peak, check={**check, "timings": {k: round(v, 3) for k, v in timings.items()}},
            qdq={**counts_by_graph[name], "high_precision": precision})
    quantized = sorted(layers)
    info = Quantization(
        recipe=recipe, recipe_hash=stage_source["recipe"], text_bucket=1,
        calibration={"set_id": calib.set_id, "folder": str(calib.folder.resolve()), "calls": n_calls,
                     "settings": calib.settings,
                     "prompts": [s.prompt_id for s in calib.manifest.samples if s.split == "calib"]},
        quantized_layers=quantized, kept_layers=sorted(kept),
        evidence={"file": quant_evidence.EVIDENCE_FILE, "split": split, "inputs": E2E_INPUTS,
                  "graphs": list(GRAPHS), "bypassed_blocks": quant_evidence.quantized_blocks(quantized), **check})
    return components, info


def verify_graphs_21(paths: dict[str, Path], evidence_path: Path, high_precision: str, precision: str) -> dict:
    """As quantize.verify_graph, for the pair: each graph's Q/DQ numbers against the calibrated ones (the layers it
    holds), then the pair end to end in ONNX Runtime against ModelOpt's simulation."""
    import onnxruntime as ort

    expected = quant_evidence.load_numbers(evidence_path)
    for name, path in paths.items():
        model = onnx_io.load_structure(path)
        held = {n: v for n, v in expected.items() if f"{n}/input_quantize" in {x.name for x in model.graph}}
        problems = qdq.graph_numbers_problems(model, held)
        if problems:
            raise QitrtError(f"{path}: the graph's quantization numbers are not the calibrated ones: {problems[0]}")
    if high_precision == "bf16" and "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"skipped": "bf16 graphs and no CUDA execution provider here: check them with `qitrt parity` on a GPU",
                "provider": "CPUExecutionProvider"}
    sessions = {n: onnx_io.ort_session(p) for n, p in paths.items()}

    def runner(name):
        def run(feeds):
            out = sessions[name].run(None, {k: v.numpy() for k, v in feeds.items()})[0]
            return torch.from_numpy(out)
        return run

    calls = quant_evidence.load(evidence_path, E2E_INPUTS)
    outputs = [run_end_to_end(runner("transformer_extract"), runner("transformer_cached"), c["inputs"])
               for c in calls]
    sessions.clear()  # free the two sessions before the figures
    figures = quant_evidence.compare(outputs, calls)
    problem = quant_evidence.verdict(figures, precision)
    if problem:
        raise QitrtError(f"{paths['transformer_cached']}: {problem}. Figures: {figures}")
    return {"provider": "CPUExecutionProvider", **figures}


__all__ = ["Passes21", "replay_21", "quantize_transformer_21", "verify_graphs_21", "run_end_to_end", "GRAPHS",
           "E2E_INPUTS", "check_source"]
