"""`qitrt bench batching`: measure images/s against batch size per (backend, size bucket, CFG mode) and write the
batching limits `qitrt serve --batching-profile FILE` reads.

What is measured: every cell is `offline.measure_cell` (the offline benchmark's own timer: `warmup` untimed calls,
then the median of `repeat` timed pipeline calls of `batch` images), so a profile's figures and an offline row mean
the same thing. The loop is this module's own rather than `run_offline`'s because `run_offline` always adds eager
torch as a speedup baseline, which a profile for TensorRT does not need (and which, at batch 8 and 1024x1024 on a
GPU, costs minutes and memory). The engine folder, backends and sizes are checked by `offline.plan_variants`.

The two rules (`pick_max_batch`, `pick_queue_delay_ms`):

- `max_batch`: walk the measured batches upwards from 1 and keep the next one while its images/s is at least
  `min_gain` (default 1.05) x the images/s of the batch kept before it; stop at the first that gains less (or
  failed, e.g. out of memory). Batching costs latency: a full batch of b images takes longer than one image, and a
  worker busy with it cannot take a more urgent request. It is worth it while throughput still rises; once the
  device is saturated images/s is flat and a bigger batch only adds latency. 5% is above the spread of a median of
  a few repeats on a quiet GPU (1-3%) and below the gains batching gives while a device is not saturated (tens of
  %); a curve that dips below it and rises again is read as saturated (the conservative reading: noise can make a
  rise, and a smaller batch is the safe side). A table where batching never gains gives max_batch 1.
- `max_queue_delay_ms`: how long the oldest request may wait for company before its batch goes. It only costs
  anything when a worker is idle: while all workers compute, requests gather in the queue anyway and a batch goes
  as soon as a worker frees (its oldest request has waited longer than the delay). With a worker idle, waiting is a
  lone request's pure loss, so the delay is `delay_fraction` (default 0.1) x the measured batch-1 latency of the
  bucket, capped at `max_delay_ms` (default 100 ms): a lone request's latency grows by at most 10% of its own
  compute time and never by more than 100 ms. A bucket whose max_batch is 1 needs no delay (its batch is full at
  one image). The server's batcher has one delay for all groups, so each backend gets the smallest delay of its
  buckets that batch (the 10% bound then holds for every bucket); each bucket's own figure is recorded too.

The delay scales with the steps: measure with the steps the server runs (`--steps`, default 20 as the server).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qwen_image_trt.bench import devices
from qwen_image_trt.bench.report import _header, _plt, _spread
from qwen_image_trt.core.errors import InputError
from qwen_image_trt.core.files import write_atomic
from qwen_image_trt.core.identity import checkpoint_identity
from qwen_image_trt.core.manifest import read_manifest

log = logging.getLogger(__name__)

# The server's reader (serve/config.py) checks the same string: bench may not import serve (tests/test_layers.py).
PROFILE_FORMAT = "qwen-image-trt/batching-profile@1"
DEFAULT_MIN_GAIN = 1.05
DEFAULT_DELAY_FRACTION = 0.1
DEFAULT_MAX_DELAY_MS = 100.0
CFG_MODES = {"on": (True,), "off": (False,), "both": (True, False)}
MAX_BATCH = 1024  # the largest max_batch the server's reader accepts (serve/config.py: MAX_PROFILE_BATCH)
EAGER = "torch"  # as bench/offline.py's; offline (torch, diffusers) is imported when a run starts, not with the CLI


@dataclass
class BatchingConfig:
    checkpoint: str
    backends: list[str] = field(default_factory=lambda: ["torch"])
    engines: str | None = None
    sizes: list[tuple[int, int]] = field(default_factory=lambda: [(1024, 1024)])
    batches: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    steps: int = 20
    repeat: int = 3
    warmup: int = 1
    cfg: str = "on"  # on | off | both: the CFG modes measured (the server batches them apart)
    device: str = "cpu"
    torch_dtype: str = "fp32"
    prompt: str | None = None
    min_gain: float = DEFAULT_MIN_GAIN
    delay_fraction: float = DEFAULT_DELAY_FRACTION
    max_delay_ms: float = DEFAULT_MAX_DELAY_MS
    threads: int | None = None  # CPU: torch and ONNX Runtime threads, as the server's --threads-per-worker gives
    progress: bool = True

    def check(self) -> None:
        """Refuse what the rules cannot use, before any model loads."""
        if self.steps < 1 or self.repeat < 1 or self.warmup < 0:
            raise InputError("steps/repeat/warmup", (self.steps, self.repeat, self.warmup),
                             "steps >= 1, repeat >= 1, warmup >= 0")
        if self.cfg not in CFG_MODES:
            raise InputError("cfg", self.cfg, "one of on, off, both")
        if not self.batches or any(isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_BATCH
                                   for b in self.batches):
            raise InputError("batch", self.batches, f"integers in [1, {MAX_BATCH}], e.g. 1,2,4,8")
        if 1 not in self.batches or len(set(self.batches)) < 2:
            raise InputError("batch", self.batches, "at least two batch sizes including 1 (the rules compare "
                             "every batch with the one before it, and the delay comes from batch 1), e.g. 1,2,4,8")
        if not (isinstance(self.min_gain, (int, float)) and math.isfinite(self.min_gain) and self.min_gain >= 1.0):
            raise InputError("min_gain", self.min_gain, "a number >= 1.0 (1.05: a batch must add 5% images/s)")
        if not 0.0 <= self.delay_fraction <= 1.0:
            raise InputError("delay_fraction", self.delay_fraction, "a number in [0, 1] (of the batch-1 latency)")
        if not 0.0 <= self.max_delay_ms <= 60_000:
            raise InputError("max_delay_ms", self.max_delay_ms, "a number of milliseconds in [0, 60000]")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise InputError("threads", self.threads, "an integer >= 1 (CPU threads per process)")
        backends = [b.strip() for b in self.backends if b.strip()]
        if any(b != EAGER for b in backends) and not self.engines:
            engined = ", ".join(b for b in backends if b != EAGER)
            raise InputError("engines", None, f"an engine folder for backend(s) {engined} (`qitrt export` / "
                             "`qitrt build`); eager torch needs none")

    def offline(self, cfg_on: bool):
        from qwen_image_trt.bench.offline import DEFAULT_PROMPT, OfflineConfig

        return OfflineConfig(checkpoint=self.checkpoint, backends=list(self.backends),
                             engines=[self.engines] if self.engines else [], sizes=list(self.sizes),
                             batches=sorted(set(self.batches)), steps=self.steps, repeat=self.repeat,
                             warmup=self.warmup, cfg=cfg_on, device=self.device, torch_dtype=self.torch_dtype,
                             prompt=self.prompt or DEFAULT_PROMPT, progress=self.progress)


# ---- the rules (pure: tested on hand-made tables) ------------------------------------------------------------------
def pick_max_batch(images_per_s: dict[int, float | None], min_gain: float = DEFAULT_MIN_GAIN) -> tuple[int, list]:
    """(max_batch, steps) from {batch: images/s} (None: the cell failed). `steps` says, per batch after 1, the gain
    over the batch kept before it and whether it was kept: the reason for the limit, written into the profile."""
    if images_per_s.get(1) is None:
        raise InputError("batch", sorted(images_per_s), "a measured batch 1 (the baseline of the gain rule)")
    kept, steps = 1, []
    for b in sorted(x for x in images_per_s if x > 1):
        ips = images_per_s[b]
        gain = None if ips is None else ips / images_per_s[kept]
        ok = gain is not None and gain >= min_gain
        steps.append({"batch": b, "over": kept, "gain": None if gain is None else round(gain, 4), "kept": ok})
        if not ok:
            break
        kept = b
    return kept, steps


def pick_queue_delay_ms(latency_batch1_s: float, max_batch: int, fraction: float = DEFAULT_DELAY_FRACTION,
                        cap_ms: float = DEFAULT_MAX_DELAY_MS) -> float:
    """The time a lone request may wait for company: 0 where nothing can join it, else `fraction` of its own
    batch-1 latency, at most `cap_ms` (see the module's docstring for why)."""
    if max_batch <= 1:
        return 0.0
    return round(min(fraction * latency_batch1_s * 1e3, cap_ms), 3)


def limits_from_rows(rows: list[dict], errors: list[dict], cfg: BatchingConfig) -> dict:
    """{backend: {"label", "max_queue_delay_ms", "buckets": [...]}} from measured rows (failed cells in `errors`
    end a curve: a batch that does not run does not gain)."""
    out: dict[str, dict] = {}
    cells: dict[tuple, dict[int, dict | None]] = {}
    for r in rows:
        cells.setdefault((r["backend"], r["label"], r["width"], r["height"], r["cfg"]), {})[r["batch"]] = r
    for e in errors:
        if e.get("stage") == "run" and "size" in e:
            w, h = (int(x) for x in e["size"].split("x"))
            for key in [k for k in cells if k[1] == e["label"] and (k[2], k[3]) == (w, h) and k[4] == e.get("cfg")]:
                cells[key].setdefault(e["batch"], None)
    for (backend, label, w, h, cfg_on), by_batch in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][2] *
                                                                                               kv[0][3], not kv[0][4])):
        if by_batch.get(1) is None:
            continue  # no baseline: this bucket sets nothing (the server falls back to its default there)
        ips = {b: (r["images_per_s"] if r else None) for b, r in by_batch.items()}
        max_batch, steps = pick_max_batch(ips, cfg.min_gain)
        latency1 = by_batch[1]["latency_s"]
        entry = out.setdefault(backend, {"label": label, "buckets": []})
        entry["buckets"].append({
            "size": f"{w}x{h}", "width": w, "height": h, "cfg": cfg_on, "max_batch": max_batch,
            "max_queue_delay_ms": pick_queue_delay_ms(latency1, max_batch, cfg.delay_fraction, cfg.max_delay_ms),
            "latency_ms_batch1": round(latency1 * 1e3, 3),
            "images_per_s": {str(b): (round(v, 4) if v is not None else None) for b, v in sorted(ips.items())},
            "gains": steps})
    for entry in out.values():
        batching = [b["max_queue_delay_ms"] for b in entry["buckets"] if b["max_batch"] > 1]
        entry["max_queue_delay_ms"] = min(batching) if batching else 0.0
    return out


# ---- identities (the server checks the same ones: serve/config.py) --------------------------------------------------
def engines_identity(manifest) -> str:
    """A short hash of what an engine folder computes with: its precision, the checkpoint it was made from, and per
    component the graph and weight hashes and the ONNX Runtime / TensorRT engines built from them."""
    parts = {"precision": manifest.precision, "checkpoint": manifest.checkpoint.identity, "components": {
        name: [c.graph.sha256, c.graph.external_data_sha256, c.onnxruntime.sha256 if c.onnxruntime else None,
               c.tensorrt.cache_key if c.tensorrt else None] for name, c in sorted(manifest.components.items())}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _device_info(device: str) -> dict:
    info = devices.machine_info(device)
    info["device_kind"] = "cuda" if str(device).startswith("cuda") else "cpu"
    info["device_name"] = devices.device_name(device)
    return info


# ---- the run ---------------------------------------------------------------------------------------------------------
def run_batching(cfg: BatchingConfig, on_update=None) -> dict:
    """Measure the grid and compute the limits; `on_update(profile)` after every cell (partial writes). Returns the
    profile (what `qitrt serve --batching-profile` reads, with the raw table)."""
    from qwen_image_trt.bench.offline import plan_variants

    cfg.check()
    base = cfg.offline(True)
    variants, notes = plan_variants(base)
    asked = {b.strip() for b in cfg.backends if b.strip()}
    if EAGER not in asked:  # plan_variants adds eager torch as the offline speedup baseline: not needed here
        variants = [v for v in variants if v.backend != EAGER]
        notes = [n for n in notes if not n.startswith("eager torch added")]
    manifest = read_manifest(cfg.engines) if cfg.engines else None
    eng = None if manifest is None else {"path": str(Path(cfg.engines).resolve()),
                                         "identity": engines_identity(manifest), "precision": manifest.precision,
                                         "stage": manifest.stage, "target": manifest.target}
    peak, _ = devices.peak_for(cfg.device)
    profile = {
        "format": PROFILE_FORMAT, "kind": "batching", "complete": False,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": _device_info(cfg.device),
        "checkpoint": {"path": str(Path(cfg.checkpoint).resolve()), "identity": checkpoint_identity(cfg.checkpoint)},
        "engines": eng,
        "rule": {"min_gain": cfg.min_gain, "delay_fraction": cfg.delay_fraction, "max_delay_ms": cfg.max_delay_ms,
                 "max_batch": "largest batch whose images/s is >= min_gain x that of the batch kept before it, "
                              "walking up from 1 and stopping at the first that gains less",
                 "max_queue_delay_ms": "delay_fraction x batch-1 latency, at most max_delay_ms; 0 where max_batch is "
                                       "1; per backend the smallest over its buckets that batch"},
        "config": dict(asdict(cfg), sizes=[f"{w}x{h}" for w, h in cfg.sizes]),
        "backends": {}, "rows": [], "errors": [], "notes": notes + [
            "CPU: figures say how this machine batches, nothing about a GPU" if peak is None else ""],
    }
    profile["notes"] = [n for n in profile["notes"] if n]
    update = on_update or (lambda p: None)
    modes = CFG_MODES[cfg.cfg]
    cells = [(v, m, s, b) for v in variants for m in modes for s in cfg.sizes for b in sorted(set(cfg.batches))]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(cells), desc="bench batching", unit="cell", disable=not cfg.progress)
    import torch

    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        for v in variants:
            _measure_variant(cfg, v, [c for c in cells if c[0] is v], profile, bar, peak, update)
        profile["complete"] = True
    finally:
        torch.set_num_threads(threads)
        bar.close()
        profile["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        profile["backends"] = limits_from_rows(profile["rows"], profile["errors"], cfg)
        update(profile)
    return profile


def _load_pipe(cfg: BatchingConfig, v):
    """offline's loader; with `threads`, the pipeline a CPU server worker with --threads-per-worker runs (torch's
    threads are set by the caller)."""
    from qwen_image_trt.bench.offline import _load

    if not cfg.threads:
        return _load(cfg.offline(True), v)
    import torch

    from qwen_image_trt.runtime.pipeline import load_pipeline

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.torch_dtype] \
        if v.backend == EAGER else None
    return load_pipeline(cfg.checkpoint, engines=v.engines, backend=v.backend, device=cfg.device, dtype=dtype,
                         threads=cfg.threads)


def _measure_variant(cfg: BatchingConfig, v, cells: list, profile: dict, bar, peak, update) -> None:
    from qwen_image_trt.bench.offline import _progress_line, measure_cell

    try:
        pipe = _load_pipe(cfg, v)
    except Exception as e:  # noqa: BLE001 (a backend that cannot load is reported; the others still run)
        log.warning("bench batching: %s failed to load: %s", v.label, e)
        profile["errors"].append(dict(label=v.label, stage="load", error=f"{type(e).__name__}: {e}"))
        bar.update(len(cells))
        update(profile)
        return
    for _, cfg_on, (w, h), b in cells:
        bar.set_postfix_str(f"{v.label} {w}x{h} b{b} cfg {'on' if cfg_on else 'off'}")
        try:
            row = measure_cell(pipe, cfg.offline(cfg_on), v, w, h, b, peak)
            line = _progress_line(row)
            profile["rows"].append(row)
            bar.write(line + ("" if cfg_on else "  (no CFG)"))
        except Exception as e:  # noqa: BLE001 (out of memory at a large batch is a finding: the curve ends there)
            log.warning("bench batching: %s %dx%d batch %d failed: %s", v.label, w, h, b, e)
            profile["errors"].append(dict(label=v.label, size=f"{w}x{h}", batch=b, cfg=cfg_on, stage="run",
                                          error=f"{type(e).__name__}: {e}"))
        profile["backends"] = limits_from_rows(profile["rows"], profile["errors"], cfg)
        bar.update(1)
        update(profile)
    del pipe
    gc.collect()


# ---- output ----------------------------------------------------------------------------------------------------------
def write_profile(profile: dict, out_dir, tag: str = "batching", plots: bool = True) -> dict[str, Path]:
    """TAG.json (the profile), TAG.md (limits and raw table), TAG_throughput_vs_batch.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"profile": out / f"{tag}.json", "md": out / f"{tag}.md"}
    write_atomic(paths["profile"], json.dumps(profile, indent=2, default=str) + "\n")
    write_atomic(paths["md"], render_markdown(profile))
    if plots and profile.get("rows"):
        paths["throughput_vs_batch"] = plot_profile(profile, out / f"{tag}_throughput_vs_batch.png")
    return paths


def render_markdown(profile: dict) -> str:
    r = profile.get("rule", {})
    m = profile.get("machine", {})
    eng = profile.get("engines") or {}
    lines = _header(profile, "Batching profile")
    lines += [f"- device: {m.get('device_name')} ({m.get('device_kind')}); checkpoint identity "
              f"{profile.get('checkpoint', {}).get('identity')}; engines: "
              + (f"`{eng.get('path')}` identity {eng.get('identity')} ({eng.get('precision')})" if eng else "none"),
              f"- rule: max_batch = largest batch with images/s >= {r.get('min_gain')} x the batch kept before it "
              f"(walking up from 1); queue delay = {r.get('delay_fraction')} x batch-1 latency, at most "
              f"{r.get('max_delay_ms')} ms, 0 where max_batch is 1", "",
              "## Limits (what `qitrt serve --batching-profile` uses)", "",
              "| backend | size | CFG | batch-1 latency ms | images/s by batch | gain over the batch kept before | "
              "max_batch | queue delay ms |", "|---|---|---|---:|---|---|---:|---:|"]
    for entry in (profile.get("backends") or {}).values():
        for b in entry["buckets"]:
            ips = ", ".join(f"{k}: {v:.2f}" if v is not None else f"{k}: failed" for k, v in b["images_per_s"].items())
            gains = ", ".join(f"{g['over']}->{g['batch']}: " + (f"{g['gain']:.2f}x" if g["gain"] is not None
                                                                else "failed") + ("" if g["kept"] else " (stop)")
                              for g in b["gains"]) or "-"
            lines.append(f"| {entry['label']} | {b['size']} | {'on' if b['cfg'] else 'off'} | "
                         f"{b['latency_ms_batch1']:.1f} | {ips} | {gains} | **{b['max_batch']}** | "
                         f"{b['max_queue_delay_ms']:g} |")
    for backend, entry in (profile.get("backends") or {}).items():
        lines.append(f"\nServer queue delay for `--backend {backend}`: **{entry['max_queue_delay_ms']:g} ms** (the "
                     "smallest of its buckets that batch; the batcher has one delay).")
    lines += ["", "## Raw table", "", "| variant | size | CFG | batch | latency ms | spread ms (min-max) | img/s |",
              "|---|---|---|---:|---:|---:|---:|"]
    for row in profile.get("rows", []):
        lines.append(f"| {row['label']} | {row['size']} | {'on' if row['cfg'] else 'off'} | {row['batch']} | "
                     f"{row['latency_s'] * 1e3:.1f} | {_spread(row.get('latency_all_s'))} | "
                     f"{row['images_per_s']:.2f} |")
    errs = profile.get("errors") or []
    if errs:
        lines += ["", "## Errors (a failed cell ends its curve)", ""] + [
            "- " + ", ".join(f"{k}={v}" for k, v in e.items()) for e in errs]
    return "\n".join(lines) + "\n"


def plot_profile(profile: dict, path: Path) -> Path:
    """Images/s against batch, one panel per size; the chosen max_batch of each curve marked with a star."""
    from qwen_image_trt.bench.report import style_batch_axes

    plt = _plt()
    rows = [r for r in profile["rows"] if r.get("latency_s")]
    sizes = sorted({(r["width"], r["height"]) for r in rows}, key=lambda s: (s[0] * s[1], s))
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4.2), squeeze=False)
    chosen = {(e["label"], b["width"], b["height"], b["cfg"]): b["max_batch"]
              for e in (profile.get("backends") or {}).values() for b in e["buckets"]}
    for ax, (w, h) in zip(axes[0], sizes):
        mine = [r for r in rows if (r["width"], r["height"]) == (w, h)]
        for label, cfg_on in dict.fromkeys((r["label"], r["cfg"]) for r in mine):
            pts = sorted((r for r in mine if r["label"] == label and r["cfg"] == cfg_on), key=lambda r: r["batch"])
            xs, ys = [r["batch"] for r in pts], [r["images_per_s"] for r in pts]
            runs = [[r["batch"] / t for t in (r.get("latency_all_s") or [r["latency_s"]])] for r in pts]
            err = [[y - min(v) for y, v in zip(ys, runs)], [max(v) - y for y, v in zip(ys, runs)]]
            name = label + ("" if cfg_on else " (no CFG)")
            line = ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
            best = chosen.get((label, w, h, cfg_on))
            if best in xs:
                ax.plot([best], [ys[xs.index(best)]], marker="*", ms=16, color=line[0].get_color(), ls="none",
                        label=f"{name}: max_batch {best}")
        style_batch_axes(ax, sorted({r["batch"] for r in mine}), f"{w}x{h}, {profile['config']['steps']} steps")
    rule = profile.get("rule", {})
    fig.suptitle(f"Batching profile: star = max_batch (each kept batch gains >= {rule.get('min_gain')}x over the one "
                 "before; error bars: fastest and slowest repeat)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary_lines(profile: dict) -> list[str]:
    out = []
    for entry in (profile.get("backends") or {}).values():
        for b in entry["buckets"]:
            out.append(f"{entry['label']:20s} {b['size']:>9s} cfg {'on ' if b['cfg'] else 'off'}  max_batch "
                       f"{b['max_batch']:<3d} delay {b['max_queue_delay_ms']:g} ms  (batch-1 latency "
                       f"{b['latency_ms_batch1']:.1f} ms)")
        out.append(f"{entry['label']:20s} server queue delay {entry['max_queue_delay_ms']:g} ms")
    return out
