"""The one-call GPU check: everything a GPU can show about this project, in one short run on whatever GPU is at hand.

GPU hosts are reached rarely, for minutes, with no network: this runs from the repository with carried wheels
(benchmarks/gpu_check.sh), builds the real-width transformer with random weights (real configs, as many of the
60 blocks as memory allows, bf16), and measures section by section, writing the results after each one, so a run
cut short still leaves what it measured:

- transformer: per-step time (one forward, CFG batch 2) at the given sizes, eager bf16, beside the FLOP floor of
  models/flops.py at the GPU's datasheet peak;
- vae_decode: the real VAE (diffusers' AutoencoderKLQwenImage defaults are Qwen-Image's) decoding one image;
- batching: images/s against batch 1-8 at two sizes (CFG: a forward over 2 x batch samples), and the gain;
- step_cache: a 20-step CFG denoising loop with runtime.step_cache at several thresholds: row-steps skipped,
  speedup, final-latent error against the uncached loop (random weights: a mechanism and overhead figure);
- dropin_overhead: EngineTransformer over a torch runner against the bare runner, same feeds;
- compile: the torch fast path (regional torch.compile), compile seconds and per-step time;
- fp8: torchao float8 linears on the FP8 recipe's layers (+ compile), where the GPU and torchao allow;
- onnxruntime_cuda, tensorrt: measured when importable with a CUDA provider / TensorRT, else skipped with why.

A section that cannot run says why ("skipped"); one that fails records its error and the run goes on. Sections past
the time budget are skipped as such. The output is benchmarks/results/gpu/<gpu>-<date>.{json,md}; running it
twice overwrites the same day's files. `--tiny` runs every section at a tiny width on any device: CI runs it on
CPU (tests/test_gpu_check.py), so the check cannot rot between GPU loans.
"""

from __future__ import annotations

import json
import platform
import re
import statistics
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

from qwen_image_trt.core.gpus import lookup_peak
from qwen_image_trt.models import flops

TEXT_TOKENS = 64  # a typical Qwen-Image prompt after the template is dropped
BLOCK_BYTES_BF16 = 0.68e9  # one real block's weights (20.4 B params / 60 blocks, 2 bytes each)


class Skip(Exception):
    """A section that cannot run here; the message says why."""


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn, device, repeat: int, warmup: int = 1) -> dict:
    """Median and spread of `repeat` calls after `warmup`, synchronized on CUDA."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": repeat}


class GpuCheck:
    def __init__(self, device: str = "cuda", tiny: bool = False, layers=None, out="benchmarks/results/gpu",
                 budget_s: float = 450.0, repeat: int = 5, sizes=None, batch_sizes=(1, 2, 4, 8),
                 steps: int = 20, thresholds=(0.1, 0.2, 0.4), compile_backend: str = "inductor", progress=print):
        self.device, self.tiny, self.repeat, self.steps = device, tiny, repeat, steps
        self.compile_backend = compile_backend
        self.batch_sizes, self.thresholds, self.progress = tuple(batch_sizes), tuple(thresholds), progress
        self.sizes = sizes or ([64, 96] if tiny else [1024, 1328])
        self.batching_sizes = [self.sizes[0] // 2, self.sizes[0]]
        self.deadline = time.monotonic() + budget_s
        self.dtype = torch.float32 if tiny and device == "cpu" else torch.bfloat16
        self.gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
        self.peak = lookup_peak(self.gpu)
        self.layers_asked = layers
        name = re.sub(r"[^A-Za-z0-9]+", "-", self.gpu or f"cpu-{platform.machine()}").strip("-").lower()
        stamp = time.strftime("%Y-%m-%d")
        self.out = Path(out)
        self.stem = f"{name}{'-tiny' if tiny else ''}-{stamp}"
        self.result = {"format": "qwen-image-trt/gpu-check@1", "date": stamp, "device": device, "gpu": self.gpu,
                       "tiny": tiny, "dtype": str(self.dtype).replace("torch.", ""), "budget_s": budget_s,
                       "environment": self._environment(), "sections": {}}
        self.transformer = self.config = None

    # -- plumbing ---------------------------------------------------------------------------------------------
    def _environment(self) -> dict:
        env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
        for mod in ("diffusers", "onnxruntime", "tensorrt", "torchao"):
            try:
                env[mod] = __import__(mod).__version__
            except Exception as e:  # noqa: BLE001 - absent or broken: say which
                env[mod] = f"not importable ({type(e).__name__})"
        if self.device.startswith("cuda"):
            props = torch.cuda.get_device_properties(torch.device(self.device))
            env.update(cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}",
                       memory_gb=round(props.total_memory / 1e9, 1), sms=props.multi_processor_count)
        return env

    def run(self, sections=None) -> dict:
        plan = [("transformer", self.section_transformer), ("vae_decode", self.section_vae_decode),
                ("batching", self.section_batching), ("step_cache", self.section_step_cache),
                ("dropin_overhead", self.section_dropin_overhead), ("compile", self.section_compile),
                ("fp8", self.section_fp8), ("onnxruntime_cuda", self.section_onnxruntime_cuda),
                ("tensorrt", self.section_tensorrt)]
        for name, fn in plan:
            if sections and name not in sections:
                continue
            entry = {}
            t0 = time.perf_counter()
            if time.monotonic() > self.deadline:
                entry = {"status": "skipped", "reason": "time budget spent (--budget-s)"}
            else:
                self.progress(f"[gpu-check] {name} ...")
                try:
                    entry = {"status": "ok", **fn()}
                except Skip as e:
                    entry = {"status": "skipped", "reason": str(e)}
                except Exception as e:  # noqa: BLE001 - one broken section must not lose the others
                    entry = {"status": "error", "error": f"{type(e).__name__}: {e}",
                             "trace": traceback.format_exc(limit=4)[-1500:]}
                    if self.device.startswith("cuda"):
                        torch.cuda.empty_cache()
            entry["seconds"] = round(time.perf_counter() - t0, 2)
            self.result["sections"][name] = entry
            self.progress(f"[gpu-check] {name}: {entry['status']} ({entry['seconds']} s)"
                          + (f" - {entry.get('reason') or entry.get('error')}" if entry["status"] != "ok" else ""))
            self.write()
        return self.result

    def write(self) -> tuple[Path, Path]:
        self.out.mkdir(parents=True, exist_ok=True)
        j, m = self.out / f"{self.stem}.json", self.out / f"{self.stem}.md"
        j.write_text(json.dumps(self.result, indent=2, default=str) + "\n")
        m.write_text(render_markdown(self.result))
        return j, m

    # -- the model ----------------------------------------------------------------------------------------------
    def _transformer_config(self) -> dict:
        if self.tiny:
            from qwen_image_trt.models.tiny import TRANSFORMER_CONFIG

            return dict(TRANSFORMER_CONFIG)
        from qwen_image_trt.models.tiny import real_transformer_config

        return real_transformer_config(self._layers())

    def _layers(self) -> int:
        if self.layers_asked not in (None, "auto"):
            return int(self.layers_asked)
        if not self.device.startswith("cuda"):
            return 1
        free, _ = torch.cuda.mem_get_info(torch.device(self.device))
        # Weights take most; leave room for batch-16 activations at 1024^2, the VAE and compile workspaces.
        return max(1, min(60, int((free - 40e9) / BLOCK_BYTES_BF16)))

    def model(self):
        if self.transformer is None:
            from diffusers import QwenImageTransformer2DModel

            self.config = self._transformer_config()
            torch.manual_seed(0)
            with torch.device(self.device):
                self.transformer = QwenImageTransformer2DModel(**self.config).to(self.dtype).eval()
            self.result["model"] = {"layers": self.config["num_layers"],
                                    "params": sum(p.numel() for p in self.transformer.parameters()),
                                    "width": self.config["num_attention_heads"] * self.config["attention_head_dim"]}
        return self.transformer

    def inputs(self, size: int, batch: int, seed: int = 0) -> dict:
        grid = (1, size // 16, size // 16)
        g = torch.Generator(self.device).manual_seed(seed)
        c = self.config
        return dict(hidden_states=torch.randn(batch, grid[1] * grid[2], c["in_channels"], generator=g,
                                              device=self.device, dtype=self.dtype),
                    encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, c["joint_attention_dim"], generator=g,
                                                      device=self.device, dtype=self.dtype),
                    encoder_hidden_states_mask=torch.ones(batch, TEXT_TOKENS, dtype=torch.long, device=self.device),
                    timestep=torch.full((batch,), 0.5, device=self.device, dtype=self.dtype),
                    img_shapes=[[grid]] * batch, return_dict=False)

    def step_row(self, size: int, precision: str, images: int = 1, module=None) -> dict:
        """One CFG step (a forward over 2 x images samples) at size^2, against the FLOP floor."""
        module = module or self.model()
        feeds = self.inputs(size, 2 * images)
        with torch.no_grad():
            timing = time_call(lambda: module(**feeds), self.device, self.repeat)
        cost = flops.per_step(self.config, size, size, TEXT_TOKENS, batch=images, precision=precision)
        peak = self.peak.peak_flops(precision) if self.peak else None
        floor = cost.floor_seconds(peak, self.peak.bytes_per_s if self.peak else None)
        return {"size": size, "images": images, "precision": precision, "step_s": round(timing["median_s"], 5),
                "spread_s": [round(timing["min_s"], 5), round(timing["max_s"], 5)], "tflop": float(f"{cost.flops / 1e12:.4g}"),
                "floor_s": None if floor is None else round(floor, 5),
                "achieved_tflops": float(f"{cost.flops / timing['median_s'] / 1e12:.4g}"),
                "of_peak": None if not peak else round(cost.flops / timing["median_s"] / peak, 3)}

    # -- sections -----------------------------------------------------------------------------------------------
    def section_transformer(self) -> dict:
        self.model()
        return {"model": self.result["model"], "rows": [self.step_row(s, "bf16" if self.dtype == torch.bfloat16
                                                                       else "fp32") for s in self.sizes]}

    def section_vae_decode(self) -> dict:
        from diffusers import AutoencoderKLQwenImage

        from qwen_image_trt.models.tiny import VAE_CONFIG

        with torch.device(self.device):  # the class's defaults are Qwen-Image's VAE
            vae = (AutoencoderKLQwenImage(**VAE_CONFIG) if self.tiny else AutoencoderKLQwenImage()).to(self.dtype)
        vae.eval()
        size = self.sizes[0]
        scale = 2 ** (len(vae.config.dim_mult) - 1)
        latents = torch.randn(1, vae.config.z_dim, 1, size // scale, size // scale, device=self.device,
                              dtype=self.dtype)
        with torch.no_grad():
            timing = time_call(lambda: vae.decode(latents), self.device, max(2, self.repeat // 2))
        return {"size": size, "decode_s": round(timing["median_s"], 5),
                "spread_s": [round(timing["min_s"], 5), round(timing["max_s"], 5)]}

    def section_batching(self) -> dict:
        precision = "bf16" if self.dtype == torch.bfloat16 else "fp32"
        rows = []
        for size in self.batching_sizes:
            base = None
            for b in self.batch_sizes:
                row = self.step_row(size, precision, images=b)
                row["images_per_s_per_step"] = round(b / row["step_s"], 3)
                base = base or row["images_per_s_per_step"]
                row["gain_vs_batch1"] = round(row["images_per_s_per_step"] / base, 3)
                rows.append(row)
        return {"rows": rows}

    def section_step_cache(self) -> dict:
        from diffusers import FlowMatchEulerDiscreteScheduler

        from qwen_image_trt.runtime.cfg import combine_cfg
        from qwen_image_trt.runtime.step_cache import step_cache

        module, size = self.model(), self.sizes[0]
        feeds = self.inputs(size, 2, seed=1)
        holder = SimpleNamespace(transformer=module, _num_timesteps=self.steps)

        def loop(threshold):
            scheduler = FlowMatchEulerDiscreteScheduler()
            scheduler.set_timesteps(self.steps, device=self.device)
            latents = feeds["hidden_states"][:1].clone()
            with torch.no_grad(), step_cache(holder, threshold) as cache:
                for t in scheduler.timesteps:
                    both = module(**{**feeds, "hidden_states": torch.cat([latents, latents]),
                                     "timestep": (t / 1000).expand(2).to(self.dtype)})[0]
                    latents = scheduler.step(combine_cfg(*both.chunk(2), 4.0), t, latents, return_dict=False)[0]
            return latents.float(), cache

        base, _ = loop(None)
        base_t = time_call(lambda: loop(None), self.device, 1, warmup=0)["median_s"]
        rows = [{"threshold": 0, "skip_ratio": 0.0, "loop_s": round(base_t, 4), "speedup": 1.0, "rel_l2": 0.0}]
        for threshold in self.thresholds:
            box = {}
            t = time_call(lambda: box.update(zip(("latents", "cache"), loop(threshold))), self.device, 1,
                          warmup=0)["median_s"]
            rel = float((box["latents"] - base).norm() / base.norm().clamp_min(1e-12))
            rows.append({"threshold": threshold, "skip_ratio": round(box["cache"].stats.skip_ratio, 3),
                         "loop_s": round(t, 4), "speedup": round(base_t / t, 3), "rel_l2": round(rel, 5)})
        return {"size": size, "steps": self.steps, "rows": rows}

    def section_dropin_overhead(self) -> dict:
        from qwen_image_trt.models.transformer_export import ExportableTransformer
        from qwen_image_trt.runtime.backends.torch_runner import TorchRunner
        from qwen_image_trt.runtime.transformer import EngineTransformer

        module = self.model()
        saved = module.attn_processors  # the export wrapper swaps them for real-valued RoPE; put back after
        wrapper = ExportableTransformer(module)
        spec_inputs = ["hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep",
                       "img_rope_cos", "img_rope_sin", "txt_rope_cos", "txt_rope_sin"]
        try:
            runner = TorchRunner("transformer", lambda: wrapper, spec_inputs, ["noise_pred"], device=self.device)
            runner.activate()
            drop_in = EngineTransformer(runner, dict(self.config), device=self.device)
            feeds = self.inputs(self.sizes[0], 2)
            feeds = {**feeds, "hidden_states": feeds["hidden_states"].float(),
                     "encoder_hidden_states": feeds["encoder_hidden_states"].float(),
                     "timestep": feeds["timestep"].float()}
            captured = {}
            infer = runner.infer
            runner.infer = lambda f: (captured.update(f), infer(f))[1]
            with torch.no_grad():
                drop_in(**feeds)
                runner.infer = infer
                dropped = time_call(lambda: drop_in(**feeds), self.device, self.repeat)["median_s"]
                bare = time_call(lambda: runner.infer(captured), self.device, self.repeat)["median_s"]
        finally:
            module.set_attn_processor(saved)
        return {"size": self.sizes[0], "dropin_s": round(dropped, 5), "bare_runner_s": round(bare, 5),
                "overhead_s": round(dropped - bare, 5), "overhead_fraction": round((dropped - bare) / bare, 4)}

    def section_compile(self) -> dict:
        from qwen_image_trt.runtime.torch_fast import TorchOptions, apply_torch_options, check_torch_options

        options = check_torch_options(TorchOptions(compile=True, compile_backend=self.compile_backend), self.device)
        module = apply_torch_options(self.model(), options)
        precision = "bf16" if self.dtype == torch.bfloat16 else "fp32"
        t0 = time.perf_counter()
        with torch.no_grad():
            module(**self.inputs(self.sizes[0], 2))  # the first call compiles
        _sync(self.device)
        compile_s = time.perf_counter() - t0
        rows = [self.step_row(s, precision) for s in self.sizes]
        return {"compile_s": round(compile_s, 2), "graphs": module.compiled_graphs, "rows": rows}

    def section_fp8(self) -> dict:
        from qwen_image_trt.core.errors import InputError
        from qwen_image_trt.runtime.torch_fast import TorchOptions, apply_torch_options, check_torch_options

        try:
            options = check_torch_options(TorchOptions(fp8=True, compile=True), self.device)
        except InputError as e:
            raise Skip(str(e)) from None
        module = apply_torch_options(self.model(), options)
        with torch.no_grad():
            module(**self.inputs(self.sizes[0], 2))
        return {"rows": [self.step_row(s, "fp8") for s in self.sizes]}

    def section_onnxruntime_cuda(self) -> dict:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise Skip(f"onnxruntime not importable ({e})") from None
        providers = ort.get_available_providers()
        if "CUDAExecutionProvider" not in providers or not self.device.startswith("cuda"):
            raise Skip(f"no CUDAExecutionProvider on {self.device} (onnxruntime {ort.__version__} has "
                       f"{', '.join(providers)}): install onnxruntime-gpu to measure it")
        return self._engine_rows("onnxruntime")

    def section_tensorrt(self) -> dict:
        from qwen_image_trt.core.errors import QitrtError
        from qwen_image_trt.core.tensorrt import require_tensorrt

        if not self.device.startswith("cuda"):
            raise Skip(f"TensorRT engines run on a CUDA device (device is {self.device})")
        try:
            require_tensorrt(torch.device(self.device).index or 0)
        except QitrtError as e:
            raise Skip(str(e)) from None
        return self._engine_rows("tensorrt")

    def _engine_rows(self, backend: str, engines=None) -> dict:
        """Time the transformer engine of `engines`, or of a real-width 2-block checkpoint built here for `backend`
        (tiny: the tiny checkpoint), one forward over the CFG pair."""
        import subprocess
        import sys
        import tempfile

        from qwen_image_trt.core.manifest import read_manifest
        from qwen_image_trt.models import tiny
        from qwen_image_trt.models.transformer_export import input_names, sample_inputs
        from qwen_image_trt.runtime.backends import make_runner

        with tempfile.TemporaryDirectory() as tmp:
            if engines is None:
                root = (tiny.make_tiny_checkpoint(Path(tmp) / "ckpt") if self.tiny else
                        tiny.make_real_width_checkpoint(Path(tmp) / "ckpt", num_layers=2))
                engines = Path(tmp) / "engines"
                # `qitrt build` as a user runs it (the benchmarks do not reach into the build stage's code)
                subprocess.run([sys.executable, "-m", "qwen_image_trt.cli", "build", str(root), "--out",
                                str(engines), "--precision", "fp32" if self.tiny else "bf16", "--target", backend,
                                "--device", self.device], check=True)
            config = read_manifest(engines).checkpoint.transformer_config
            runner = make_runner(backend, "transformer", engines_dir=engines, device=self.device).activate()
            args = sample_inputs(config, batch=2, grid=(self.sizes[0] // 16,) * 2, text_len=TEXT_TOKENS)
            feeds = {n: a.to(self.device) for n, a in zip(input_names(config), args)}
            timing = time_call(lambda: runner.infer(feeds), self.device, self.repeat)
            runner.deactivate()
        return {"layers": config["num_layers"], "size": self.sizes[0], "forward_s": round(timing["median_s"], 5),
                "note": "per block: divide by layers, compare with the transformer rows / their layers"}


def render_markdown(result: dict) -> str:
    env, model = result["environment"], result.get("model", {})
    lines = [f"# GPU check: {result['gpu'] or result['device']} ({result['date']})", "",
             f"torch {env.get('torch')}, CUDA {env.get('cuda', '-')}, diffusers {env.get('diffusers')}, "
             f"onnxruntime {env.get('onnxruntime')}, TensorRT {env.get('tensorrt')}, torchao {env.get('torchao')}.",
             f"Transformer: {'tiny width' if result['tiny'] else 'real width'}, {model.get('layers', '?')} blocks, "
             f"{model.get('params', 0) / 1e9:.2f} B params, random weights, {result['dtype']}; text {TEXT_TOKENS} "
             "tokens; one step = one forward over the CFG pair.", ""]
    for name, s in result["sections"].items():
        lines.append(f"## {name}: {s['status']} ({s['seconds']} s)")
        if s["status"] != "ok":
            lines += ["", s.get("reason") or s.get("error", ""), ""]
            continue
        rows = s.get("rows")
        if rows:
            keys = list(rows[0])
            lines += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
        extra = {k: v for k, v in s.items() if k not in ("status", "seconds", "rows", "model")}
        if extra:
            lines += ["", ", ".join(f"{k}: {v}" for k, v in extra.items())]
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="One-call GPU check (see qwen_image_trt/bench/gpu_check.py).")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny width, small sizes: the CPU test's run")
    p.add_argument("--layers", default="auto", help="real-width blocks (default: as many of 60 as memory allows)")
    p.add_argument("--budget-s", type=float, default=450.0, help="sections starting later are skipped (default 450)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--sections", default=None, help="comma-separated subset, e.g. transformer,batching")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compile section")
    p.add_argument("--out", default="benchmarks/results/gpu")
    a = p.parse_args(argv)
    check = GpuCheck(a.device, tiny=a.tiny, layers=a.layers, out=a.out, budget_s=a.budget_s, repeat=a.repeat,
                     compile_backend=a.compile_backend)
    check.run(a.sections.split(",") if a.sections else None)
    j, m = check.write()
    print(m.read_text())
    print(f"written: {j} {m}")
    return 0
