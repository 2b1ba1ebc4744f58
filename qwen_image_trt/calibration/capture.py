"""`qitrt calibrate`: run the real pipeline over shipped prompts and record the transformer's inputs.

The pipeline is diffusers' own QwenImagePipeline with eager modules, run as a user runs it: true CFG on
(negative prompt " ", scale 4), so every recorded step has a conditional and an unconditional call. A
forward pre-hook on the transformer records, per call, what the exported graph takes (hidden_states,
encoder_hidden_states, its mask, timestep) plus the image grid, so RoPE tables can be rebuilt at replay.
One safetensors shard per prompt, a manifest with prompt ids, seeds, sizes, steps and shapes, and a
content id (`set_id`) that quantized engines record.

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
from qwen_image_trt.core.errors import InputError, QitrtError
from qwen_image_trt.core.files import file_sha256
from qwen_image_trt.core.identity import tool_versions
from qwen_image_trt.core.manifest import (
    CalibrationCall,
    CalibrationManifest,
    CalibrationSample,
    CheckpointId,
    read_calibration_manifest,
    try_read_manifest,
    write_manifest,
)
from qwen_image_trt.core.shapes import DEFAULT_TEXT_BUCKET, MAX_STEPS, padded_text_len, parse_sizes
from qwen_image_trt.models import checkpoint as ckpt
from qwen_image_trt.models.lora import merge_into, read_loras
from qwen_image_trt.models.sampling import SamplingRecipe, load_recipe
from qwen_image_trt.models.pipelines import load_stock_pipeline, pipeline_kind
from qwen_image_trt.models.transformer_export import RopeTables

log = logging.getLogger(__name__)

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


def default_settings(checkpoint) -> dict:
    return dict(TINY_DEFAULTS if ckpt.is_tiny(checkpoint) else REAL_DEFAULTS)


def _int_in(field: str, value, lo: int, hi: int | None = None, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        raise InputError(field, value, f"an integer in [{lo}, {hi if hi is not None else 'inf'}]{why}")
    return value


def make_settings(checkpoint, num_prompts=None, steps=None, sizes=None, seed: int = 0, holdout=None,
                  record_every=None) -> CalibrationSettings:
    """Fill in defaults and check every value before any model is loaded."""
    d = default_settings(checkpoint)
    num_prompts = d["num_prompts"] if num_prompts is None else num_prompts
    steps = d["steps"] if steps is None else steps
    sizes = tuple(d["sizes"]) if sizes is None else tuple(parse_sizes(sizes))
    _int_in("steps", steps, ckpt.min_steps(checkpoint), MAX_STEPS)  # 2 with shift_terminal: 1 step is NaN
    record_every = min(d["record_every"], steps) if record_every is None else record_every
    _int_in("seed", seed, 0)
    _int_in("record_every", record_every, 1, steps, f" (steps={steps})")
    select_prompts(num_prompts, seed)  # range check of num_prompts
    if holdout is None:
        holdout = max(1, num_prompts // 8) if num_prompts >= 4 else 0
    _int_in("holdout", holdout, 0, num_prompts - 1, f" (num_prompts={num_prompts} minus one)")
    if num_prompts - holdout < len(sizes):
        raise InputError("num_prompts", num_prompts, f"at least {len(sizes) + holdout} for {len(sizes)} size(s) "
                         f"and {holdout} held-out prompt(s): every size needs its own calibration prompts")
    per_size = (num_prompts - holdout) // len(sizes) * math.ceil(steps / record_every) * 2  # cond + uncond
    if per_size < MIN_CALLS_PER_SIZE:
        raise InputError("num_prompts/steps", (num_prompts, steps),
                         f"enough to record >= {MIN_CALLS_PER_SIZE} forwards per size (got {per_size} per size "
                         f"for {len(sizes)} size(s)); raise --num-prompts or --steps")
    return CalibrationSettings(num_prompts, steps, sizes, seed, holdout, record_every)


class _Recorder:
    """Forward pre-hook: copies the inputs of the transformer calls of every `record_every`-th step.

    A step is a run of calls with one timestep (true CFG: the conditional call, then the unconditional one).
    """

    def __init__(self, record_every: int):
        self.record_every = record_every
        self.reset()

    def reset(self):
        self.calls: list[dict] = []
        self.step, self.branch, self._last_t = -1, 0, None

    def __call__(self, module, args, kwargs):
        t = kwargs["timestep"].detach().reshape(-1)[0].item()
        if t != self._last_t:
            self.step, self.branch, self._last_t = self.step + 1, 0, t
        else:
            self.branch += 1
        if self.step % self.record_every:
            return None
        hs = kwargs.get("hidden_states", args[0] if args else None)
        ehs = kwargs["encoder_hidden_states"]
        mask = kwargs.get("encoder_hidden_states_mask")
        if mask is None:  # diffusers passes None when nothing is padded
            mask = torch.ones(ehs.shape[:2], dtype=torch.bool, device=ehs.device)
        grids = [tuple(int(v) for v in g) for g in _sample_grids(kwargs["img_shapes"][0])]
        call = {
            "step": self.step, "branch": ("cond", "uncond")[min(self.branch, 1)],
            "grids": grids,
            "hidden_states": hs.detach().to("cpu", copy=True).contiguous(),
            "encoder_hidden_states": ehs.detach().to("cpu", copy=True).contiguous(),
            "encoder_hidden_states_mask": mask.detach().to("cpu").bool().clone(),
            "timestep": kwargs["timestep"].detach().to("cpu", copy=True).reshape(-1).contiguous(),
        }
        if kwargs.get("img_mask") is not None:  # Qwen-Image-2.1: the joint layout; its grids list the target last
            call["img_mask"] = kwargs["img_mask"].detach().to("cpu").bool().clone()
            call["grids"] = [grids[-1], *grids[:-1]]
        self.calls.append(call)
        return None


def _sample_grids(sample) -> list:
    """One sample's img_shapes entry as a list of grids (the ControlNet pipelines pass one bare grid)."""
    return [sample] if len(sample) == 3 and all(isinstance(v, int) for v in sample) else list(sample)


def calibrate(checkpoint, out_dir, *, num_prompts=None, steps=None, sizes=None, seed: int = 0, holdout=None,
              record_every=None, device: str = "cpu", force: bool = False, progress: bool = True,
              pipe=None, loras=(), sampling=None) -> CalibrationManifest:
    """Record a calibration set for `checkpoint` into `out_dir`; return its manifest.

    `loras` ("PATH[:SCALE]" or LoraSpec): merged into the transformer as `qitrt export --lora` merges them, so
    a quantized LoRA engine is calibrated on the trajectories it will run. `sampling` (a SamplingRecipe, name or
    file): the scheduler and step count the engines are made for (a few-step LoRA's), used while recording."""
    from tqdm.auto import tqdm

    root = ckpt.validate_checkpoint(checkpoint)
    kind = pipeline_kind(root, "qwen-image-2.1" if ckpt.is_qwen21(root) else None)  # 2.1-Turbo: its stock loop
    if kind == "controlnet":  # its transformer_controlnet graph is not quantized (compile.stages refuses the build)
        raise InputError("checkpoint", str(root), "a text-to-image or edit checkpoint: ControlNet engines are not "
                         "quantized yet, so there is nothing to calibrate for")
    recipe = sampling if sampling is None or isinstance(sampling, SamplingRecipe) else load_recipe(sampling, steps)
    if recipe is not None:
        steps = recipe.steps if steps is None else steps
        if steps != recipe.steps:
            raise InputError("steps", steps, f"{recipe.steps}: the step count {recipe.name} is made for")
    settings = make_settings(root, num_prompts, steps, sizes, seed, holdout, record_every)
    merged = read_loras(root, loras)
    identity = ckpt.checkpoint_identity(root)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = {"checkpoint": identity, "settings": settings.as_dict(), "prompt_set": prompt_set_sha256()[:16]}
    if merged:
        source["loras"] = [adapter.record(scale) for adapter, scale in merged]
    if recipe is not None:
        source["sampling"] = recipe.record()
    old = try_read_manifest(out, CalibrationManifest)
    done = _intact_samples(out, old, source) if not force else {}
    manifest = CalibrationManifest(checkpoint=CheckpointId(path=str(root.resolve()), identity=identity),
                                   source=source, versions=tool_versions())
    t0 = time.perf_counter()
    recorder = _Recorder(settings.record_every)
    hook = None
    samples = plan_samples(settings)
    bar = tqdm(total=len(samples), desc="calibrate", unit="prompt", disable=not progress)
    try:
        for sample, text in samples:
            if sample.prompt_id in done and done[sample.prompt_id].file == sample.file:
                manifest.samples.append(done[sample.prompt_id])
                bar.update()
                continue
            if pipe is None:
                # On a GPU in bf16, the model's reference precision (fp32 Qwen-Image is ~115 GB with its encoder).
                pipe = load_stock_pipeline(root, device=device,
                                           dtype=torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
            if merged and hook is None:
                merge_into(pipe.transformer, merged)
            if recipe is not None and hook is None:
                recipe.apply(pipe)
            if hook is None:
                hook = pipe.transformer.register_forward_pre_hook(recorder, with_kwargs=True)
            manifest.samples.append(_record_prompt(pipe, recorder, sample, text, settings, out, kind))
            write_manifest(out, manifest)  # after every prompt: an interrupted run resumes here
            bar.set_postfix(size="x".join(map(str, sample.size)), calls=len(manifest.samples[-1].calls))
            bar.update()
    finally:
        bar.close()
        if hook is not None:
            hook.remove()
    _finish(manifest, old, time.perf_counter() - t0, recorded=len(samples) - len(done))
    write_manifest(out, manifest)
    return manifest


def plan_samples(settings: CalibrationSettings) -> list[tuple[CalibrationSample, str]]:
    """(sample, prompt text) per prompt: calibration prompts cycle through the sizes, then held-out ones do."""
    prompts = select_prompts(settings.num_prompts, settings.seed)
    n_calib = settings.num_prompts - settings.holdout
    out = []
    for i, p in enumerate(prompts):
        k = i if i < n_calib else i - n_calib
        w, h = settings.sizes[k % len(settings.sizes)]
        out.append((CalibrationSample(index=i, prompt_id=p["id"], lang=p["lang"], category=p["category"],
                                      seed=prompt_seed(settings.seed, i), size=[w, h],
                                      split="calib" if i < n_calib else "holdout",
                                      file=f"prompt_{i:04d}_{p['id']}.safetensors"), p["text"]))
    return out


def _intact_samples(out: Path, old: CalibrationManifest | None, source: dict) -> dict[str, CalibrationSample]:
    """Samples of an earlier run with the same source whose shard is still there, unchanged."""
    if old is None:
        return {}
    if old.source != source:
        log.warning("calibrate: %s held a set with other settings or checkpoint; replacing it", out)
        return {}
    return {s.prompt_id: s for s in old.samples
            if s.sha256 and (out / s.file).is_file() and file_sha256(out / s.file) == s.sha256}


def _record_prompt(pipe, recorder: _Recorder, sample: CalibrationSample, text: str, settings: CalibrationSettings,
                   out: Path, kind: str = "text-to-image") -> CalibrationSample:
    """One prompt through the stock pipeline; the edit members get the shipped condition images of the sample's seed
    (models.condition_images: different sizes, so the condition grids vary across the set)."""
    from safetensors.torch import save_file

    from qwen_image_trt.models.condition_images import sample_image_inputs

    recorder.reset()
    w, h = sample.size
    if kind.startswith("qwen-image-2.1"):  # generation and editing: every other prompt with a condition image
        images = _inputs_21(sample, w, h)
    else:
        images = sample_image_inputs(kind, sample.seed)
    pipe(prompt=text, negative_prompt=NEGATIVE_PROMPT, true_cfg_scale=TRUE_CFG_SCALE, height=h, width=w,
         num_inference_steps=settings.steps, generator=torch.Generator("cpu").manual_seed(sample.seed),
         output_type="latent", **images)
    tensors, calls = {}, []
    for k, c in enumerate(recorder.calls):
        for key in KEYS + (("img_mask",) if "img_mask" in c else ()):
            tensors[f"{k:03d}.{key}"] = c[key]
        target, *conditions = c["grids"]
        calls.append(CalibrationCall(key=f"{k:03d}", step=c["step"], branch=c["branch"], grid=list(target),
                                     batch=int(c["hidden_states"].shape[0]),
                                     text_len=int(c["encoder_hidden_states"].shape[1]),
                                     condition_grids=[list(g) for g in conditions] or None))
    path = out / sample.file
    # One metadata key: safetensors writes a multi-key metadata map in hash order, which would make the
    # file's bytes (and the set id) differ between identical runs.
    save_file(tensors, str(path), metadata={"qitrt": json.dumps({"prompt_id": sample.prompt_id})})
    return sample.model_copy(update={"sha256": file_sha256(path), "bytes": path.stat().st_size, "calls": calls})


def _inputs_21(sample: CalibrationSample, width: int, height: int) -> dict:
    """Qwen-Image-2.1's calibration prompts alternate generation and editing (a shipped condition image, resized to
    the output's area as `qitrt generate` does), so both prefix layouts reach the quantizers."""
    if sample.index % 2 == 0:
        return {}
    from qwen_image_trt.core.shapes import condition_resolution
    from qwen_image_trt.models.condition_images import condition_image

    return {"image": condition_image(sample.seed), "output_resolution": condition_resolution(height, width)}


def _finish(manifest: CalibrationManifest, old: CalibrationManifest | None, seconds: float, recorded: int) -> None:
    manifest.set_id = set_id(manifest)
    manifest.seconds = round(seconds, 3)
    by_split = {split: [s for s in manifest.samples if s.split == split] for split in ("calib", "holdout")}
    manifest.totals = {"prompts": len(manifest.samples),
                       "calib_calls": sum(len(s.calls) for s in by_split["calib"]),
                       "holdout_calls": sum(len(s.calls) for s in by_split["holdout"]),
                       "bytes": sum(s.bytes or 0 for s in manifest.samples)}
    manifest.ran = recorded > 0
    if not manifest.ran and old is not None and old.set_id == manifest.set_id:
        log.info("calibrate: unchanged (set %s), skipped", manifest.set_id)
        manifest.seconds = old.seconds


def set_id(manifest: CalibrationManifest) -> str:
    """Content id: checkpoint, settings, prompts and every shard's hash."""
    body = {"source": manifest.source,
            "samples": [(s.prompt_id, s.seed, s.size, s.split, s.sha256) for s in manifest.samples]}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


class CalibrationSet:
    """A recorded set, opened for replay. Checks format, integrity, checkpoint and size coverage."""

    def __init__(self, folder, verify: bool = True):
        self.folder = Path(folder)
        try:
            m = read_calibration_manifest(self.folder)
        except QitrtError as e:
            raise InputError("calibration", str(folder), f"a folder made by `qitrt calibrate` ({e})") from None
        if m.set_id is None:
            raise InputError("calibration", str(folder), "a complete calibration set (this one was interrupted: "
                             "re-run `qitrt calibrate` with the same settings to finish it)")
        if verify:
            for s in m.samples:
                f = self.folder / s.file
                if not f.is_file() or file_sha256(f) != s.sha256:
                    raise QitrtError(f"calibration set {folder}: shard {s.file} is missing or changed since it "
                                     "was recorded; re-run `qitrt calibrate`")
        self.manifest = m
        self.set_id: str = m.set_id
        self.identity: str = m.checkpoint.identity

    @property
    def settings(self) -> dict:
        return self.manifest.source["settings"]

    def check_checkpoint(self, identity: str) -> None:
        if identity != self.identity:
            raise InputError("calibration", str(self.folder),
                             f"a calibration set recorded from this checkpoint ({identity}); it was recorded from "
                             f"{self.identity} ({self.manifest.checkpoint.path}). Run `qitrt calibrate` "
                             "for this checkpoint")

    def calls_per_size(self, split: str = "calib") -> dict[tuple[int, int], int]:
        out: dict[tuple[int, int], int] = {}
        for s in self.manifest.samples:
            if s.split == split:
                out[tuple(s.size)] = out.get(tuple(s.size), 0) + len(s.calls)
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
        return sum(len(s.calls) for s in self.manifest.samples if s.split == split)

    def calls(self, split: str = "calib"):
        """Yield dicts with the four recorded tensors, `grid` (frame, h, w), step and branch, in recording order."""
        from safetensors.torch import load_file

        for s in self.manifest.samples:
            if s.split != split:
                continue
            tensors = load_file(str(self.folder / s.file))
            for c in s.calls:
                item = {key: tensors[f"{c.key}.{key}"] for key in KEYS}
                if f"{c.key}.img_mask" in tensors:  # Qwen-Image-2.1
                    item["img_mask"] = tensors[f"{c.key}.img_mask"]
                item.update(grid=tuple(c.grid), step=c.step, branch=c.branch, prompt_id=s.prompt_id,
                            grids=(tuple(c.grid), *(tuple(g) for g in c.condition_grids or ())))
                yield item

    def export_inputs(self, axes_dims_rope, split: str = "calib", text_bucket: int | None = None,
                      dtype=torch.float32, zero_cond_t: bool = False):
        """Yield input tuples in ExportableTransformer order (its input_names), text padded to the runtime's
        bucket exactly as EngineTransformer does, so the quantizers see what the engine will see."""
        for c in self.calls(split):
            yield replay_inputs(c, axes_dims_rope, text_bucket, dtype, zero_cond_t)


def replay_inputs(call: dict, axes_dims_rope, text_bucket: int | None = None, dtype=torch.float32,
                  zero_cond_t: bool = False) -> tuple:
    """One recorded call as ExportableTransformer inputs, text padded to the bucket with its mask; the RoPE tables
    cover the target and any condition grids, and Edit-2511 (`zero_cond_t`) gets its modulate_index."""
    states, mask = call["encoder_hidden_states"].to(dtype), call["encoder_hidden_states_mask"].bool()
    batch, length, width = states.shape
    padded = padded_text_len(length, text_bucket or DEFAULT_TEXT_BUCKET)
    text = torch.zeros(batch, padded, width, dtype=dtype)
    text[:, :length] = states
    text_mask = torch.zeros(batch, padded, dtype=torch.bool)
    text_mask[:, :length] = mask
    grids = tuple(call.get("grids") or (call["grid"],))
    rope = _rope(tuple(axes_dims_rope)).for_grids(grids, padded)
    args = (call["hidden_states"].to(dtype), text, text_mask, call["timestep"].to(dtype), *rope)
    if zero_cond_t:
        from qwen_image_trt.models.transformer_export import modulate_index

        args += (modulate_index(grids, batch),)
    return args


_ROPES: dict = {}


def _rope(axes: tuple):
    if axes not in _ROPES:
        _ROPES[axes] = RopeTables(axes)
    return _ROPES[axes]


__all__ = ["calibrate", "CalibrationSet", "make_settings", "default_settings", "replay_inputs", "plan_samples",
           "MIN_CALLS_PER_SIZE"]
