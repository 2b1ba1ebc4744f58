"""ONNX -> TensorRT engine (TensorRT 10/11, strongly typed), returned as its manifest entry.

Networks are strongly typed: precision lives in the graph (Q/DQ nodes from quantization, casts for
bf16/fp16), so no precision builder flags are set. The builder flags that remain (optimization level, TF32,
weight streaming, workspace) come from `core.tensorrt.builder_settings` and, with the graph and weight
hashes, precision, recipe, profiles, TensorRT version and compute capability, make the engine's cache key:
an engine with the same key in the output folder is reused, anything else is rebuilt.

The timing cache file is shared by builds: loaded before the build, and after it re-read under an
exclusive lock, combined with this build's cache and written atomically, so concurrent builds keep each
other's entries.

TensorRT calls take the `tensorrt` module as an argument (`create_network`, `configure_builder`,
`merge_timing_cache`, `build_plan`), so a recording stand-in checks which calls we make, in which order,
without TensorRT. Building an engine needs TensorRT and a CUDA GPU; `require_tensorrt()` says so first.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from qwen_image_trt.core.errors import EngineMismatchError, InputError, QitrtError
from qwen_image_trt.core.files import file_lock, write_atomic
from qwen_image_trt.core.manifest import Component, TensorRTEngine
from qwen_image_trt.core.shapes import Profile, normalize_profile, profile_from_json, profile_to_json
from qwen_image_trt.core.tensorrt import (
    builder_settings,
    check_engine_compatible,
    engine_cache_key,
    gpu_info,
    normalize_cc,
    require_tensorrt,
    trt_major,
)

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
ENGINE_SUFFIX = ".plan"


# -- pure helpers -------------------------------------------------------------------------------------
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
        fixed = tuple(tuple(p if d < 0 else d for p, d in zip(s, shape)) for s in (mn, op, mx))
        if fixed != (mn, op, mx):
            log.warning("profile for %s: static dims taken from the network %s (profile said %s..%s)",
                        name, list(shape), list(mn), list(mx))
        out[name] = fixed
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


def graph_identity(graphs_dir, source: Component) -> tuple[Path, str, str | None]:
    """(.onnx path, graph sha256, weights sha256) of a source graph, from its manifest entry.

    The graph file is re-hashed (small) and the data file's size checked; the weights' sha256 is the one
    recorded when they were written (re-reading 40 GB per build would cost more than it guards).
    """
    graph = source.graph
    path = graph.path(graphs_dir)
    if not path.is_file():
        raise InputError("source", str(path), "an existing .onnx graph (run `qitrt export` first)")
    if not graph.intact(graphs_dir):
        raise EngineMismatchError(f"{path} (or its external data) changed since its manifest was written: re-run "
                                  "`qitrt export`/`qitrt quantize` (or `qitrt build --force`)")
    if graph.external_data and not graph.external_data_sha256:
        raise EngineMismatchError(f"{path}: the manifest records no sha256 for its external data "
                                  f"{graph.external_data!r}, so an engine built from it could go stale unnoticed: "
                                  "re-export with this version of qwen-image-trt")
    return path, graph.sha256, graph.external_data_sha256


# -- TensorRT calls (take the module, so a recording stand-in can check them) -------------------------
def network_flags(trt) -> int:
    """create_network flags: STRONGLY_TYPED. TensorRT 11 keeps the flag (ignored, always strongly typed)."""
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    if flag is None:
        if trt_major(trt) >= 11:
            return 0
        raise QitrtError(f"TensorRT {trt.__version__} has no STRONGLY_TYPED network flag: TensorRT >= 10 is needed")
    return 1 << int(flag)


def create_network(trt, builder):
    """A strongly typed INetworkDefinition; refused if TensorRT 10 did not make it strongly typed."""
    network = builder.create_network(network_flags(trt))
    if trt_major(trt) < 11 and hasattr(network, "get_flag") and \
            not network.get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED):
        raise QitrtError("TensorRT created a network that is not strongly typed: the graph's Q/DQ nodes and casts "
                         "would not fix its precision")
    return network


def network_inputs(network) -> dict[str, tuple]:
    """{name: shape} of a parsed INetworkDefinition's inputs, -1 for dynamic dims."""
    return {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}


def configure_builder(trt, builder, network, profiles, settings: dict, *, timing_cache_bytes: bytes | None = None,
                      progress_monitor=None):
    """The IBuilderConfig: optimization level, TF32, weight streaming, workspace, one optimization profile
    (min/opt/max per dynamic input), the timing cache. Returns (config, the resolved profile)."""
    config = builder.create_builder_config()
    config.builder_optimization_level = settings["optimization_level"]
    # TF32 is on by default in TensorRT: set it either way, so the engine does not depend on that default.
    if settings["tf32"]:
        config.set_flag(trt.BuilderFlag.TF32)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    if settings["weight_streaming"]:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    if settings.get("refittable"):  # every weight refittable by its ONNX initializer name (run-time LoRA)
        config.set_flag(trt.BuilderFlag.REFIT)
    if settings.get("workspace_bytes"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings["workspace_bytes"]))
    resolved = resolve_profile(network_inputs(network), profiles)
    if resolved:
        profile = builder.create_optimization_profile()
        for name, (mn, op, mx) in resolved.items():
            profile.set_shape(name, mn, op, mx)
        config.add_optimization_profile(profile)
    _set_timing_cache(config, timing_cache_bytes)
    if progress_monitor is not None:
        config.progress_monitor = progress_monitor
    return config, resolved


def _set_timing_cache(config, data: bytes | None) -> None:
    if data:
        try:
            cache = config.create_timing_cache(data)
        except Exception:  # not a timing cache at all
            cache = None
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return
        log.warning("tensorrt: the timing cache file is unreadable or was made by another TensorRT version or GPU; "
                    "starting from an empty cache (use one timing cache file per GPU model)")
    config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def merge_timing_cache(config, path: Path) -> bool:
    """Merge this build's timing cache into `path`: re-read the file under an exclusive lock (another build
    may have written it since ours started), combine, write atomically. False when the file's cache is from
    another TensorRT version or GPU: it is then left as it is."""
    cache = config.get_timing_cache()
    if cache is None:
        return False
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path):
        if path.is_file() and path.stat().st_size:
            try:
                on_disk = config.create_timing_cache(path.read_bytes())
            except Exception:
                on_disk = None
            if on_disk is None or not cache.combine(on_disk, False):
                log.warning("tensorrt: %s holds a timing cache of another TensorRT version or GPU; left unchanged, "
                            "this build's timings are not saved", path)
                return False
        write_atomic(path, cache.serialize())
    return True


def _parse_onnx(trt, network, logger, onnx_path: Path):
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)): the parser then finds the external data next to the model.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise QitrtError(f"TensorRT's ONNX parser rejected {onnx_path} ({len(errors)} error(s)):\n  "
                         + "\n  ".join(errors[:20]) + f"\nrun `qitrt lint {onnx_path}` for a static check")
    return parser


def build_plan(trt, onnx_path: Path, profiles, settings: dict, *, timing_cache: Path | None = None,
               progress_monitor=None):
    """Parse, configure and build; returns (serialized plan, resolved profile). The timing cache is merged
    back even when the build fails: the tactics timed so far stay valid and save time on the next try."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = create_network(trt, builder)
    parser = _parse_onnx(trt, network, logger, onnx_path)  # kept alive until the build is done
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else None
    config, resolved = configure_builder(trt, builder, network, profiles, settings, timing_cache_bytes=cache_bytes,
                                         progress_monitor=progress_monitor)
    try:
        plan = builder.build_serialized_network(network, config)
    except BaseException:
        if timing_cache is not None:
            _merge_quietly(config, timing_cache)  # the build's own error is the one to report
        raise
    if timing_cache is not None:
        merge_timing_cache(config, timing_cache) if plan is not None else _merge_quietly(config, timing_cache)
    del parser
    if plan is None:
        raise QitrtError(f"TensorRT could not build an engine from {onnx_path} (see the TensorRT log above); "
                         f"run `qitrt lint {onnx_path}` for a static check")
    return plan, resolved


def _merge_quietly(config, path: Path) -> None:
    try:
        merge_timing_cache(config, path)
    except Exception as e:
        log.warning("tensorrt: could not save the timing cache to %s: %s", path, e)


def _progress_monitor(trt, label: str):
    """A tqdm bar per builder phase (IProgressMonitor, TensorRT >= 10)."""
    if not hasattr(trt, "IProgressMonitor"):
        return None
    from tqdm.auto import tqdm

    class _Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.bars = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            depth, parent = 0, parent_phase
            while parent in self.bars:
                depth, parent = depth + 1, self.bars[parent][1]
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


def _cuda_device(index: int):
    """TensorRT builds and deserializes on the current CUDA device: make it the one asked for."""
    import torch

    return torch.cuda.device(index)


# -- the build ----------------------------------------------------------------------------------------
def build_tensorrt_engine(graphs_dir, source: Component, out_dir, name: str, profiles, *, precision: str,
                          recipe=None, timing_cache=None, opt_level: int = 3, tf32: bool | None = None,
                          weight_streaming: bool = False, device: int = 0, progress: bool = True,
                          limits: dict | None = None, force: bool = False,
                          workspace_bytes: int | None = None, refittable: bool = False) -> TensorRTEngine:
    """Build `source`'s graph (in `graphs_dir`) into `out_dir` as component `name`; return its manifest entry.

    `profiles`: {input: (min, opt, max)} from `compile.profiles`. `timing_cache`: a file shared by builds.
    An engine with the same cache key already in `out_dir` is reused (entry `seconds` None) unless `force`.
    `limits`: the request limits to record (`profiles.limits_from_sizes`); default: what the profiles say.
    """
    if precision not in PRECISIONS:
        raise InputError("precision", precision, f"one of {', '.join(PRECISIONS)}")
    settings = builder_settings(precision, opt_level=opt_level, tf32=tf32, weight_streaming=weight_streaming,
                                workspace_bytes=workspace_bytes, refittable=refittable)
    profiles = normalize_profile(profiles)
    onnx_path, graph_sha, weights_sha = graph_identity(graphs_dir, source)
    trt = require_tensorrt(device)
    gpu_name, cc = gpu_info(device)
    key = engine_cache_key(graph_sha, weights_sha, precision, recipe, profiles, trt.__version__, cc, settings)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    engine_path = out / engine_file_name(name, precision, trt.__version__, cc, key)
    # The profile TensorRT was built with (static dims from the parsed network) sits beside the plan, written
    # after it: a reused engine's entry then says exactly what a fresh build's would.
    profile_file = engine_path.with_suffix(".profile.json")

    def entry(resolved, seconds):
        return TensorRTEngine(file=engine_path.name, bytes=engine_path.stat().st_size, tensorrt=trt.__version__,
                              gpu=gpu_name, compute_capability=normalize_cc(cc), profiles=profile_to_json(resolved),
                              cache_key=key, builder=settings,
                              limits=limits if limits is not None else limits_from_profiles(name, resolved),
                              seconds=None if seconds is None else round(seconds, 3))

    if engine_path.is_file() and profile_file.is_file() and not force:
        log.info("tensorrt: %s is up to date (cache key %s), not rebuilt", engine_path.name, key[:12])
        return entry(profile_from_json(json.loads(profile_file.read_text())), None)

    t0 = time.perf_counter()
    log.info("tensorrt: building %s from %s (%s, opt level %d, TF32 %s)", engine_path.name, onnx_path.name,
             precision, opt_level, "on" if settings["tf32"] else "off")
    with _cuda_device(device):
        plan, resolved = build_plan(trt, onnx_path, profiles, settings,
                                    timing_cache=Path(timing_cache) if timing_cache else None,
                                    progress_monitor=_progress_monitor(trt, name) if progress else None)
    write_atomic(engine_path, plan)
    write_atomic(profile_file, json.dumps(profile_to_json(resolved)))
    return entry(resolved, time.perf_counter() - t0)


__all__ = ["build_tensorrt_engine", "build_plan", "configure_builder", "create_network", "network_flags",
           "merge_timing_cache", "resolve_profile", "limits_from_profiles", "engine_file_name", "graph_identity",
           "require_tensorrt", "gpu_info", "engine_cache_key", "builder_settings", "check_engine_compatible",
           "normalize_cc", "PRECISIONS"]
