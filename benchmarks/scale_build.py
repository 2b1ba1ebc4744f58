"""Scale-true build benchmark: what export, calibration and quantization cost at Qwen-Image's real width.

For real-width checkpoints with 1, 2 and 4 of the 60 blocks (width 3072, 24 heads x 128, joint_attention_dim
3584: ~0.38 B parameters a block, `make_real_width_checkpoint`), each stage runs in its own subprocess, so peaks
do not mix:

    make           the checkpoint (bf16 on disk, like the real one)
    export_fp32    `export_onnx(precision="fp32")`: the reference precision, checked in ONNX Runtime on CPU
    export_bf16    `export_onnx(precision="bf16")`: the real build's precision (ONNX Runtime CPU cannot run it)
    calibrate      `calibrate()` with the stock pipeline: 2 prompts x 2 steps at 64x64, every step recorded
    quantize_fp32  `quantize_onnx("int8")` from the fp32 export, every block quantized (keep_first/last 0)
    quantize_bf16  the same from the bf16 export (ModelOpt calibrates in bf16)
    ort_engine     ONNX Runtime's offline-optimized copy of the fp32 transformer (`qitrt build` target
                   onnxruntime)

Per stage: wall time, peak RSS sampled inside the child (`core.resources.PeakRSS`) and the child's
ru_maxrss from wait4 (what /usr/bin/time reports) as a cross-check, disk written, machine load. Then a
least-squares line value = a + b * blocks per stage and figure, the prediction for the real 60-block model,
and its ratio to the limits (export <= 1.5 x weights + 2 GB, quantization <= 2 x weights + 2 GB, weights
being the transformer's bytes in the stage's precision).

Writes OUT/scale_build.json, OUT/scale_build.md, OUT/scale_build.png and the coefficients `plan.py` reads
(qwen_image_trt/compile/data/scale_fit.json, --fit-out).

    python benchmarks/scale_build.py                     # 1, 2, 4 blocks, every stage (~25 min on 2 cores)
    python benchmarks/scale_build.py --quick             # 1, 2 blocks, fp32 stages only; results elsewhere
    python benchmarks/scale_build.py --blocks 1,2,4,8 --work /big/disk/scale
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
FORMAT = "qitrt-scale-build@1"
FIT_FORMAT = "qitrt-scale-fit@1"
REAL_BLOCKS = 60
CALIBRATION = {"num_prompts": 2, "steps": 2, "sizes": "64x64", "record_every": 1, "seed": 0}
RECIPE = {"keep_first_blocks": 0, "keep_last_blocks": 0}  # 1-4 blocks: quantize them all ...
# ... except the last block's text-output path: its result is unused, so the exported graph has no MatMul for
# it (dead code) and the Q/DQ writer refuses a recipe that quantizes it. The default recipe keeps the last 2
# blocks, so real builds never meet this.
DEAD_IN_LAST_BLOCK = ("attn.to_add_out", "txt_mlp")


def recipe_for(blocks: int) -> dict:
    return {**RECIPE, "keep": [f"transformer_blocks.{blocks - 1}.{m}" for m in DEAD_IN_LAST_BLOCK]}
# stage -> (kind, precision of the weights it holds, what it needs first)
STAGES = {
    "make": ("make", "bf16", ()),
    "export_fp32": ("export", "fp32", ("make",)),
    "export_bf16": ("export", "bf16", ("make",)),
    "calibrate": ("calibrate", "fp32", ("make",)),
    "quantize_fp32": ("quantize", "fp32", ("export_fp32", "calibrate")),
    "quantize_bf16": ("quantize", "bf16", ("export_bf16", "calibrate")),
    "ort_engine": ("ort_engine", "fp32", ("export_fp32",)),
}
QUICK_STAGES = ("make", "export_fp32", "calibrate", "quantize_fp32")
# peak RSS limits of the issue "Scale-true build": factor x weights + 2 GB
LIMITS = {"export": (1.5, 2 * GB), "quantize": (2.0, 2 * GB)}
WIDTH = {"fp32": 4, "bf16": 2}


# ---------------------------------------------------------------------------------------------- child side
def _child(stage: str, args: dict, result_path: Path) -> int:
    """Run one stage in this (fresh) process; write its figures to result_path."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch  # noqa: F401 - imported before the baseline, as every stage imports it

    from qwen_image_trt.core.resources import PeakRSS, rss_anon_bytes, rss_bytes

    kind = STAGES[stage][0]
    fn = {"make": _run_make, "export": _run_export, "calibrate": _run_calibrate, "quantize": _run_quantize,
          "ort_engine": _run_ort_engine}[kind]
    from qwen_image_trt.core.errors import QitrtError

    out = {"stage": stage, "import_rss_bytes": rss_bytes(), "loadavg_before": list(os.getloadavg())}
    with PeakRSS() as mem, PeakRSS(sample=rss_anon_bytes) as anon:
        try:
            detail = fn(args)
        except QitrtError as e:
            # quantize's last step is its verdict on the written graph (ONNX Runtime vs ModelOpt's simulation):
            # a refusal there comes after all the work, so time and memory are the whole stage's. Recorded, with
            # the refusal; any other error fails the stage.
            if "Figures:" not in str(e):
                raise
            detail, out["verdict_refused"] = {}, str(e)
    out.update(seconds=round(mem.seconds, 3), peak_rss_bytes=mem.peak, peak_anon_bytes=anon.peak,
               loadavg_after=list(os.getloadavg()), detail=detail)
    result_path.write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _run_make(a: dict) -> dict:
    from qwen_image_trt.models import checkpoint as ckpt
    from qwen_image_trt.models.tiny import make_real_width_checkpoint

    root = make_real_width_checkpoint(a["checkpoint"], a["blocks"], seed=0, dtype="bf16", overwrite=True)
    parts = {p: ckpt.weights_info(root, p) for p in ("transformer", "text_encoder", "vae")}
    return {p: {"parameters": w.parameters, "bytes": w.bytes, "precision": w.precision} for p, w in parts.items()}


def _run_export(a: dict) -> dict:
    from qwen_image_trt.compile.export import export_onnx

    m = export_onnx(a["checkpoint"], a["out"], precision=a["precision"], progress=False)
    return {name: {"seconds": c.seconds, "peak_rss_bytes": c.peak_rss_bytes, "bytes": c.graph.bytes,
                   "check": c.check} for name, c in m.components.items()}


def _run_calibrate(a: dict) -> dict:
    from qwen_image_trt.calibration.capture import calibrate

    m = calibrate(a["checkpoint"], a["out"], device="cpu", progress=False, **CALIBRATION)
    return {"set_id": m.set_id, "totals": m.totals, "seconds": m.seconds}


def _run_quantize(a: dict) -> dict:
    from qwen_image_trt.compile.quantize import quantize_onnx
    from qwen_image_trt.core.shapes import parse_sizes

    m = quantize_onnx(a["checkpoint"], a["calibration"], a["out"], "int8", graphs=a["graphs"],
                      recipe=recipe_for(a["blocks"]),
                      sizes=parse_sizes(CALIBRATION["sizes"]), device="cpu", progress=False)
    t = m.components["transformer"]
    return {"seconds": t.seconds, "peak_rss_bytes": t.peak_rss_bytes, "bytes": t.graph.bytes, "check": t.check,
            "quantized_layers": len(m.quantization.quantized_layers), "kept_layers": len(m.quantization.kept_layers)}


def _run_ort_engine(a: dict) -> dict:
    from qwen_image_trt.compile.export import exported_file
    from qwen_image_trt.compile.ort_engine import build_ort_engine

    e = build_ort_engine(exported_file(a["graphs"], "transformer"), a["out"], "transformer", precision="fp32",
                         level="basic")
    return {"seconds": e.seconds, "bytes": e.bytes}


# --------------------------------------------------------------------------------------------- parent side
def disk_bytes(path: Path, seen: set | None = None) -> int:
    """Blocks actually allocated under `path` (sparse holes are free), each inode counted once."""
    seen = set() if seen is None else seen
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            st = os.lstat(os.path.join(root, f))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def run_stage(stage: str, args: dict, log_path: Path, label: str) -> dict:
    """Run `stage` in a child process; return the child's figures plus wall time and ru_maxrss from wait4."""
    from qwen_image_trt.core.resources import rss_bytes

    result_path = log_path.with_suffix(".result.json")
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", stage, "--child-args", json.dumps(args),
           "--child-result", str(result_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    tty = sys.stderr.isatty()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        seen_peak, last_line = 0, t0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            rss = rss_bytes(proc.pid)
            seen_peak = max(seen_peak, rss)
            now = time.perf_counter()
            if tty:
                print(f"\r  {label}: {now - t0:6.0f}s  RSS {rss / GB:5.2f} GB (peak so far {seen_peak / GB:5.2f})",
                      end="", file=sys.stderr, flush=True)
            elif now - last_line >= 30:
                print(f"  {label}: {now - t0:.0f}s, RSS {rss / GB:.2f} GB", file=sys.stderr, flush=True)
                last_line = now
            time.sleep(0.5)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if tty:
        print("\r" + " " * 100 + "\r", end="", file=sys.stderr)
    row = {"ok": proc.returncode == 0 and result_path.is_file(), "returncode": proc.returncode,
           "wall_s": round(wall, 3), "ru_maxrss_bytes": usage.ru_maxrss * 1024, "log": log_path.name}
    if row["ok"]:
        row.update(json.loads(result_path.read_text()))
    else:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        row["error"] = "\n".join(tail)
    return row


def _stage_args(stage: str, blocks: int, work: Path) -> tuple[dict, Path | None]:
    """(child arguments, output folder whose disk use is measured)."""
    ckpt = work / "checkpoint"
    outs = {"make": ckpt, "export_fp32": work / "onnx-fp32", "export_bf16": work / "onnx-bf16",
            "calibrate": work / "calibration", "quantize_fp32": work / "int8-from-fp32",
            "quantize_bf16": work / "int8-from-bf16", "ort_engine": work / "ort-fp32"}
    out = outs[stage]
    a = {"checkpoint": str(ckpt), "out": str(out), "blocks": blocks}
    kind, precision, _ = STAGES[stage]
    if kind == "export":
        a["precision"] = precision
    elif kind == "quantize":
        a.update(calibration=str(outs["calibrate"]), graphs=str(outs[f"export_{precision}"]))
    elif kind == "ort_engine":
        a["graphs"] = str(outs["export_fp32"])
    return a, out


def measure(blocks_list, stages, work_root: Path, keep_work: bool, on_row) -> list[dict]:
    runs = []
    total = len(blocks_list) * len(stages)
    k = 0
    for blocks in blocks_list:
        work = work_root / f"blocks-{blocks}"
        work.mkdir(parents=True, exist_ok=True)
        run = {"blocks": blocks, "stages": {}}
        runs.append(run)
        seen: set = set()
        for stage in stages:
            k += 1
            label = f"[{k}/{total}] {blocks} block{'s' * (blocks > 1)} {stage}"
            missing = [d for d in STAGES[stage][2] if d in stages and not run["stages"].get(d, {}).get("ok")]
            if missing:
                run["stages"][stage] = {"ok": False, "error": f"skipped: {', '.join(missing)} failed"}
                print(f"{label}: skipped ({', '.join(missing)} failed)", file=sys.stderr)
                continue
            args, out = _stage_args(stage, blocks, work)
            row = run_stage(stage, args, work / f"{stage}.log", label)
            if row["ok"] and out is not None:
                row["disk_bytes"] = disk_bytes(out, seen)
            if stage == "make" and row["ok"]:
                run["weights"] = row["detail"]
            run["stages"][stage] = row
            if row["ok"]:
                print(f"{label}: {row['seconds']:7.1f}s (wall {row['wall_s']:.1f}s)  peak RSS "
                      f"{row['peak_rss_bytes'] / GB:5.2f} GB (ru_maxrss {row['ru_maxrss_bytes'] / GB:5.2f})  disk "
                      f"{row.get('disk_bytes', 0) / GB:5.2f} GB  load {row['loadavg_after'][0]:.1f}", file=sys.stderr)
            else:
                print(f"{label}: FAILED (exit {row['returncode']}), log {work / row['log']}\n{row['error']}",
                      file=sys.stderr)
            on_row(runs)
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
    return runs


# ------------------------------------------------------------------------------------------ fit and report
def _quant_figures(row: dict) -> dict | None:
    """quantize's check figures: from the manifest detail, or parsed from a refusal message."""
    import ast

    check = (row.get("detail") or {}).get("check")
    if isinstance(check, dict) and "mismatch" in check:
        return check
    msg = row.get("verdict_refused") or ""
    if "Figures: " in msg:
        try:
            return ast.literal_eval(msg.split("Figures: ", 1)[1].strip())
        except (ValueError, SyntaxError):
            return None
    return None


def fit_line(xs, ys) -> dict | None:
    """Least squares y = a + b x; None with fewer than two distinct x."""
    import numpy as np

    pts = [(float(x), float(y)) for x, y in zip(xs, ys) if y is not None]
    if len({x for x, _ in pts}) < 2:
        return None
    x = np.array([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    A = np.stack([np.ones_like(x), x], axis=1)
    (a, b), *_ = np.linalg.lstsq(A, y, rcond=None)
    pred = a + b * x
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    return {"a": float(a), "b": float(b), "r2": r2, "points": len(pts),
            "max_residual": float(np.abs(y - pred).max())}


def stage_weights(run: dict, stage: str) -> int | None:
    """The bytes the stage's limit is measured against: the transformer's weights in the stage's precision."""
    w = run.get("weights")
    if not w:
        return None
    kind, precision, _ = STAGES[stage]
    if kind == "calibrate":  # the stock pipeline loads transformer and text encoder in fp32
        return (w["transformer"]["parameters"] + w["text_encoder"]["parameters"]) * 4
    return w["transformer"]["parameters"] * WIDTH[precision]


def analyse(runs: list[dict], real_blocks: int = REAL_BLOCKS) -> dict:
    """Fits over blocks, per-weight-byte coefficients, the real model's predictions and the limit verdicts."""
    params = [(r["blocks"], r["weights"]["transformer"]["parameters"]) for r in runs if r.get("weights")]
    te = next((r["weights"]["text_encoder"]["parameters"] for r in runs if r.get("weights")), 0)
    pfit = fit_line([b for b, _ in params], [p for _, p in params])
    out = {"real_blocks": real_blocks, "fits": {}, "coefficients": {}, "predictions": {}, "limits": {}}
    if pfit is None:
        return out
    per_block, fixed = pfit["b"], pfit["a"]
    real_params = fixed + per_block * real_blocks
    out["parameters"] = {"per_block": round(per_block), "outside_blocks": round(fixed),
                         "real_model": round(real_params)}
    stages = sorted({s for r in runs for s in r["stages"]}, key=list(STAGES).index)
    for stage in stages:
        kind, precision, _ = STAGES[stage]
        rows = [(r["blocks"], r["stages"][stage], stage_weights(r, stage)) for r in runs
                if r["stages"].get(stage, {}).get("ok")]
        if not rows:
            continue
        for _, row, _ in rows:  # the figure judged: the higher of the sampled peak and the kernel's high-water mark
            row["peak_bytes"] = max(row["peak_rss_bytes"], row.get("ru_maxrss_bytes") or 0)
        fits = {m: fit_line([b for b, _, _ in rows], [row.get(k) for _, row, _ in rows])
                for m, k in (("seconds", "seconds"), ("peak_bytes", "peak_bytes"), ("peak_rss_bytes", "peak_rss_bytes"),
                             ("peak_anon_bytes", "peak_anon_bytes"), ("ru_maxrss_bytes", "ru_maxrss_bytes"),
                             ("disk_bytes", "disk_bytes"))}
        out["fits"][stage] = fits
        # the same lines against the weights' bytes (affine in blocks): what plan.py scales to any checkpoint
        wfit = {m: fit_line([w for _, _, w in rows], [row.get(k) for _, row, _ in rows])
                for m, k in (("seconds", "seconds"), ("peak_rss_bytes", "peak_bytes"), ("peak_anon_bytes", "peak_anon_bytes"),
                             ("disk_bytes", "disk_bytes"))}
        out["coefficients"][stage] = {
            "kind": kind, "precision": precision,
            "x": ("transformer + text encoder parameters x 4 bytes (the pipeline loads both in fp32)"
                  if kind == "calibrate" else f"transformer parameters x {WIDTH[precision]} bytes ({precision})"),
            **{m: ({"fixed": f["a"], "per_weight_byte": f["b"]} if f else None) for m, f in wfit.items()}}
        real_w = (real_params + te) * 4 if kind == "calibrate" else real_params * WIDTH[precision]
        pred = {m: (f["a"] + f["b"] * real_blocks if f else None) for m, f in fits.items()}
        pred["weights_bytes"] = real_w
        pred["ratio_peak_over_weights"] = pred["peak_bytes"] / real_w if pred["peak_bytes"] else None
        out["predictions"][stage] = pred
        if kind in LIMITS:
            factor, extra = LIMITS[kind]
            verdicts = []
            for b, row, w in rows:
                limit = factor * w + extra
                verdicts.append({"blocks": b, "weights_bytes": w, "peak_bytes": row["peak_bytes"],
                                 "limit_bytes": limit, "ok": row["peak_bytes"] <= limit})
            limit = factor * real_w + extra
            out["limits"][stage] = {"rule": f"peak RSS <= {factor} x weights + {extra / GB:.0f} GB",
                                    "measured": verdicts, "real_limit_bytes": limit,
                                    "real_ok": pred["peak_bytes"] is not None and pred["peak_bytes"] <= limit}
    return out


def fit_file(result: dict) -> dict:
    """What `qwen_image_trt/compile/plan.py` reads: per stage kind and precision, fixed + per-weight-byte terms."""
    stages: dict = {}
    names = {"export_fp32": ("export", "fp32"), "export_bf16": ("export", "bf16"),
             "calibrate": ("calibrate", "fp32"), "quantize_fp32": ("quantize", "fp32"),
             "quantize_bf16": ("quantize", "bf16"), "ort_engine": ("ort_engine", "fp32")}
    for stage, c in result["analysis"]["coefficients"].items():
        if stage not in names:
            continue
        kind, precision = names[stage]
        stages.setdefault(kind, {})[precision] = {k: c[k] for k in ("x", "seconds", "peak_rss_bytes", "peak_anon_bytes",
                                                                    "disk_bytes")}
    m = result["machine"]
    return {"format": FIT_FORMAT, "source": "benchmarks/scale_build.py -> benchmarks/results/scale/scale_build.json",
            "measured": result["started"], "machine": {k: m.get(k) for k in ("cpu_count", "ram_bytes", "cpu")},
            "blocks": result["settings"]["blocks"], "calibration": result["settings"]["calibration"],
            "cpu_matmul_flops_per_s": m.get("cpu_matmul_flops_per_s"),
            "note": "peak_rss_bytes (max of sampled PeakRSS and ru_maxrss) / peak_anon_bytes (anonymous memory: "
                    "RSS without file-backed pages) / seconds / disk_bytes = fixed + per_weight_byte * x, least squares over "
                    "real-width checkpoints (x per stage); CPU seconds on this machine, with the calibration "
                    "settings above (tiny): plan.py adds the forwards of real calibration settings separately.",
            "stages": stages}


def _gb(v) -> str:
    return "-" if v is None else f"{v / GB:.2f}"


def _s(v) -> str:
    if v is None:
        return "-"
    return f"{v:.0f} s" if v < 600 else f"{v / 60:.1f} min"


def write_markdown(result: dict, path: Path) -> str:
    an = result["analysis"]
    lines = [(f"# Scale-true build: {', '.join(map(str, result['settings']['blocks']))} real-width blocks -> "
             f"{an['real_blocks']}"), "",
             (f"`{result['command']}`, {result['started']}, {result['machine'].get('cpu_count')} CPU cores, "
             f"{_gb(result['machine'].get('ram_bytes'))} GB RAM; torch {result['machine']['versions'].get('torch')}, "
             f"onnxruntime {result['machine']['versions'].get('onnxruntime')}, "
             f"nvidia-modelopt {result['machine']['versions'].get('nvidia-modelopt')}."), ""]
    p = an.get("parameters")
    if p:
        lines += [(f"Transformer parameters: {p['outside_blocks'] / 1e6:.1f} M outside the blocks + "
                  f"{p['per_block'] / 1e6:.1f} M per block -> {p['real_model'] / 1e9:.2f} B at {an['real_blocks']} "
                  f"blocks ({p['real_model'] * 2 / GB:.1f} GB bf16, {p['real_model'] * 4 / GB:.1f} GB fp32)."), ""]
    lines += ["## Measured", "",
              ("| blocks | stage | stage s | wall s | peak RSS GB (sampled) | ru_maxrss GB | peak anon GB | weights GB "
              "| peak / weights | limit GB | disk GB | load avg |"), "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    refused: list[str] = []
    for run in result["runs"]:
        for stage, row in run["stages"].items():
            if not row.get("ok"):
                lines.append(f"| {run['blocks']} | {stage} | failed | | | | | | | | | |")
                continue
            w = stage_weights(run, stage)
            kind = STAGES[stage][0]
            limit = LIMITS[kind][0] * w + LIMITS[kind][1] if kind in LIMITS and w else None
            if row.get("verdict_refused"):
                reason = row["verdict_refused"].split(": ", 1)[-1].split(": a Q/DQ")[0].split(". Figures")[0]
                refused.append(f"{run['blocks']} block(s) {stage}: {reason}")
            lines.append(f"| {run['blocks']} | {stage}{' (verdict refused*)' * bool(row.get('verdict_refused'))} | "
                         f"{row['seconds']:.1f} | {row['wall_s']:.1f} | "
                         f"{_gb(row['peak_rss_bytes'])} | {_gb(row['ru_maxrss_bytes'])} | "
                         f"{_gb(row.get('peak_anon_bytes'))} | {_gb(w)} | "
                         f"{row.get('peak_bytes', row['peak_rss_bytes']) / w:.2f} | {_gb(limit)} | "
                         f"{_gb(row.get('disk_bytes'))} | "
                         f"{row['loadavg_before'][0]:.1f} -> {row['loadavg_after'][0]:.1f} |")
    if refused:
        lines += ["", ("\\* The stage ran to its end (graph written, run in ONNX Runtime) and then refused its result; "
                  "its time and memory are the whole stage's and are in the fits:"), ""] + [f"- {r}" for r in refused]
    lines += ["", "## Fits (value = a + b x blocks) and the real model", "",
              ("| stage | time a / b (s) | peak a / b (GB) | disk a / b (GB) | r2 (time, peak) | "
              f"predicted time at {an['real_blocks']} | predicted peak GB | (anon GB) | weights GB | peak / weights | "
              "limit GB | within limit | predicted disk GB |"), "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for stage, fits in an["fits"].items():
        pred = an["predictions"][stage]
        lim = an["limits"].get(stage)
        t, r, d = fits["seconds"], fits["peak_bytes"], fits["disk_bytes"]
        if not t or not r:
            continue
        lines.append(
            f"| {stage} | {t['a']:.1f} / {t['b']:.1f} | {r['a'] / GB:.2f} / {r['b'] / GB:.3f} | "
            + (f"{d['a'] / GB:.2f} / {d['b'] / GB:.3f}" if d else "-")
            + f" | {t['r2']:.3f}, {r['r2']:.4f} | {_s(pred['seconds'])} | {_gb(pred['peak_bytes'])} | "
            f"{_gb(pred.get('peak_anon_bytes'))} | "
            f"{_gb(pred['weights_bytes'])} | {pred['ratio_peak_over_weights']:.2f} | "
            f"{_gb(lim['real_limit_bytes']) if lim else '-'} | "
            f"{('yes' if lim['real_ok'] else 'NO') if lim else '-'} | {_gb(pred['disk_bytes'])} |")
    lines += ["", "## Caveats", ""] + [f"- {c}" for c in result["caveats"]] + [""]
    text = "\n".join(lines)
    path.write_text(text)
    return text


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    an = result["analysis"]
    runs = result["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    colors = dict(zip(STAGES, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    bmax = max(r["blocks"] for r in runs)
    xs = np.linspace(0, bmax + 0.5, 50)
    xr = np.linspace(0, an["real_blocks"], 61)
    p = an.get("parameters") or {}
    for stage, fits in an["fits"].items():
        if stage == "make":  # measured and tabled, but no one builds a random 60-block checkpoint
            continue
        c = colors[stage]
        pts = [(r["blocks"], r["stages"][stage]) for r in runs if r["stages"].get(stage, {}).get("ok")]
        for ax, metric, scale in ((axes[0], "peak_bytes", GB), (axes[1], "seconds", 1)):
            ax.plot([b for b, _ in pts], [row[metric] / scale for _, row in pts], "o", color=c, label=stage)
            f = fits[metric]
            if f:
                ax.plot(xs, (f["a"] + f["b"] * xs) / scale, "-", color=c, alpha=0.6)
        f = fits["peak_bytes"]
        if f:
            axes[2].plot(xr, (f["a"] + f["b"] * xr) / GB, "-", color=c, label=stage)
    # limit lines (weights in the stage's precision)
    if p:
        for stage, style in (("export_fp32", ":"), ("export_bf16", ":"), ("quantize_fp32", "--"),
                             ("quantize_bf16", "--")):
            if stage not in an["fits"]:
                continue
            kind, precision, _ = STAGES[stage]
            factor, extra = LIMITS[kind]
            for ax, x in ((axes[0], xs), (axes[2], xr)):
                w = (p["outside_blocks"] + p["per_block"] * x) * WIDTH[precision]
                ax.plot(x, (factor * w + extra) / GB, style, color=colors[stage], alpha=0.9, linewidth=1,
                        label=f"limit {stage}: {factor} x W + 2 GB" if ax is axes[2] else None)
    axes[0].set(title="Peak RSS (measured, fit; dotted/dashed: limits)", xlabel="transformer blocks", ylabel="GB")
    axes[1].set(title="Stage time on this CPU (measured, fit)", xlabel="transformer blocks", ylabel="seconds")
    axes[2].set(title=f"Peak RSS extrapolated to {an['real_blocks']} blocks vs limits", xlabel="transformer blocks",
                ylabel="GB")
    axes[2].axvline(an["real_blocks"], color="gray", linewidth=0.8)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
    for ax, size in ((axes[0], 8), (axes[2], 7)):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=size, loc="upper left")
    fig.suptitle("Qwen-Image real-width build: " + ", ".join(map(str, result["settings"]["blocks"])) + " blocks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict:
    from qwen_image_trt.bench.devices import machine_info, measure_matmul_peak

    info = machine_info("cpu")
    info["cpu_matmul_flops_per_s"] = measure_matmul_peak("cpu", "fp32", n=1024, repeat=5)
    return info


def caveats(result: dict) -> list[str]:
    loads = [row[k][0] for run in result["runs"] for row in run["stages"].values() if row.get("ok")
             for k in ("loadavg_before", "loadavg_after")]
    cores = result["machine"].get("cpu_count") or 1
    out = [
        (f"Times are CPU times on a shared {cores}-core VM; other jobs (a concurrent test suite) ran at times: load "
        f"average {min(loads, default=0):.1f}-{max(loads, default=0):.1f} over the run ({cores} cores). Times can be "
        "2x off; peak RSS is the process's own and does not depend on load."),
        ("Peak RSS includes Python, torch, diffusers, ONNX Runtime and ModelOpt (the fit's intercept a); the slope b "
        "is what each block adds. The judged peak is the higher of the in-process sample (every 50 ms, can miss a "
        "short spike) and the child's ru_maxrss (the kernel's high-water mark, what /usr/bin/time reports)."),
        ("RSS counts file-backed pages too: a bf16 checkpoint's tensors are memory-mapped from its safetensors file, "
        "and ONNX Runtime maps external data. Those pages are clean and the kernel can drop them under pressure; the "
        "'anon' columns are the memory that must really exist (RssAnon)."),
        (f"Calibration ran {CALIBRATION['num_prompts']} prompts x {CALIBRATION['steps']} steps at "
        f"{CALIBRATION['sizes']} (every step recorded): its forwards are a small part of these times. A real set "
        "(32 prompts x 20 steps at 1024x1024) adds ~N x FLOPs of forwards, which `plan.py` estimates separately."),
        ("Quantization calibrates every block (recipe keep_first_blocks=0, keep_last_blocks=0) except the last "
        "block's text-output layers (attn.to_add_out, txt_mlp), which the exported graph drops as dead code; the "
        "real recipe keeps 4 of 60 blocks in high precision, so its quantized graph is ~4% larger than predicted."),
        ("bf16 graphs cannot run in ONNX Runtime's CPU provider: export_bf16 and quantize_bf16 skip the run check "
        "(recorded in their manifests), so their time lacks that part."),
        ("The pipeline (calibrate) loads transformer and text encoder in fp32; the real Qwen2.5-VL-7B text encoder "
        "adds 33 GB fp32 that this one-layer encoder does not have (plan.py adds it from the checkpoint's headers)."),
    ]
    gates = []
    for run in result["runs"]:
        for stage, row in run["stages"].items():
            figures = _quant_figures(row)
            if figures and "mismatch" in figures:
                gates.append(f"{stage} {run['blocks']} block(s) {figures['mismatch']:.3f}"
                             + (" (refused)" if row.get("verdict_refused") else "")
                             + f", block_rel_err {figures.get('block_rel_err', 0):.4f} vs the simulation's "
                             f"{figures.get('fake_quant_block_rel_err', 0):.4f}")
    if any(row.get("verdict_refused") for run in result["runs"] for row in run["stages"].values()):
        out.append("quantize's verdict on the written graph (end-to-end mismatch to ModelOpt's simulation, in units "
                   "of the quantization error; gate core/quant_evidence.py MISMATCH_MAX): " + "; ".join(gates) + ".")
    elif gates:
        out.append("end-to-end mismatch of the quantized graph to ModelOpt's simulation (units of the quantization "
                   "error; it grows with depth as ONNX Runtime and torch round quantizer inputs at bin edges "
                   "differently; the exact check is per layer, compile/qdq.py): " + "; ".join(gates) + ".")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", default=None, help="comma-separated block counts (default 1,2,4; --quick 1,2)")
    p.add_argument("--stages", default=None, help=f"comma-separated subset of {', '.join(STAGES)}")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/scale; --quick: "
                   "benchmarks/results/scale_quick)")
    p.add_argument("--fit-out", default=None, help="coefficients file plan.py reads (default "
                   "qwen_image_trt/compile/data/scale_fit.json; --quick: none)")
    p.add_argument("--work", default=None, help="scratch folder for checkpoints and graphs (default: a temp folder; "
                   "4 blocks need ~25 GB)")
    p.add_argument("--keep-work", action="store_true", help="keep checkpoints and graphs (default: delete each "
                   "block count's files once measured)")
    p.add_argument("--quick", action="store_true", help="1 and 2 blocks, fp32 stages only (~5 min)")
    p.add_argument("--from-json", default=None, help="re-analyse an earlier scale_build.json (report, plot, "
                   "coefficients) without measuring again")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-args", help=argparse.SUPPRESS)
    p.add_argument("--child-result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return _child(a.child, json.loads(a.child_args), Path(a.child_result))

    if a.from_json:
        result = json.loads(Path(a.from_json).read_text())
        out = Path(a.out or Path(a.from_json).parent)
        out.mkdir(parents=True, exist_ok=True)
        return report(result, result["runs"], out, Path(a.fit_out) if a.fit_out else None)

    blocks = [int(b) for b in (a.blocks or ("1,2" if a.quick else "1,2,4")).split(",")]
    stages = [s.strip() for s in a.stages.split(",")] if a.stages else list(QUICK_STAGES if a.quick else STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown or "make" not in stages or any(b < 1 or b > REAL_BLOCKS for b in blocks):
        p.error(f"--stages: a subset of {', '.join(STAGES)} including make; --blocks: integers in [1, {REAL_BLOCKS}]")
    out = Path(a.out or REPO / "benchmarks" / "results" / ("scale_quick" if a.quick else "scale"))
    fit_out = Path(a.fit_out) if a.fit_out else (None if a.quick else REPO / "qwen_image_trt" / "compile" / "data"
                                                 / "scale_fit.json")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="qitrt-scale-"))
    sys.path.insert(0, str(REPO))
    print(f"scale_build: blocks {blocks}, stages {', '.join(stages)}; scratch {work}; results {out}", file=sys.stderr)
    result = {"format": FORMAT, "command": "python benchmarks/scale_build.py " + " ".join(sys.argv[1:] if argv is None
                                                                                          else argv),
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "settings": {"blocks": blocks, "stages": stages, "calibration": CALIBRATION,
                           "recipe": {**RECIPE, "keep": [f"transformer_blocks.<last>.{m}" for m in DEAD_IN_LAST_BLOCK]},
                           "checkpoint": "make_real_width_checkpoint(dtype='bf16', seed=0)", "limits": {
                               k: f"{f} x weights + {e / GB:.0f} GB" for k, (f, e) in LIMITS.items()}},
              "runs": []}

    def save(runs) -> None:
        result["runs"] = runs
        result["analysis"] = analyse(runs)
        result["caveats"] = caveats(result)
        (out / "scale_build.json").write_text(json.dumps(result, indent=2) + "\n")
        write_markdown(result, out / "scale_build.md")

    try:
        runs = measure(blocks, stages, work, a.keep_work, save)
    except KeyboardInterrupt:
        print("interrupted: partial results written", file=sys.stderr)
        return 130
    finally:
        if not a.keep_work and not a.work:
            shutil.rmtree(work, ignore_errors=True)
    return report(result, runs, out, fit_out)


def report(result: dict, runs: list[dict], out: Path, fit_out: Path | None) -> int:
    """Analysis, JSON, markdown, plot and coefficients from measured runs; 1 if a stage failed."""
    result["runs"] = runs
    result["analysis"] = analyse(runs)
    result["caveats"] = caveats(result)
    (out / "scale_build.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, out / "scale_build.md")
    plot(result, out / "scale_build.png")
    if fit_out is not None and result["analysis"]["coefficients"]:
        fit_out.parent.mkdir(parents=True, exist_ok=True)
        fit_out.write_text(json.dumps(fit_file(result), indent=2) + "\n")
        print(f"coefficients: {fit_out}", file=sys.stderr)
    print((out / "scale_build.md").read_text())
    failed = [f"{r['blocks']}:{s}" for r in runs for s, row in r["stages"].items() if not row.get("ok")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
