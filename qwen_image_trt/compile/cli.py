"""`qitrt quantize`, `qitrt build`, `qitrt sensitivity`, `qitrt lint`."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("quantize", help="int8 (SmoothQuant) / fp8 (E4M3) Q/DQ ONNX transformer with NVIDIA ModelOpt, "
                       "calibrated on a `qitrt calibrate` set")
    p.add_argument("checkpoint")
    p.add_argument("--calibration", required=True, help="folder made by `qitrt calibrate` for this checkpoint")
    p.add_argument("--precision", required=True, help="int8 | fp8")
    p.add_argument("--out", required=True, help="engine folder (manifest.json, transformer.onnx, VAE graphs)")
    _add_recipe_args(p)
    p.add_argument("--graphs", required=True, help="`qitrt export` folder of this checkpoint: the high-precision "
                   "transformer the Q/DQ graph is written from, and the VAE graphs")
    p.add_argument("--sizes", default=None, help="sizes the engine must serve; the calibration set must cover each")
    p.add_argument("--device", default=None, help="calibration device (default: cuda when visible, else cpu)")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("build", help="export, calibrate, quantize, lint and build engines in one command, "
                       "skipping stages whose inputs did not change")
    p.add_argument("checkpoint")
    p.add_argument("--precision", required=True, help="bf16 | fp16 | int8 | fp8 (fp32 for reference builds)")
    p.add_argument("--target", default="onnxruntime", help="onnxruntime | tensorrt")
    p.add_argument("--out", required=True, help="engine folder (what --engines takes)")
    p.add_argument("--sizes", default=None, help="WxH sizes to serve and calibrate at, e.g. 1024x1024,1664x928 "
                   "(default 1024x1024; tiny 64x64)")
    p.add_argument("--max-batch", type=int, default=1, help="images per request (TensorRT profiles; CFG doubles it)")
    p.add_argument("--calibration", default=None, help="reuse this calibration set instead of recording one")
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="calibration denoising steps")
    p.add_argument("--seed", type=int, default=0, help="calibration seed")
    _add_recipe_args(p)
    p.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimization level")
    p.add_argument("--timing-cache", default=None, help="TensorRT timing cache file to reuse across builds")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None,
                   help="TensorRT: allow TF32 for fp32 layers (default: off for fp32 reference builds, on otherwise)")
    p.add_argument("--refittable", action="store_true", help="TensorRT: a transformer engine whose weights can be "
                   "replaced at run time (LoRA loaded without a rebuild)")
    p.add_argument("--weight-streaming", action="store_true", help="TensorRT: build an engine that can stream "
                   "weights from host memory (set the budget at run time: --trt-weight-streaming-budget)")
    p.add_argument("--no-resource-check", action="store_true",
                   help="build even when the up-front estimate says this machine cannot hold it")
    p.add_argument("--plan", action="store_true", help="print what the build would need (disk, host RAM, GPU memory, "
                   "time) against this machine, and exit without building")
    p.add_argument("--ort-level", default="basic", help="ONNX Runtime offline optimization level: basic | extended")
    p.add_argument("--device", default=None, help="device for calibration, quantization and TensorRT builds "
                   "(cuda[:N] or cpu; default: cuda when visible, else cpu)")
    p.add_argument("--force", action="store_true", help="re-run every stage")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="LoRA adapter merged into the transformer at export and calibrated with (repeatable; "
                   "diffusers/PEFT, kohya or Lightning .safetensors)")
    p.add_argument("--controlnet", default=None, metavar="DIR", help="a QwenImageControlNetModel folder: also build "
                   "the transformer taking its residuals (default: the checkpoint's controlnet/ when it has one)")
    p.add_argument("--scheduler-config", default=None, metavar="NAME|FILE", help="sampling recipe the engines are "
                   "made for (calibration runs it; the manifest records it): lightning-4step | lightning-8step or a "
                   "JSON file {\"scheduler\": {...}, \"num_inference_steps\": N}")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("sensitivity", help="quantize one block part at a time, measure each one's error in ONNX "
                       "Runtime, and write the recipe that keeps the fewest FLOPs in high precision for a target")
    p.add_argument("checkpoint")
    p.add_argument("--precision", required=True, help="int8 | fp8")
    p.add_argument("--target-cosine", type=float, default=None, metavar="C", help="worst held-out forward's cosine "
                   "vs the high-precision graph, in (0, 1), e.g. 0.999 (exactly one of the two targets)")
    p.add_argument("--target-psnr", type=float, default=None, metavar="DB", help="worst held-out forward's PSNR vs "
                   "the high-precision graph, dB in (0, 200), e.g. 40")
    p.add_argument("--out", default=None, help="folder for recipe.json, sensitivity.json/.md/.png and the work "
                   "files (default: runs/sensitivity/CHECKPOINT-PRECISION)")
    p.add_argument("--calibration", default=None, help="reuse this `qitrt calibrate` set (default: record one into "
                   "OUT/calibration with the checkpoint's calibration defaults)")
    p.add_argument("--graphs", default=None, help="reuse this high-precision `qitrt export` folder (default: export "
                   "into OUT/onnx in the checkpoint's own precision)")
    p.add_argument("--num-prompts", type=int, default=None, help="calibration prompts when recording the set here")
    p.add_argument("--steps", type=int, default=None, help="calibration denoising steps when recording the set here")
    p.add_argument("--seed", type=int, default=0, help="calibration seed (prompts, noise)")
    p.add_argument("--eval-calls", type=int, default=8, help="held-out forwards each graph is measured on, spread "
                   "evenly over the held-out set")
    p.add_argument("--no-verify", action="store_true", help="skip re-quantizing the written recipe with `qitrt "
                   "quantize` and measuring it")
    p.add_argument("--device", default=None, help="ModelOpt calibration device (default: cuda when visible, else cpu)")
    p.add_argument("--force", action="store_true", help="re-run every step, the per-unit table included")
    p.set_defaults(func=_cmd_sensitivity)
    p.epilog = ("example:\n  qitrt sensitivity runs/tiny --precision int8 --target-psnr 70 "
                "--out runs/sensitivity/tiny-int8\n  qitrt build runs/tiny --precision int8 "
                "--recipe runs/sensitivity/tiny-int8/recipe.json --calibration runs/sensitivity/tiny-int8/calibration "
                "--out runs/engines-int8-sensitivity")

    from qwen_image_trt.compile.lint import add_lint_parser

    add_lint_parser(sub)


def _add_recipe_args(p) -> None:
    p.add_argument("--keep", action="append", default=[], metavar="MODULE",
                   help="also keep in high precision: a block part (img_mlp, txt_mlp, attn, img_mod, ...) or a "
                   "module pattern (transformer_blocks.3.*); repeat or comma-separate")
    p.add_argument("--recipe", default=None, help="JSON file overriding recipe fields (see docs/quantization.md)")


def _keep(values) -> tuple:
    return tuple(k.strip() for v in values for k in v.split(",") if k.strip())


def _cmd_quantize(a) -> int:
    from qwen_image_trt.compile.quantize import quantize_onnx
    from qwen_image_trt.compile.recipe import load_recipe_file

    sizes = None
    if a.sizes:
        from qwen_image_trt.core.shapes import parse_sizes

        sizes = parse_sizes(a.sizes)
    from qwen_image_trt.core.resources import default_device

    m = quantize_onnx(a.checkpoint, a.calibration, a.out, a.precision, graphs=a.graphs,
                      recipe=load_recipe_file(a.recipe) if a.recipe else None, keep=_keep(a.keep),
                      sizes=sizes, device=a.device or default_device(), force=a.force)
    name = "transformer" if "transformer" in m.components else "transformer_cached"  # 2.1: its two graphs
    t = m.components[name]
    q = m.quantization
    state = f"{t.seconds:.1f}s" if m.ran else "unchanged, skipped"
    chk = t.check or {}
    check = chk.get("skipped") or (f"ONNX Runtime on held-out calls: mismatch vs ModelOpt fake-quant "
                                   f"{chk['mismatch']:.3f} (x quantization error), error vs high precision "
                                   f"{chk['block_rel_err']:.3f} (x the quantized blocks' contribution)")
    graphs = [n for n in m.components if n.startswith("transformer")]
    size = sum(m.components[n].graph.bytes for n in graphs) / 1e6
    print(f"{'+'.join(graphs)} {a.precision}: {len(q.quantized_layers)} layers quantized, {len(q.kept_layers)} "
          f"kept; {size:.1f} MB; {check} ({state})")
    print(f"manifest: {a.out}/manifest.json")
    return 0


def _cmd_build(a) -> int:
    from qwen_image_trt.compile.stages import BuildOptions, build

    opts = BuildOptions(precision=a.precision, target=a.target, sizes=a.sizes, max_batch=a.max_batch,
                        calibration=a.calibration, num_prompts=a.num_prompts, steps=a.steps, seed=a.seed,
                        keep=_keep(a.keep), recipe=a.recipe, opt_level=a.opt_level, ort_level=a.ort_level,
                        device=a.device, force=a.force, timing_cache=a.timing_cache, tf32=a.tf32,
                        weight_streaming=a.weight_streaming, check_resources=not a.no_resource_check,
                        refittable=a.refittable, sampling=a.scheduler_config,
                        report=lambda text: print(text, flush=True), plan_only=a.plan, loras=tuple(a.lora),
                        controlnet=a.controlnet)
    result = build(a.checkpoint, a.out, opts)
    if a.plan:
        problems = result.plan.problems()
        print("fits this machine" if not problems else "does not fit this machine:\n  - " + "\n  - ".join(problems))
        return 0 if not problems else 1
    print(result.summary())
    print(f"engines: {a.out} (qitrt generate CHECKPOINT --engines {a.out} --backend {a.target})")
    return 0


def _cmd_sensitivity(a) -> int:
    from qwen_image_trt.compile.sensitivity import run_sensitivity

    result = run_sensitivity(a.checkpoint, a.precision, target_cosine=a.target_cosine, target_psnr=a.target_psnr,
                             out_dir=a.out, calibration=a.calibration, graphs=a.graphs, num_prompts=a.num_prompts,
                             steps=a.steps, seed=a.seed, eval_calls=a.eval_calls, verify=not a.no_verify,
                             device=a.device, force=a.force, command=["qitrt", *getattr(a, "argv", [])])
    print(result.summary())
    return 0
