"""Qwen-Image-2.1 export at real width: peak host memory against the transformer's weights, and what it predicts for
the real 32-block, 7.1 B model.

For checkpoints with Qwen-Image-2.1's real transformer config and a few of its 32 blocks (`make_real_width_21_checkpoint`:
width 4096, 32 heads x 128, MLP x3, ~0.22 B parameters a block, ~0.14 B outside them), `qitrt export` of the two
transformer graphs a 2.1 engine folder needs by default (extract and cached) runs in a subprocess of its own; per
graph: its files' size, the export's peak RSS (sampled inside, `core.resources.PeakRSS`) and the child's ru_maxrss.
For the fp32 rows (`--quantize`) the stock 2.1 pipeline then records a small calibration set and both graphs are
quantized to int8 with every block quantized, each in a subprocess: the quantize stage's peak. Then a least-squares
line peak = a + b * blocks per precision and stage, its prediction at 32 blocks, and the ratio to the transformer's
weights (the scale-true limits: export <= 1.5 x weights, quantization <= 2 x).

Writes benchmarks/results/qwen21_scale.json and .md.

    python benchmarks/qwen21_scale.py                       # fp32 1, 2 blocks (+ int8); bf16 2, 4 (~20 min, 2 cores)
    python benchmarks/qwen21_scale.py --runs fp32:1 --work /big/disk
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GB = 1e9
REAL_BLOCKS = 32
COMPONENTS = "transformer_extract,transformer_cached"
LIMIT = 1.5  # export peak <= 1.5 x the transformer's weights in the export precision


def run_child(code: str) -> tuple[float, int]:
    """Run `code` in a fresh interpreter; (seconds, ru_maxrss bytes of the child)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child failed ({status}): {code[:200]}")
    return time.perf_counter() - t0, usage.ru_maxrss * 1024


CALIBRATION = dict(num_prompts=2, steps=2, sizes="64x64", record_every=1, seed=0, holdout=1)
QUANT_LIMIT = 2.0  # quantization peak <= 2 x the transformer's weights in the graph's precision


def quantize_row(work: Path, ckpt: Path, out: Path, precision: str, blocks: int) -> dict:
    """Calibrate (the stock 2.1 pipeline, 2 prompts x 2 steps at 64x64) and quantize both graphs to int8 with every
    block quantized, each in its own subprocess; the quantize stage's peak against the weights."""
    calib = work / f"calib-{precision}-{blocks}"
    calib_s, calib_peak = run_child(
        "from qwen_image_trt.calibration.capture import calibrate; "
        f"calibrate({str(ckpt)!r}, {str(calib)!r}, progress=False, **{CALIBRATION!r})")
    qout = work / f"int8-{precision}-{blocks}"
    recipe = {"keep_first_blocks": 0, "keep_last_blocks": 0}
    quant_s, quant_child = run_child(
        "from qwen_image_trt.compile.quantize import quantize_onnx; "
        f"quantize_onnx({str(ckpt)!r}, {str(calib)!r}, {str(qout)!r}, 'int8', graphs={str(out)!r}, "
        f"recipe={recipe!r}, progress=False)")
    from qwen_image_trt.core.manifest import read_manifest

    m = read_manifest(qout)
    c = m.components["transformer_cached"]
    row = {"calibrate_s": round(calib_s, 1), "calibrate_child_maxrss_bytes": calib_peak,
           "quantize_s": round(quant_s, 1), "quantize_peak_rss_bytes": c.peak_rss_bytes,
           "quantize_child_maxrss_bytes": quant_child, "quantized_layers": len(m.quantization.quantized_layers),
           "mismatch": c.check.get("mismatch"), "block_rel_err": c.check.get("block_rel_err")}
    shutil.rmtree(calib, ignore_errors=True)
    shutil.rmtree(qout, ignore_errors=True)
    return row


def one(work: Path, precision: str, blocks: int, quantize: bool = False) -> dict:
    ckpt, out = work / f"rw21-{precision}-{blocks}", work / f"onnx-{precision}-{blocks}"
    make_s, _ = run_child("from qwen_image_trt.models.tiny21 import make_real_width_21_checkpoint as m; "
                          f"m({str(ckpt)!r}, {blocks}, dtype={precision!r}, overwrite=True)")
    export_s, child_peak = run_child(
        "from qwen_image_trt.compile.export import export_onnx; "
        f"export_onnx({str(ckpt)!r}, {str(out)!r}, precision={precision!r}, "
        f"components={COMPONENTS.split(',')!r}, progress=False)")
    from qwen_image_trt.core.manifest import read_manifest
    from qwen_image_trt.models.checkpoint import weights_info

    weights = weights_info(ckpt, "transformer")
    m = read_manifest(out)
    graphs = {}
    for name, c in m.components.items():
        files = [out / c.graph.file] + ([out / c.graph.external_data] if c.graph.external_data else [])
        graphs[name] = {"bytes": sum(f.stat().st_size for f in files), "peak_rss_bytes": c.peak_rss_bytes,
                        "seconds": c.seconds, "check": c.check}
    peak = max(g["peak_rss_bytes"] for g in graphs.values())
    row = {"precision": precision, "blocks": blocks, "parameters": weights.parameters, "weights_bytes": weights.bytes,
           "graphs": graphs, "peak_rss_bytes": peak, "child_maxrss_bytes": child_peak,
           "peak_over_weights": round(peak / weights.bytes, 3), "make_s": round(make_s, 1),
           "export_s": round(export_s, 1)}
    if quantize:
        row.update(quantize_row(work, ckpt, out, precision, blocks))
        row["quantize_over_weights"] = round(row["quantize_peak_rss_bytes"] / weights.bytes, 3)
    shutil.rmtree(ckpt, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return row


def fit(rows: list[dict], key: str) -> tuple[float, float]:
    xs, ys = [r["blocks"] for r in rows], [r[key] for r in rows]
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if n > 1 and sxx else 0.0
    return my - b * mx, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="fp32:1,fp32:2,bf16:2,bf16:4", help="precision:blocks, comma-separated")
    ap.add_argument("--quantize", default="fp32", help="precisions whose rows also calibrate and quantize to int8 "
                    "(comma-separated; '' for none; ONNX Runtime's CPU provider checks fp32 graphs only)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="qwen21-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in a.runs.split(","):
        precision, blocks = spec.split(":")
        print(f"qwen21_scale: {precision} x {blocks} block(s) ...", flush=True)
        rows.append(one(work, precision, int(blocks), quantize=precision in a.quantize.split(",")))
        r = rows[-1]
        print(f"  weights {r['weights_bytes'] / GB:.2f} GB, peak {r['peak_rss_bytes'] / GB:.2f} GB "
              f"({r['peak_over_weights']}x), graphs "
              + ", ".join(f"{k} {g['bytes'] / GB:.2f} GB" for k, g in r["graphs"].items()), flush=True)
    predictions = {}
    for precision in sorted({r["precision"] for r in rows}):
        sel = [r for r in rows if r["precision"] == precision]
        if len({r["blocks"] for r in sel}) < 2:
            continue
        pa, pb = fit(sel, "peak_rss_bytes")
        wa, wb = fit(sel, "weights_bytes")
        peak, weights = pa + pb * REAL_BLOCKS, wa + wb * REAL_BLOCKS
        predictions[precision] = {"peak_rss_bytes": peak, "weights_bytes": weights,
                                  "peak_over_weights": round(peak / weights, 3), "limit": LIMIT,
                                  "within_limit": peak <= LIMIT * weights}
        quantized = [r for r in sel if "quantize_peak_rss_bytes" in r]
        if len({r["blocks"] for r in quantized}) >= 2:
            qa, qb = fit(quantized, "quantize_peak_rss_bytes")
            q = qa + qb * REAL_BLOCKS
            predictions[precision].update(quantize_peak_rss_bytes=q, quantize_over_weights=round(q / weights, 3),
                                          quantize_limit=QUANT_LIMIT, quantize_within_limit=q <= QUANT_LIMIT * weights)
    import platform

    data = {"format": "qitrt-qwen21-scale@1", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
            "components": COMPONENTS.split(","), "rows": rows, "real_blocks": REAL_BLOCKS,
            "predictions": predictions, "command": "python benchmarks/qwen21_scale.py --runs " + a.runs}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "qwen21_scale.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = ["# Qwen-Image-2.1 export at real width", "", f"`{data['command']}` ({data['date']}, "
             f"{data['machine']['cpus']} CPUs). Graphs: {COMPONENTS} (what `qitrt export` of a 2.1 checkpoint writes "
             "for the transformer by default).", "",
             "| precision | blocks | params (B) | weights GB | extract GB | cached GB | peak RSS GB | peak / weights | "
             "export s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g = r["graphs"]
        lines.append(f"| {r['precision']} | {r['blocks']} | {r['parameters'] / 1e9:.3f} | {r['weights_bytes'] / GB:.2f} "
                     f"| {g['transformer_extract']['bytes'] / GB:.2f} | {g['transformer_cached']['bytes'] / GB:.2f} | "
                     f"{r['peak_rss_bytes'] / GB:.2f} | {r['peak_over_weights']} | {r['export_s']} |")
    quantized = [r for r in rows if "quantize_peak_rss_bytes" in r]
    if quantized:
        lines += ["", "INT8 of both graphs from those exports (calibration: the stock 2.1 pipeline, "
                  f"{CALIBRATION['num_prompts']} prompts x {CALIBRATION['steps']} steps at {CALIBRATION['sizes']}; "
                  "every block quantized):", "",
                  "| precision | blocks | layers | quantize peak RSS GB | peak / weights | quantize s | mismatch | "
                  "block_rel_err |", "|---|---|---|---|---|---|---|---|"]
        for r in quantized:
            lines.append(f"| {r['precision']} | {r['blocks']} | {r['quantized_layers']} | "
                         f"{r['quantize_peak_rss_bytes'] / GB:.2f} | {r['quantize_over_weights']} | {r['quantize_s']} | "
                         f"{r['mismatch']:.3f} | {r['block_rel_err']:.3f} |")
    lines += ["", "Predicted at 32 blocks (7.1 B) by a line through the rows of each precision:", ""]
    for precision, p in predictions.items():
        lines.append(f"- {precision}: export peak {p['peak_rss_bytes'] / GB:.1f} GB for {p['weights_bytes'] / GB:.1f} "
                     f"GB of weights = {p['peak_over_weights']}x (limit {LIMIT}x: "
                     f"{'within' if p['within_limit'] else 'OVER'})"
                     + (f"; quantize peak {p['quantize_peak_rss_bytes'] / GB:.1f} GB = {p['quantize_over_weights']}x "
                        f"(limit {QUANT_LIMIT}x: {'within' if p['quantize_within_limit'] else 'OVER'})"
                        if "quantize_peak_rss_bytes" in p else ""))
    (out / "qwen21_scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
