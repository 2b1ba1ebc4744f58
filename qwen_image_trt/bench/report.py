"""Results on disk: `<tag>.json` (everything, with machine, versions and command), `<tag>.md` (a summary table),
and PNG plots (matplotlib, Agg: no display needed). Written again after every measured row or phase, so a
partial run leaves a consistent set of files."""

from __future__ import annotations

import json
import math
from pathlib import Path

from qwen_image_trt.core.files import write_atomic

DEFAULT_OUT = Path("runs/bench")  # git-ignored; recorded results go to benchmarks/results with --record




def _run_spread(runs) -> str:
    values = [r["images_per_s"] for r in runs or [] if r.get("images_per_s") is not None]
    if len(values) < 2:
        return "n/a (1 run)"
    return f"{min(values):.2f}-{max(values):.2f}"


def _spread(values) -> str:
    """min-max of the repeats, so a reader sees whether the median is worth its digits."""
    if not values:
        return "n/a (no repeats)"
    if len(values) == 1:
        return "n/a (1 repeat)"
    return f"{min(values) * 1e3:.1f}-{max(values) * 1e3:.1f}"


def _f(v, scale=1.0, digits=1, pct=False) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, float) and math.isnan(v):
        return "-"
    if pct:
        return f"{v:.2%}"
    return f"{v * scale:.{digits}f}"


def write_result(result: dict, out_dir=DEFAULT_OUT, tag: str | None = None, plots: bool = True) -> dict[str, Path]:
    """Write JSON + markdown (+ PNGs); returns {kind: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = tag or result["kind"]
    paths = {"json": out / f"{tag}.json", "md": out / f"{tag}.md"}
    write_atomic(paths["json"], json.dumps(result, indent=2, default=str) + "\n")
    md = offline_markdown(result) if result["kind"] == "offline" else serve_markdown(result)
    write_atomic(paths["md"], md)
    if plots:
        plot = offline_plots if result["kind"] == "offline" else serve_plots
        paths.update(plot(result, out, tag))
    return paths


def _header(result: dict, title: str) -> list[str]:
    m = result.get("machine", {})
    v = m.get("versions", {})
    gpu = m.get("gpu", {}).get("name") if m.get("gpu") else None
    lines = [f"# {title}", "",
             f"- command: `{result.get('command', '?')}`",
             f"- started {result.get('started')}, finished {result.get('finished', '(running)')}, "
             f"complete: {result.get('complete')}",
             f"- machine: {m.get('hostname')} ({m.get('platform')}), {m.get('cpu_count')} CPUs"
             + (f", GPU {gpu}" if gpu else ", no GPU"),
             f"- peak: {m.get('peak_note')}",
             "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items())]
    for n in result.get("notes", []):
        lines.append(f"- note: {n}")
    return lines + [""]


def offline_markdown(result: dict) -> str:
    c = result.get("config", {})
    lines = _header(result, "Offline benchmark")
    lines += [f"{c.get('steps')} steps, CFG {'on (one batched forward per step)' if c.get('cfg') else 'off'}, "
              f"warm-up {c.get('warmup')} call(s) excluded, medians of {c.get('repeat')} repeats. "
              "Latency is one pipeline call of `batch` images; step = one transformer forward; "
              "GFLOP and % of peak are for that forward (FLOP model in qwen_image_trt/models/flops.py); "
              "floor = roofline lower bound max(FLOP/peak, bytes/bandwidth).", "",
              "| variant | size | batch | latency ms | spread ms (min-max) | img/s | text enc ms | step ms | floor ms | "
              "VAE ms | peak mem MB | GFLOP/step | GFLOP/s | % of peak | speedup | step speedup |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result.get("rows", []):
        lines.append("| " + " | ".join([
            r["label"], r["size"], str(r["batch"]), _f(r.get("latency_s"), 1e3), _spread(r.get("latency_all_s")),
            _f(r.get("images_per_s"), 1, 2),
            _f(r.get("text_encoder_s"), 1e3), _f(r.get("transformer_step_s"), 1e3, 2),
            _f(r.get("floor_step_s"), 1e3, 2) if r.get("floor_step_s") is not None else "n/a",
            _f(r.get("vae_decode_s"), 1e3), _f(r.get("peak_memory_bytes"), 1e-6, 0),
            _f(r.get("flops_per_step"), 1e-9, 3), _f(r.get("transformer_flops_per_s"), 1e-9, 2),
            _f(r.get("roofline_fraction"), pct=True), _f(r.get("speedup_vs_eager"), 1, 2) + "x",
            _f(r.get("step_speedup_vs_eager"), 1, 2) + "x"]) + " |")
    lines += _errors(result)
    return "\n".join(lines) + "\n"


def serve_markdown(result: dict) -> str:
    c = result.get("config", {})
    lines = _header(result, "Serving benchmark")
    srv = result.get("server") or {}
    lines += [f"Server: {c.get('url')}" + (f" (started by the benchmark: `qitrt {' '.join(srv['command'][3:])}`)"
                                           if srv.get("command") else ""),
              f"Requests: size {c.get('size')}, n {c.get('n')}, steps {c.get('steps') or 'server default'}, "
              f"CFG {'on' if c.get('cfg') else 'off'}; phases of {c.get('duration_s')} s"
              + (f" or {c['requests']} requests" if c.get("requests") else "") + ".", "",
              "Ceiling: workers x median(images per batch / batch compute time), the images/s the server would "
              "reach with every worker busy at the batch sizes it achieved (compute-bound limit).", "",
              f"Each phase ran {c.get('repeat', 1)} time(s); the row is the run with the median img/s, the spread is "
              "the min-max of all runs.", "",
              "| phase | ok | failed | req/s | img/s | img/s spread | ceiling img/s | of ceiling | p50 s | p90 s | p99 s | "
              "queue p50 s | queue p99 s | compute p50 s | mean batch (calls) | batch sizes by request | errors |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for p in result.get("phases", []):
        lat, q, comp = p["latency_s"], p["queue_s"], p["compute_s"]
        calls = p.get("batch_images_by_call") or {}
        lines.append("| " + " | ".join([
            p["phase"], str(p["ok"]), str(p["failed"]), _f(p["requests_per_s"], 1, 2), _f(p["images_per_s"], 1, 2),
            _run_spread(p.get("runs")), _f(p.get("ceiling_images_per_s"), 1, 2),
            f"{p['fraction_of_ceiling']:.0%}" if p.get("fraction_of_ceiling") else "-",
            _f(lat["p50"], 1, 3), _f(lat["p90"], 1, 3), _f(lat["p99"], 1, 3), _f(q["p50"], 1, 3), _f(q["p99"], 1, 3),
            _f(comp["p50"], 1, 3), _f(calls.get("mean"), 1, 2),
            ", ".join(f"{k}: {v}" for k, v in sorted(p["batch_images_by_request"].items(), key=lambda kv: int(kv[0])))
            or "-", ", ".join(f"{k}: {v}" for k, v in p["errors"].items()) or "-"]) + " |")
    lines += _errors(result)
    return "\n".join(lines) + "\n"


def _errors(result: dict) -> list[str]:
    errs = result.get("errors") or []
    if not errs:
        return []
    return ["", "## Errors (the rows above are what was measured)", ""] + [
        "- " + ", ".join(f"{k}={v}" for k, v in e.items()) for e in errs]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def offline_plots(result: dict, out: Path, tag: str) -> dict[str, Path]:
    rows = [r for r in result.get("rows", []) if r.get("latency_s")]
    if not rows:
        return {}
    plt = _plt()
    paths = {}
    sizes = sorted({r["size"] for r in rows}, key=lambda s: [int(x) for x in s.split("x")])
    labels = list(dict.fromkeys(r["label"] for r in rows))

    # Top row: what a user buys, images per second against batch, with the spread of the repeats (each run's
    # batch / latency) and the physical ceiling where the device's peak is known. Bottom row: where one call's time
    # goes at the largest batch measured, per variant.
    parts = (("text_encoder_s", "text encoder"), ("transformer_total_s", "transformer"), ("vae_decode_s", "VAE decode"),
             ("other_s", "other"))
    fig, axes = plt.subplots(2, len(sizes), figsize=(5.5 * len(sizes), 7.5), squeeze=False)
    for col, size in enumerate(sizes):
        ax, parts_ax = axes[0][col], axes[1][col]
        batches = sorted({r["batch"] for r in rows if r["size"] == size})
        for label in labels:
            pts = sorted((r for r in rows if r["size"] == size and r["label"] == label), key=lambda r: r["batch"])
            if not pts:
                continue
            xs = [r["batch"] for r in pts]
            ys = [r["batch"] / r["latency_s"] for r in pts]
            runs = [[r["batch"] / t for t in (r.get("latency_all_s") or [r["latency_s"]])] for r in pts]
            err = [[y - min(v) for y, v in zip(ys, runs)], [max(v) - y for y, v in zip(ys, runs)]]
            line = ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
            ceiling = [r["batch"] / (r["floor_step_s"] * r["steps"]) for r in pts if r.get("floor_step_s")]
            if len(ceiling) == len(pts):
                ax.plot(xs, ceiling, ls=":", color=line[0].get_color(), label=f"{label} ceiling (peak FLOP/s)")
        style_batch_axes(ax, batches, f"{size}, {rows[0]['steps']} steps")

        biggest = max(batches)
        cell = [next((r for r in rows if r["size"] == size and r["label"] == lb and r["batch"] == biggest), None)
                for lb in labels]
        present = [(lb, r) for lb, r in zip(labels, cell) if r is not None]
        left = [0.0] * len(present)
        for key, name in parts:
            vals = [r.get(key) or 0.0 for _, r in present]
            parts_ax.barh(range(len(present)), vals, left=left, label=name)
            left = [a + b for a, b in zip(left, vals)]
        parts_ax.set_yticks(range(len(present)), [lb for lb, _ in present], fontsize=8)
        parts_ax.invert_yaxis()
        parts_ax.set(title=f"where one call's time goes (batch {biggest})", xlabel="seconds per call")
        parts_ax.grid(alpha=0.3, axis="x")
        parts_ax.legend(fontsize=8, ncols=len(parts), loc="upper center", bbox_to_anchor=(0.5, -0.2))
    ceiling = ("dotted: the ceiling at the device's peak FLOP/s" if any(r.get("floor_step_s") for r in rows)
               else "no ceiling drawn: no peak FLOP/s known for this device")
    fig.suptitle(f"Throughput against batch (error bars: fastest and slowest repeat; {ceiling})", fontsize=10)
    fig.tight_layout()
    paths["throughput_vs_batch"] = out / f"{tag}_throughput_vs_batch.png"
    fig.savefig(paths["throughput_vs_batch"], dpi=100)
    plt.close(fig)

    others = [lb for lb in labels if any(r.get("speedup_vs_eager") for r in rows if r["label"] == lb)]
    cells = list(dict.fromkeys((r["size"], r["batch"]) for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(others))
    for ax, key, title in ((axes[0], "speedup_vs_eager", "whole image"),
                           (axes[1], "step_speedup_vs_eager", "transformer step")):
        for k, label in enumerate(others):
            vals = [next((r.get(key) or 0 for r in rows if r["label"] == label and (r["size"], r["batch"]) == c), 0)
                    for c in cells]
            ax.bar([i + k * width for i in range(len(cells))], vals, width, label=label)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([i + width * (len(others) - 1) / 2 for i in range(len(cells))])
        ax.set_xticklabels([f"{s}\nb{b}" for s, b in cells], fontsize=8)
        ax.set(title=f"speedup vs eager torch: {title}", ylabel="x (higher is faster)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths["speedup"] = out / f"{tag}_speedup.png"
    fig.savefig(paths["speedup"], dpi=100)
    plt.close(fig)
    return paths


def serve_plots(result: dict, out: Path, tag: str) -> dict[str, Path]:
    plt = _plt()
    paths = {}
    for mode, xlabel, name in (("closed", "concurrency (clients)", "throughput_vs_concurrency"),
                               ("open", "offered rate (requests/s)", "throughput_vs_rate")):
        ps = sorted((p for p in result.get("phases", []) if p["mode"] == mode), key=lambda p: p["level"])
        if not ps:
            continue
        xs = [p["level"] for p in ps]
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        a.plot(xs, [p["images_per_s"] or 0 for p in ps], marker="o", label="images/s")
        a.plot(xs, [p["requests_per_s"] or 0 for p in ps], marker="s", label="requests/s")
        a.set(xlabel=xlabel, ylabel="per second", title="throughput")
        for q in ("p50", "p90", "p99"):
            b.plot(xs, [p["latency_s"][q] or float("nan") for p in ps], marker="o", label=f"latency {q}")
        b.plot(xs, [p["queue_s"]["p50"] or float("nan") for p in ps], marker="x", ls="--", label="queue p50")
        b.set(xlabel=xlabel, ylabel="seconds", title="latency")
        for ax in (a, b):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            ax.set_ylim(bottom=0)  # from zero: a small change must look small
            if mode == "closed" and len(xs) > 1:
                ax.set_xscale("log", base=2)
                ax.set_xticks(xs, [f"{x:g}" for x in xs])  # the levels measured, not powers of two
        fig.tight_layout()
        paths[name] = out / f"{tag}_{name}.png"
        fig.savefig(paths[name], dpi=100)
        plt.close(fig)
    return paths


def style_batch_axes(ax, batches, title: str) -> None:
    """The images/s-against-batch axes every batching plot shares: log2 batches, zero-based rate, legend."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_ylim(bottom=0)
    ax.set(title=title, xlabel="batch (images per call)", ylabel="images / s (higher is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
