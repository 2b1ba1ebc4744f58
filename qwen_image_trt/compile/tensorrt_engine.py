"""ONNX -> TensorRT engine (TensorRT 10/11, strongly typed), with its manifest entry.

Networks are strongly typed: precision lives in the graph (Q/DQ nodes from quantization, casts for
bf16/fp16), so no precision builder flags are set; `precision` and `recipe` are recorded, and they are
part of the engine's cache key. An engine only runs on the TensorRT version and GPU compute capability
it was built with: both are in the file name and checked at load (`check_engine_compatible`).

Everything that needs no GPU is a pure function here (cache key, file name, profile reconciliation,
compatibility check, manifest entry) or takes the `tensorrt` module as an argument
(`configure_builder`), so it is unit tested without TensorRT. `build_tensorrt_engine` itself needs
TensorRT and a CUDA GPU; `require_tensorrt()` says so before any work starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from qwen_image_trt.core.files import file_sha256, write_atomic
from qwen_image_trt.core.manifest import read_manifest
from qwen_image_trt.core.errors import EngineMismatchError, InputError, QitrtError
from qwen_image_trt.core.shapes import Profile, normalize_profile, profile_from_json, profile_to_json
from qwen_image_trt.core.tensorrt import (check_engine_compatible, engine_cache_key, gpu_info, normalize_cc,
                                          require_tensorrt)

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
ENGINE_SUFFIX = ".plan"
ENGINE_FORMAT = "qwen-image-trt/tensorrt@1"


# -- environment ----------------------------------------------------------------------------------------
# -- pure helpers (unit tested) -------------------------------------------------------------------------
def engine_file_name(component: str, precision: str, trt_version: str, compute_capability, key: str) -> str:
    """e.g. transformer.fp8.trt10.13.0.35.sm90.1a2b3c4d5e6f.plan"""
    cc = normalize_cc(compute_capability).replace(".", "")
    return f"{component}.{precision}.trt{trt_version}.sm{cc}.{key[:12]}{ENGINE_SUFFIX}"


def resolve_profile(network_inputs: dict[str, tuple], profiles) -> Profile:
    """Reconcile profiles with the parsed network's inputs ({name: shape, -1 for dynamic dims}).

    Dynamic dims take the profile's values; static dims must be the network's (a profile made with
    another config's widths is corrected with a warning). A dynamic input without a profile, a profile
    for an unknown input, or a rank mismatch raise InputError.
    """
    profiles = normalize_profile(profiles)
    unknown = sorted(set(profiles) - set(network_inputs))
    if unknown:
        raise InputError("profiles", unknown, f"profiles for the network's inputs {sorted(network_inputs)}")
    out: Profile = {}
    for name, shape in network_inputs.items():
        shape = tuple(int(d) for d in shape)
        if name not in profiles:
            if any(d < 0 for d in shape):
                raise InputError("profiles", sorted(profiles), f"a profile for dynamic input {name!r} {list(shape)}")
            continue
        mn, op, mx = profiles[name]
        if len(mn) != len(shape):
            raise InputError(f"profiles[{name}]", [list(mn), list(op), list(mx)],
                             f"shapes of rank {len(shape)} (network input {list(shape)})")
        fixed = []
        for s in (mn, op, mx):
            fixed.append(tuple(p if d < 0 else d for p, d in zip(s, shape)))
        if tuple(fixed) != (mn, op, mx):
            log.warning("profile for %s: static dims taken from the network %s (profile said %s..%s)",
                        name, list(shape), list(mn), list(mx))
        out[name] = tuple(fixed)
    return normalize_profile(out)


def limits_from_profiles(component: str, profiles, *, cfg: bool = True) -> dict:
    """What the profiles alone say about requests (sizes are only known for the VAE profiles)."""
    p = normalize_profile(profiles)
    if component == "vae_decoder" and "latents" in p:
        mn, _, mx = p["latents"]
        return {"height": [mn[3] * 8, mx[3] * 8], "width": [mn[4] * 8, mx[4] * 8], "batch": [mn[0], mx[0]]}
    if component == "vae_encoder" and "images" in p:
        mn, _, mx = p["images"]
        return {"height": [mn[3], mx[3]], "width": [mn[4], mx[4]], "batch": [mn[0], mx[0]]}
    if component == "transformer" and "hidden_states" in p:
        mn, _, mx = p["hidden_states"]
        return {"batch": [1, max(1, mx[0] // 2) if cfg else mx[0]], "image_tokens": [mn[1], mx[1]]}
    return {}


def engine_entry(*, component: str, engine_file: str, onnx_file: str, onnx_sha: str, precision: str, recipe,
                 profiles, trt_version: str, gpu_name: str, compute_capability, cache_key: str, limits: dict | None,
                 opt_level: int, refittable: bool, weight_streaming: bool, source_entry: dict | None = None,
                 engine_bytes: int | None = None, build_seconds: float | None = None,
                 timing_cache: str | None = None) -> dict:
    """The manifest entry of one engine (what the TensorRT runner and `check_engine_compatible` read)."""
    source_entry = source_entry or {}
    entry = {
        "format": ENGINE_FORMAT,
        "engine_file": engine_file,
        "file": onnx_file,  # the ONNX graph it was built from (the onnxruntime backend can still run it)
        "source_sha256": onnx_sha,
        "tensorrt": str(trt_version),
        "gpu": gpu_name,
        "compute_capability": normalize_cc(compute_capability),
        "precision": precision,
        "recipe": recipe,
        "profiles": profile_to_json(normalize_profile(profiles)),
        "limits": limits if limits is not None else limits_from_profiles(component, profiles),
        "cache_key": cache_key,
        "builder": {"optimization_level": opt_level, "refittable": refittable, "weight_streaming": weight_streaming,
                    "strongly_typed": True, "timing_cache": timing_cache},
    }
    for key in ("inputs", "outputs", "dynamic_axes", "external_data"):
        if key in source_entry:
            entry[key] = source_entry[key]
    if engine_bytes is not None:
        entry["bytes"] = engine_bytes
    if build_seconds is not None:
        entry["build_seconds"] = round(build_seconds, 3)
    return entry


def source_entry_for(source_manifest, component: str, onnx_path: Path, onnx_sha: str) -> dict | None:
    """The component's entry in the export/quantize manifest; EngineMismatchError if the ONNX changed since."""
    if source_manifest is None:
        return None
    manifest = source_manifest if isinstance(source_manifest, dict) else read_manifest(source_manifest)
    entry = manifest.get("components", {}).get(component)
    if entry is None:
        return None
    if entry.get("file") == onnx_path.name and entry.get("sha256") and entry["sha256"] != onnx_sha:
        raise EngineMismatchError(f"{onnx_path} changed since its manifest was written (sha256 {onnx_sha[:12]} != "
                                  f"{entry['sha256'][:12]}): re-run `qitrt export`/`qitrt quantize`")
    return entry


def _relative_or_absolute(path: Path, folder: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), folder.resolve()) if path.resolve().is_relative_to(folder.resolve()) \
            else str(path.resolve())
    except ValueError:
        return str(path.resolve())


# -- TensorRT calls (take the module, so a test double can check which calls we make) ---------------------
def network_inputs(network) -> dict[str, tuple]:
    """{name: shape} of a parsed INetworkDefinition's inputs, -1 for dynamic dims."""
    return {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}


def configure_builder(trt, builder, network, profiles, *, opt_level: int = 3, refittable: bool = False,
                      weight_streaming: bool = False, timing_cache_bytes: bytes | None = None,
                      progress_monitor=None, workspace_bytes: int | None = None):
    """Create the IBuilderConfig: one optimization profile, optimization level, timing cache, flags."""
    if isinstance(opt_level, bool) or not isinstance(opt_level, int) or not 0 <= opt_level <= 5:
        raise InputError("opt_level", opt_level, "an integer in [0, 5] (TensorRT builder optimization level)")
    config = builder.create_builder_config()
    config.builder_optimization_level = opt_level
    resolved = resolve_profile(network_inputs(network), profiles)
    if resolved:
        profile = builder.create_optimization_profile()
        for name, (mn, op, mx) in resolved.items():
            profile.set_shape(name, mn, op, mx)
        config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache_bytes or b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    if weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if progress_monitor is not None:
        config.progress_monitor = progress_monitor
    return config, resolved


def _progress_monitor(trt, label: str):
    """A tqdm bar per builder phase, where this TensorRT has IProgressMonitor (10.0+)."""
    if not hasattr(trt, "IProgressMonitor"):
        return None
    from tqdm.auto import tqdm

    class _Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.bars = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            depth = 0
            while parent_phase in self.bars:
                depth, parent_phase = depth + 1, self.bars[parent_phase][1]
            self.bars[phase_name] = (tqdm(total=num_steps, desc=f"{label}: {phase_name}", leave=depth == 0,
                                          position=depth), parent_phase)

        def step_complete(self, phase_name, step):
            if phase_name in self.bars:
                bar = self.bars[phase_name][0]
                bar.update(step + 1 - bar.n)
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            bar = self.bars.pop(phase_name, (None,))[0]
            if bar is not None:
                bar.close()

    return _Monitor()


def _parse_onnx(trt, network, logger, onnx_path: Path):
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)): the parser then finds external data next to the model.
    ok = parser.parse_from_file(str(onnx_path))
    if not ok:
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise QitrtError(f"TensorRT's ONNX parser rejected {onnx_path} ({len(errors)} error(s)):\n  "
                         + "\n  ".join(errors[:20]) + "\nrun `qitrt lint " + str(onnx_path) + "` for a static check")
    return parser




# -- the build ------------------------------------------------------------------------------------------
def build_tensorrt_engine(onnx_path, out_dir, component: str, profiles, *, precision: str, recipe=None,
                          timing_cache=None, opt_level: int = 3, refittable: bool = False,
                          weight_streaming: bool = False, source_manifest=None, progress: bool = True,
                          limits: dict | None = None, force: bool = False, device: int = 0,
                          workspace_bytes: int | None = None) -> dict:
    """Build one engine into `out_dir` and return its manifest entry (the caller writes the manifest).

    `profiles`: {input: (min, opt, max)} from `build.profiles`. `timing_cache`: a file path, read when it
    exists and written back after the build. An engine with the same cache key already in `out_dir` is
    reused unless `force`. `limits`: the request limits to record (`profiles.limits_from_sizes`).
    """
    if precision not in PRECISIONS:
        raise InputError("precision", precision, f"one of {', '.join(PRECISIONS)}")
    onnx_path, out = Path(onnx_path), Path(out_dir)
    if not onnx_path.is_file():
        raise InputError("onnx_path", str(onnx_path), "an existing .onnx file")
    profiles = normalize_profile(profiles)
    trt = require_tensorrt(device)
    gpu_name, cc = gpu_info(device)
    out.mkdir(parents=True, exist_ok=True)

    onnx_sha = file_sha256(onnx_path)
    source_entry = source_entry_for(source_manifest, component, onnx_path, onnx_sha)
    key = engine_cache_key(onnx_sha, precision, recipe, profiles, trt.__version__, cc, opt_level=opt_level,
                           refittable=refittable, weight_streaming=weight_streaming)
    engine_path = out / engine_file_name(component, precision, trt.__version__, cc, key)
    common = dict(component=component, engine_file=engine_path.name, onnx_file=_relative_or_absolute(onnx_path, out),
                  onnx_sha=onnx_sha, precision=precision, recipe=recipe, trt_version=trt.__version__,
                  gpu_name=gpu_name, compute_capability=cc, cache_key=key, limits=limits, opt_level=opt_level,
                  refittable=refittable, weight_streaming=weight_streaming, source_entry=source_entry,
                  timing_cache=str(timing_cache) if timing_cache else None)
    # The profile TensorRT was built with (fixed dims resolved from the parsed network) sits beside the engine,
    # so a reused engine's manifest entry says exactly what a fresh build's would.
    resolved_file = engine_path.with_suffix(".profile.json")
    if engine_path.is_file() and resolved_file.is_file() and not force:
        log.info("tensorrt: %s is up to date (cache key %s), not rebuilt", engine_path.name, key[:12])
        resolved = profile_from_json(json.loads(resolved_file.read_text()))
        return engine_entry(profiles=resolved, engine_bytes=engine_path.stat().st_size, **common)

    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    _parser = _parse_onnx(trt, network, logger, onnx_path)  # keep alive until the build is done
    cache_file = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_file.read_bytes() if cache_file and cache_file.is_file() else None
    config, resolved = configure_builder(
        trt, builder, network, profiles, opt_level=opt_level, refittable=refittable,
        weight_streaming=weight_streaming, timing_cache_bytes=cache_bytes,
        progress_monitor=_progress_monitor(trt, component) if progress else None, workspace_bytes=workspace_bytes)
    log.info("tensorrt: building %s from %s (%s, opt level %d)", engine_path.name, onnx_path.name, precision, opt_level)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise QitrtError(f"TensorRT could not build {component} from {onnx_path} (see the TensorRT log above); "
                         f"run `qitrt lint {onnx_path}` for a static check")
    write_atomic(engine_path, plan)
    write_atomic(resolved_file, json.dumps(profile_to_json(resolved)).encode())
    if cache_file:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache_file, config.get_timing_cache().serialize())
    seconds = time.perf_counter() - t0
    del _parser, network, config, builder
    return engine_entry(profiles=resolved, engine_bytes=engine_path.stat().st_size, build_seconds=seconds, **common)


__all__ = ["build_tensorrt_engine", "require_tensorrt", "gpu_info", "engine_cache_key", "engine_file_name",
           "check_engine_compatible", "resolve_profile", "configure_builder", "engine_entry", "limits_from_profiles",
           "normalize_cc", "PRECISIONS"]
