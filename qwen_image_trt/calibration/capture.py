"""`qitrt calibrate`: run the real pipeline over shipped prompts and record the transformer's inputs.

The pipeline runs as served: true CFG on (negative prompt " ", scale 4), both branches batched into one
transformer call per step. A forward pre-hook on the stock transformer records, per call, what the
exported graph takes (hidden_states, encoder_hidden_states, its mask, timestep) plus the image grid, so
RoPE tables can be rebuilt at replay. One safetensors shard per prompt, a manifest with prompt ids,
seeds, sizes, steps and shapes, and a content id (`set_id`) that quantized engines record.

A set is made once per checkpoint and reused by every precision; a re-run with the same settings skips
prompts whose shard is already there and intact (an interrupted run resumes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen_image_trt.calibration.prompts import prompt_seed, prompt_set_sha256, select_prompts
from qwen_image_trt.errors import InputError, QitrtError

log = logging.getLogger(__name__)

CALIBRATION_FORMAT = "qwen-image-trt/calibration@1"
MANIFEST = "manifest.json"
NEGATIVE_PROMPT = " "  # any negative prompt turns true CFG on; " " is what the reference pipeline serves
TRUE_CFG_SCALE = 4.0
MIN_CALLS_PER_SIZE = 4  # fewer recorded forwards than this at a size cannot calibrate it
KEYS = ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep")


@dataclass(frozen=True)
class CalibrationSettings:
    num_prompts: int
    steps: int
    sizes: tuple[tuple[int, int], ...]
    seed: int = 0
    holdout: int = 1
    record_every: int = 1

    def as_dict(self) -> dict:
        return {"num_prompts": self.num_prompts, "steps": self.steps, "sizes": [list(s) for s in self.sizes],
                "seed": self.seed, "holdout": self.holdout, "record_every": self.record_every,
                "negative_prompt": NEGATIVE_PROMPT, "true_cfg_scale": TRUE_CFG_SCALE}


# Real checkpoints: NVIDIA's recipes use 32-64 prompts x 20-30 steps at serving sizes.
REAL_DEFAULTS = dict(num_prompts=32, steps=20, sizes=((1024, 1024),), record_every=2)
TINY_DEFAULTS = dict(num_prompts=8, steps=4, sizes=((64, 64),), record_every=1)


def is_tiny(checkpoint) -> bool:
    return (Path(checkpoint) / "TINY_RANDOM_WEIGHTS.txt").is_file()


def default_settings(checkpoint) -> dict:
    return dict(TINY_DEFAULTS if is_tiny(checkpoint) else REAL_DEFAULTS)


def make_settings(checkpoint, num_prompts=None, steps=None, sizes=None, seed: int = 0, holdout=None,
                  record_every=None) -> CalibrationSettings:
    """Fill in defaults and check every value before any model is loaded."""
    from qwen_image_trt.build.profiles import parse_sizes
    from qwen_image_trt.runtime.limits import MAX_STEPS, min_steps

    d = default_settings(checkpoint)
    num_prompts = d["num_prompts"] if num_prompts is None else num_prompts
    steps = d["steps"] if steps is None else steps
    sizes = tuple(d["sizes"]) if sizes is None else tuple(parse_sizes(sizes))
    lowest = min_steps(checkpoint)  # 2 with Qwen-Image's shift_terminal: a 1-step schedule is NaN
    if isinstance(steps, bool) or not isinstance(steps, int) or not lowest <= steps <= MAX_STEPS:
        raise InputError("steps", steps, f"an integer in [{lowest}, {MAX_STEPS}]")
    record_every = min(d["record_every"], steps) if record_every is None else record_every
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError("seed", seed, "a non-negative integer")
    if isinstance(record_every, bool) or not isinstance(record_every, int) or not 1 <= record_every <= steps:
        raise InputError("record_every", record_every, f"an integer in [1, steps={steps}]")
    select_prompts(num_prompts, seed)  # range check of num_prompts
    if holdout is None:
        holdout = max(1, num_prompts // 8) if num_prompts >= 4 else 0
    if isinstance(holdout, bool) or not isinstance(holdout, int) or not 0 <= holdout < num_prompts:
        raise InputError("holdout", holdout, f"an integer in [0, num_prompts={num_prompts})")
    if num_prompts - holdout < len(sizes):
        raise InputError("num_prompts", num_prompts, f"at least {len(sizes) + holdout} for {len(sizes)} size(s) "
                         f"and {holdout} held-out prompt(s): every size needs its own calibration prompts")
    calls = math.ceil(steps / record_every)
    per_size = (num_prompts - holdout) // len(sizes) * calls
    if per_size < MIN_CALLS_PER_SIZE:
        raise InputError("num_prompts/steps", (num_prompts, steps),
                         f"enough to record >= {MIN_CALLS_PER_SIZE} forwards per size (got {per_size} per size "
                         f"for {len(sizes)} size(s)); raise --num-prompts or --steps")
    return CalibrationSettings(num_prompts, steps, sizes, seed, holdout, record_every)


class _Recorder:
    """Forward pre-hook: copies the inputs of every transformer call made while `active`."""

    def __init__(self):
        self.calls: list[dict] = []
        self.step = 0
        self.record_every = 1

    def __call__(self, module, args, kwargs):
        step, self.step = self.step, self.step + 1
        if step % self.record_every:
            return None
        hs = kwargs.get("hidden_states", args[0] if args else None)
        ehs = kwargs["encoder_hidden_states"]
        mask = kwargs.get("encoder_hidden_states_mask")
        if mask is None:
            mask = torch.ones(ehs.shape[:2], dtype=torch.bool, device=ehs.device)
        img_shapes = kwargs["img_shapes"]
        grid = tuple(int(v) for v in img_shapes[0][0])
        self.calls.append({
            "step": step, "grid": grid,
            "hidden_states": hs.detach().to("cpu", copy=True).contiguous(),
            "encoder_hidden_states": ehs.detach().to("cpu", copy=True).contiguous(),
            "encoder_hidden_states_mask": mask.detach().to("cpu").bool().clone(),
            "timestep": kwargs["timestep"].detach().to("cpu", copy=True).reshape(-1).contiguous(),
        })
        return None


def calibrate(checkpoint, out_dir, *, num_prompts=None, steps=None, sizes=None, seed: int = 0, holdout=None,
              record_every=None, device: str = "cpu", force: bool = False, progress: bool = True,
              pipe=None) -> dict:
    """Record a calibration set for `checkpoint` into `out_dir`; return its manifest."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from qwen_image_trt.build.manifest import file_sha256, tool_versions
    from qwen_image_trt.models import checkpoint as ckpt

    root = ckpt.validate_checkpoint(checkpoint)
    settings = make_settings(root, num_prompts, steps, sizes, seed, holdout, record_every)
    identity = ckpt.checkpoint_identity(root)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = select_prompts(settings.num_prompts, settings.seed)
    n_calib = settings.num_prompts - settings.holdout
    source = {"checkpoint": identity, "settings": settings.as_dict(), "prompt_set": prompt_set_sha256()[:16]}

    old = _read(out)
    done: dict[str, dict] = {}
    if old and not force and old.get("source") == source:
        for s in old.get("samples", []):
            f = out / s["file"]
            if f.is_file() and file_sha256(f) == s["sha256"]:
                done[s["prompt_id"]] = s
    elif old:
        log.warning("calibrate: %s held a set with other settings or checkpoint; replacing it", out)

    manifest = {
        "format": CALIBRATION_FORMAT, "stage": "calibrate",
        "checkpoint": {"path": str(root.resolve()), "identity": identity},
        "source": source, "versions": tool_versions(), "samples": [],
    }
    t0 = time.perf_counter()
    hook = None
    recorder = _Recorder()
    recorder.record_every = settings.record_every
    bar = tqdm(total=len(prompts), desc="calibrate", unit="prompt", disable=not progress)
    try:
        for i, p in enumerate(prompts):
            w, h = settings.sizes[i % len(settings.sizes)] if i < n_calib else \
                settings.sizes[(i - n_calib) % len(settings.sizes)]
            entry = {"index": i, "prompt_id": p["id"], "lang": p["lang"], "category": p["category"],
                     "seed": prompt_seed(settings.seed, i), "size": [w, h],
                     "split": "calib" if i < n_calib else "holdout", "file": f"prompt_{i:04d}_{p['id']}.safetensors"}
            if p["id"] in done and done[p["id"]]["file"] == entry["file"]:
                manifest["samples"].append(done[p["id"]])
                bar.update()
                continue
            if pipe is None:
                from qwen_image_trt.runtime.pipeline import load_pipeline

                pipe = load_pipeline(root, backend="torch", device=device)
            if hook is None:
                hook = pipe.transformer.register_forward_pre_hook(recorder, with_kwargs=True)
            recorder.calls, recorder.step = [], 0
            gen = torch.Generator("cpu").manual_seed(entry["seed"])
            pipe(prompt=p["text"], negative_prompt=NEGATIVE_PROMPT, true_cfg_scale=TRUE_CFG_SCALE, height=h,
                 width=w, num_inference_steps=settings.steps, generator=gen, output_type="latent")
            tensors, calls = {}, []
            for k, c in enumerate(recorder.calls):
                for key in KEYS:
                    tensors[f"{k:03d}.{key}"] = c[key]
                calls.append({"key": f"{k:03d}", "step": c["step"], "grid": list(c["grid"]),
                              "batch": int(c["hidden_states"].shape[0]),
                              "text_len": int(c["encoder_hidden_states"].shape[1])})
            path = out / entry["file"]
            # One metadata key: safetensors writes a multi-key metadata map in hash order, which would make
            # the file's bytes (and the set id) differ between identical runs.
            save_file(tensors, str(path), metadata={"qitrt": json.dumps({"format": CALIBRATION_FORMAT,
                                                                         "prompt_id": p["id"]})})
            entry.update(sha256=file_sha256(path), bytes=path.stat().st_size, calls=calls)
            manifest["samples"].append(entry)
            _write(out, manifest)  # after every prompt: an interrupted run resumes here
            bar.set_postfix(size=f"{w}x{h}", calls=len(calls))
            bar.update()
    finally:
        bar.close()
        if hook is not None:
            hook.remove()
    manifest["set_id"] = _set_id(manifest)
    manifest["seconds"] = round(time.perf_counter() - t0, 3)
    manifest["totals"] = {"prompts": len(prompts), "calib_calls": sum(len(s["calls"]) for s in manifest["samples"]
                                                                     if s["split"] == "calib"),
                          "holdout_calls": sum(len(s["calls"]) for s in manifest["samples"]
                                               if s["split"] == "holdout"),
                          "bytes": sum(s["bytes"] for s in manifest["samples"])}
    if old and old.get("set_id") == manifest["set_id"] and len(done) == len(prompts):
        log.info("calibrate: %s unchanged (set %s), skipped", out, manifest["set_id"])
        manifest["seconds"] = old.get("seconds", manifest["seconds"])
        manifest["skipped"] = True
    _write(out, manifest)
    return manifest


def _set_id(manifest: dict) -> str:
    """Content id: checkpoint, settings, prompts and every shard's hash."""
    body = {"source": manifest["source"],
            "samples": [(s["prompt_id"], s["seed"], s["size"], s["split"], s["sha256"]) for s in manifest["samples"]]}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _read(out: Path) -> dict | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return m if m.get("format") == CALIBRATION_FORMAT else None


def _write(out: Path, manifest: dict) -> None:
    from qwen_image_trt.build.manifest import write_atomic

    write_atomic(out / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


class CalibrationSet:
    """A recorded set, opened for replay. Checks format, integrity, checkpoint and size coverage."""

    def __init__(self, folder, verify: bool = True):
        from qwen_image_trt.build.manifest import file_sha256

        self.folder = Path(folder)
        m = _read(self.folder)
        if m is None:
            raise InputError("calibration", str(folder), "a folder made by `qitrt calibrate` (manifest.json with "
                             f"format {CALIBRATION_FORMAT})")
        if "set_id" not in m:
            raise InputError("calibration", str(folder), "a complete calibration set (this one was interrupted: "
                             "re-run `qitrt calibrate` with the same settings to finish it)")
        if verify:
            for s in m["samples"]:
                f = self.folder / s["file"]
                if not f.is_file() or file_sha256(f) != s["sha256"]:
                    raise QitrtError(f"calibration set {folder}: shard {s['file']} is missing or changed since it "
                                     "was recorded; re-run `qitrt calibrate`")
        self.manifest = m
        self.set_id: str = m["set_id"]
        self.identity: str = m["checkpoint"]["identity"]

    @property
    def settings(self) -> dict:
        return self.manifest["source"]["settings"]

    def check_checkpoint(self, identity: str) -> None:
        if identity != self.identity:
            raise InputError("calibration", str(self.folder),
                             f"a calibration set recorded from this checkpoint ({identity}); it was recorded from "
                             f"{self.identity} ({self.manifest['checkpoint'].get('path')}). Run `qitrt calibrate` "
                             "for this checkpoint")

    def calls_per_size(self, split: str = "calib") -> dict[tuple[int, int], int]:
        out: dict[tuple[int, int], int] = {}
        for s in self.manifest["samples"]:
            if s["split"] == split:
                out[tuple(s["size"])] = out.get(tuple(s["size"]), 0) + len(s["calls"])
        return out

    def check_sizes(self, sizes, min_calls: int = MIN_CALLS_PER_SIZE) -> None:
        """Each requested (w, h) needs >= min_calls recorded forwards at that size."""
        have = self.calls_per_size("calib")
        short = [f"{w}x{h} ({have.get((w, h), 0)})" for w, h in sizes if have.get((w, h), 0) < min_calls]
        if short:
            got = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(have.items())) or "none"
            raise InputError("calibration", str(self.folder),
                             f"a set with >= {min_calls} recorded forwards at each size asked; too few for "
                             f"{', '.join(short)} (set has {got}). Re-run `qitrt calibrate --sizes ...`")

    def num_calls(self, split: str = "calib") -> int:
        return sum(len(s["calls"]) for s in self.manifest["samples"] if s["split"] == split)

    def calls(self, split: str = "calib"):
        """Yield dicts with the four recorded tensors and `grid` (frame, h, w), in recording order."""
        from safetensors.torch import load_file

        for s in self.manifest["samples"]:
            if s["split"] != split:
                continue
            tensors = load_file(str(self.folder / s["file"]))
            for c in s["calls"]:
                item = {key: tensors[f"{c['key']}.{key}"] for key in KEYS}
                item["grid"] = tuple(c["grid"])
                item["step"] = c["step"]
                item["prompt_id"] = s["prompt_id"]
                yield item

    def export_inputs(self, axes_dims_rope, split: str = "calib", text_bucket: int | None = None,
                      dtype=torch.float32):
        """Yield input tuples in ExportableTransformer order (INPUT_NAMES), text padded to the runtime's
        bucket exactly as EngineTransformer does, so the quantizers see what the engine will see."""
        from qwen_image_trt.models.transformer_export import RopeTables
        from qwen_image_trt.runtime.transformer import DEFAULT_TEXT_BUCKET

        bucket = text_bucket or DEFAULT_TEXT_BUCKET
        rope = RopeTables(axes_dims_rope)
        for c in self.calls(split):
            states, mask = c["encoder_hidden_states"].to(dtype), c["encoder_hidden_states_mask"].bool()
            batch, length, width = states.shape
            padded = math.ceil(length / bucket) * bucket
            text = torch.zeros(batch, padded, width, dtype=dtype)
            text[:, :length] = states
            text_mask = torch.zeros(batch, padded, dtype=torch.bool)
            text_mask[:, :length] = mask
            frame, h, w = c["grid"]
            yield (c["hidden_states"].to(dtype), text, text_mask, c["timestep"].to(dtype), *rope(frame, h, w, padded))


__all__ = ["calibrate", "CalibrationSet", "make_settings", "default_settings", "CALIBRATION_FORMAT",
           "MIN_CALLS_PER_SIZE"]
