"""The human half of a parity report: one self-contained HTML page next to report.json and the PNGs."""

from __future__ import annotations

import html
from pathlib import Path

from qwen_image_trt.parity.metrics import PSNR_CAP_DB


# Why a cell can be empty: a person reading the table should not have to guess.
NOT_APPLICABLE = {"text_len": "no text input", "grid": "no image-token grid", "batch": "not batched",
                  "height": "no image size", "width": "no image size"}


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c), _reason(r, c))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _reason(row: dict, column: str) -> str:
    what = row.get("component") or row.get("name") or "this row"
    return f"{NOT_APPLICABLE.get(column, 'not measured')} for {what}"


def _fmt(v, reason: str = "not measured") -> str:
    if v is None:
        return f"<span class=na>n/a ({html.escape(reason)})</span>"
    if isinstance(v, float):
        return f"{v:.6g}"
    return html.escape(str(v))


def psnr_text(db: float) -> str:
    """'identical' rather than the finite stand-in report.json keeps for an infinite PSNR."""
    return "identical (PSNR infinite)" if db >= PSNR_CAP_DB else f"PSNR {db:.2f} dB"


def write_html(data: dict, out: Path) -> Path:
    verdict = "PASS" if data["passed"] else "FAIL"
    gates = _table([{**g, "ok": "ok" if g["ok"] else "FAIL"} for g in data["gates"]],
                   ["name", "value", "kind", "limit", "ok"])
    fwd_cols = ["component", "batch", "grid", "text_len", "height", "width", "max_abs", "rel_l2", "cosine"]
    forward = _table(data["forward"], fwd_cols)
    steps = _table(data["per_step"], ["prompt", "step", "cosine", "rel_l2", "max_abs"])
    images = ""
    for r in data["images"]:
        f = r["files"]
        extra = "".join(f", {label}" for label, on in (
            (f"{len(r.get('input_images') or [])} condition image(s)", r.get("input_images")),
            (f"prefix KV cache {'on' if r.get('kv_cache') else 'off'}", "kv_cache" in r)) if on)
        images += (f"<h3>{html.escape(r['prompt'])} <small>(negative: {html.escape(str(r['negative_prompt']))}, "
                   f"seed {r['seed']}, {r['size'][0]}x{r['size'][1]}{extra})</small></h3>"
                   f"<p>{psnr_text(r['psnr_db'])}, SSIM {r['ssim']:.4f}, max |diff| {r['max_abs_levels']} levels</p>"
                   "<div class=row>"
                   + "".join(f"<figure><img src='{f[k]}'><figcaption>{cap}</figcaption></figure>"
                             for k, cap in (("eager", f"eager torch {data['reference_dtype']}"),
                                            ("engine", f"{data['backend']} {data['precision']}"),
                                            ("diff", "|difference| x8")))
                   + "</div>")
    cache = ""
    if data.get("step_cache"):
        cache = ("<h2>Step cache: steps skipped against image quality (engine with the cache vs eager uncached; "
                 "speedup against the uncached engine, first runs included)</h2>"
                 + _table(data["step_cache"], ["prompt", "threshold", "computed", "skipped", "skip_ratio", "psnr_db",
                                               "ssim", "seconds", "uncached_seconds", "speedup"]))
    page = f"""<!doctype html><meta charset=utf-8><title>qitrt parity {verdict}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:2px 8px;font-size:13px}}.row{{display:flex;gap:1em}}
img{{width:256px;image-rendering:pixelated;border:1px solid #999}}.PASS{{color:green}}.FAIL{{color:#b00}}.na{{color:#888}}</style>
<h1>Parity: {html.escape(data['backend'])} {html.escape(data['precision'])}
 vs eager torch {data['reference_dtype']}
 <span class={verdict}>{verdict}</span></h1>
<p>checkpoint {html.escape(data['checkpoint'])} ({data['checkpoint_identity']}), engines {html.escape(data['engines'])},
 seed {data['seed']}, {data['steps']} steps, {data['seconds']} s</p>
<h2>Gates</h2>{gates}<h2>Images</h2>{images}{cache}
<h2>Per denoising step (latent after each step)</h2>{steps}<h2>Per forward</h2>{forward}
"""
    path = out / "report.html"
    path.write_text(page)
    return path
