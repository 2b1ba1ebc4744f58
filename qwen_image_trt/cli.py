"""`qitrt`: the command line. Arguments become typed calls once, here at the edge; library code never sees argparse.

Stage commands live next to their stage (`<subpackage>/cli.py` with `register(subparsers)`); a stage whose
optional dependencies are missing still shows up, as a command that says what to install.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from qwen_image_trt.core.errors import QitrtError

# module -> the commands it registers (listed so a module that fails to import can explain itself)
STAGE_COMMANDS = {
    "qwen_image_trt.calibration.cli": ["calibrate"],
    "qwen_image_trt.compile.cli": ["quantize", "build", "sensitivity", "lint"],
    "qwen_image_trt.serve.cli": ["serve"],
    "qwen_image_trt.bench.cli": ["bench"],
}


def _size(text: str) -> tuple[int, int]:
    from qwen_image_trt.core.shapes import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_core(sub) -> None:
    p = sub.add_parser("tiny", help="write a tiny random-weight Qwen-Image checkpoint (real classes); "
                       "--real-width: the real transformer config with N blocks; --sparse: the real model's "
                       "configs and sparse weight files, for sizing only")
    p.add_argument("out", help="folder to write (diffusers layout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--real-width", action="store_true", help="Qwen-Image's real transformer config (width 3072, "
                      "24 heads x 128, joint_attention_dim 3584) with --layers of its 60 blocks, random weights")
    kind.add_argument("--sparse", action="store_true", help="the real configs (60 blocks, Qwen2.5-VL-7B text "
                      "encoder) with weight files whose data is a sparse hole: plans and sizes, never runs")
    p.add_argument("--layers", type=int, default=None, help="transformer blocks for --real-width (default 1) or "
                   "--sparse (default 60)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="--real-width: weight dtype on disk "
                   "(bf16 like the real checkpoint)")
    p.add_argument("--pipeline", default="t2i",
                   choices=("t2i", "edit", "edit-plus", "edit-2511", "controlnet", "qwen-image-2.1",
                            "qwen-image-2.1-turbo"),
                   help="tiny checkpoint kind: the pipeline class its model_index.json names (edit kinds add a "
                   "Qwen2-VL processor; edit-2511 is Edit-Plus with zero_cond_t; controlnet adds a 2-block ControlNet; "
                   "qwen-image-2.1 is QwenImage21Pipeline: Qwen3-VL text encoder and processor, the 2.1 VAE, the "
                   "block-causal transformer with causal_condition; qwen-image-2.1-turbo the same with a 4-step "
                   "sample_sigmas grid, which diffusers runs as its Turbo modular pipeline) (default: t2i)")
    p.set_defaults(func=_cmd_tiny)

    p = sub.add_parser("export", help="export transformer and VAE to ONNX, checked and run once in ONNX Runtime")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="engine folder (manifest.json + *.onnx)")
    p.add_argument("--precision", default="auto", help="auto (the checkpoint's own dtype: bf16 for Qwen-Image) | "
                   "fp32 (reference builds) | fp16 | bf16 (default: auto)")
    p.add_argument("--components", default=None, help="comma-separated subset of transformer, vae_decoder, "
                   "vae_encoder, transformer_controlnet (default: the first three, and transformer_controlnet when "
                   "there is a ControlNet); for a Qwen-Image-2.1 checkpoint of transformer_uncached, "
                   "transformer_extract, transformer_cached, vae_decoder, vae_encoder (default: all)")
    p.add_argument("--controlnet", default=None, metavar="DIR", help="a QwenImageControlNetModel folder: also export "
                   "the transformer taking its residuals (default: the checkpoint's controlnet/ when it has one)")
    p.add_argument("--opset", type=int, default=None)
    p.add_argument("--force", action="store_true", help="re-export even when nothing changed")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", help="LoRA adapter PATH[:SCALE] (repeatable; diffusers/PEFT, kohya or Lightning .safetensors) "
                   "merged into the transformer's weights before export; the manifest records each file's hash and "
                   "scale")
    p.add_argument("--scheduler-config", default=None, metavar="NAME|FILE", help="the sampling recipe the engines "
                   "are made for, recorded in the manifest: lightning-4step | lightning-8step (Qwen-Image-Lightning's "
                   "scheduler and steps) or a JSON file {\"scheduler\": {...}, \"num_inference_steps\": N}")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("generate", help="generate one image, eager or with exported engines")
    _add_generation_args(p)
    p.add_argument("--prompt", required=True, help="what to draw")
    p.add_argument("--negative-prompt", default=None, help="turns true CFG on (use ' ' for an empty one)")
    p.add_argument("--true-cfg-scale", type=float, default=4.0, help="CFG strength, > 1 with a negative prompt")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--pipeline", default=None, help="family member to run the checkpoint as (default: the one its "
                   "model_index.json names): text-to-image | img2img | inpaint for Qwen-Image, edit | edit-inpaint "
                   "for Qwen-Image-Edit, edit-plus for Edit-2509/2511, controlnet (with --controlnet or a checkpoint's "
                   "controlnet/); qwen-image-2.1 | qwen-image-2.1-turbo (a checkpoint with sample_sigmas) for 2.1")
    p.add_argument("--control-image", default=None, metavar="PATH", help="the ControlNet's condition image "
                   "(controlnet member: canny, depth, pose... as the ControlNet was trained)")
    p.add_argument("--controlnet", default=None, metavar="DIR", help="QwenImageControlNetModel folder (default: the "
                   "checkpoint's controlnet/); engines need its transformer_controlnet graph")
    p.add_argument("--controlnet-scale", type=float, default=None, help="controlnet_conditioning_scale, in [0, 2] "
                   "(diffusers' default 1.0)")
    p.add_argument("--image", action="append", default=None, metavar="PATH", help="input image (edit, img2img, "
                   "inpaint); repeat for Edit-Plus's 1-3 condition images")
    p.add_argument("--mask", default=None, metavar="PATH", help="inpaint mask, white = repaint (inpaint, "
                   "edit-inpaint)")
    p.add_argument("--strength", type=float, default=None, help="how far from the input image, in (0, 1] "
                   "(img2img, inpaint; diffusers' default 0.6)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", help="LoRA adapter PATH[:SCALE] (repeatable; diffusers/PEFT, kohya or Lightning .safetensors) "
                   "loaded at run time (engines: weights swapped by name, no rebuild; torch: diffusers' PEFT path)")
    p.add_argument("--step-cache", type=float, default=None, metavar="THRESHOLD", help="skip transformer calls "
                   "while the first block's modulated input changed less than THRESHOLD (relative L1, accumulated) "
                   "since the last computed step, reusing its output; 0.1-0.3 is the usual range (docs/performance.md)")
    p.add_argument("--no-kv-cache", dest="kv_cache", action="store_false", help="Qwen-Image-2.1: run every step "
                   "through the uncached pass (the stock use_kv_cache=False) instead of computing the prompt's and "
                   "condition images' keys and values once")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("tiny-lora", help="write a random LoRA for a (tiny) checkpoint's transformer in a release "
                       "format diffusers reads: peft (diffusers' save_lora_weights), kohya, lightning")
    p.add_argument("checkpoint")
    p.add_argument("out", help=".safetensors file to write")
    p.add_argument("--format", default="peft", choices=("peft", "kohya", "lightning"), help="(default: peft)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank, 1-64 (default: 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strength", type=float, default=0.5, help="how far the adapter moves each weight, relative "
                   "to the weight's scale, in (0, 4] (default: 0.5)")
    p.set_defaults(func=_cmd_tiny_lora)

    p = sub.add_parser("parity", help="compare a backend's engines with eager torch; exits 1 if a gate fails")
    p.add_argument("checkpoint")
    p.add_argument("--engines", required=True)
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--out", required=True, help="report folder (report.json, report.html, images)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps of the per-step and image checks, >= 2 "
                   "(default: the steps of the recipe the engines were made for, else 4)")
    p.add_argument("--sizes", default=None, help="image sizes for the per-forward grid, e.g. 64x64,96x64")
    p.add_argument("--batches", default=None, help="batch sizes for the per-forward grid, e.g. 1,2")
    p.add_argument("--image-size", type=_size, default=None, help="WxH of the end-to-end images")
    p.add_argument("--gate", action="append", default=[], metavar="NAME=VALUE",
                   help="override a gate, e.g. --gate forward_cosine_min=0.999 (see docs/parity.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu | cuda[:N] (TensorRT engines need cuda)")
    p.add_argument("--reference-dtype", default="fp32", help="eager reference precision: fp32 | bf16 | fp16 "
                   "(bf16 for real checkpoints on one GPU)")
    p.add_argument("--step-cache", default=None, metavar="T[,T...]", help="also run the engine pipeline with the "
                   "step cache at each threshold and report steps skipped against image PSNR/SSIM (informational: "
                   "no gate)")
    _add_trt_args(p)
    p.set_defaults(func=_cmd_parity)

    p = sub.add_parser("quickstart", help="tiny model -> export -> generate with ONNX Runtime -> parity report")
    p.add_argument("--workdir", default="runs/quickstart")
    p.set_defaults(func=_cmd_quickstart)


def _add_generation_args(p) -> None:
    p.add_argument("checkpoint", help="checkpoint folder (diffusers layout)")
    p.add_argument("--engines", default=None, help="engine folder from `qitrt export`/`qitrt build` (default: none, "
                   "eager torch)")
    p.add_argument("--backend", default=None, help="torch | onnxruntime | tensorrt (default: onnxruntime "
                   "with --engines, else torch)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--seed", type=int, default=0, help="generator seed: the same seed gives the same image")
    p.add_argument("--steps", type=int, default=None, help="denoising steps, within the engine's limits (default: "
                   "the checkpoint's recommended: 50 for Qwen-Image, 4 for the tiny model)")
    p.add_argument("--height", type=int, default=None, help="a multiple of 16 within the engine's profile (default: "
                   "the first size the engine folder was built for, else the checkpoint's: 1024, tiny 64)")
    p.add_argument("--width", type=int, default=None, help="as --height")
    p.add_argument("--torch-fast", default=None, metavar="OPT[,OPT]", help="backend torch's fast path: compile "
                   "(torch.compile, text padded to buckets), fp8 (torchao float8 linears, GPUs with compute "
                   "capability >= 8.9), cuda_graphs (one CUDA graph per shape bucket); e.g. compile,fp8")
    _add_trt_args(p)


def _add_trt_args(p) -> None:
    p.add_argument("--trt-weight-streaming-budget", default=None, metavar="BYTES|FRACTION|auto",
                   help="TensorRT engines built with --weight-streaming: weights kept on the GPU, in bytes, as a "
                   "fraction of the streamable weights (0.5), or auto (default: the engine's own)")
    p.add_argument("--trt-cuda-graphs", action="store_true",
                   help="TensorRT: capture one CUDA graph per input shape and replay it (default: off)")


def _trt_options(a) -> dict:
    from qwen_image_trt.runtime.backends import trt_options

    return trt_options(a.trt_weight_streaming_budget, a.trt_cuda_graphs)


def _cmd_tiny(a) -> int:
    from pathlib import Path

    from qwen_image_trt.core.errors import InputError
    from qwen_image_trt.models import tiny

    if a.pipeline != "t2i" and (a.real_width or a.sparse):
        raise InputError("pipeline", a.pipeline, "t2i with --real-width or --sparse (edit kinds are tiny only)")
    if (a.layers is not None or a.dtype != "bf16") and not (a.real_width or a.sparse):
        raise InputError("layers/dtype", a.layers if a.layers is not None else a.dtype,
                         "only with --real-width or --sparse (the tiny checkpoint has a fixed config)")
    if a.out and Path(a.out).is_dir() and any(Path(a.out).iterdir()) and not a.overwrite:
        raise InputError("out", a.out, "a new or empty folder (or --overwrite to replace it)")
    if a.real_width or a.sparse:
        layers = a.layers if a.layers is not None else (1 if a.real_width else 60)
        if not 1 <= layers <= 60:
            raise InputError("layers", layers, "an integer in [1, 60] (Qwen-Image has 60 blocks)")
        if a.sparse and a.dtype != "bf16":
            raise InputError("dtype", a.dtype, "bf16 with --sparse (it describes the real bf16 checkpoint)")
        if a.sparse:
            print(tiny.make_sparse_checkpoint(a.out, num_layers=layers, overwrite=a.overwrite))
        else:
            print(tiny.make_real_width_checkpoint(a.out, num_layers=layers, seed=a.seed, dtype=a.dtype,
                                                  overwrite=a.overwrite))
        return 0
    if a.pipeline.startswith("qwen-image-2.1"):
        from qwen_image_trt.models.tiny21 import TURBO_SIGMAS, make_tiny_21_checkpoint

        print(make_tiny_21_checkpoint(a.out, seed=a.seed, overwrite=a.overwrite,
                                      sample_sigmas=TURBO_SIGMAS if a.pipeline.endswith("turbo") else None))
        return 0
    print(tiny.make_tiny_checkpoint(a.out, seed=a.seed, overwrite=a.overwrite, pipeline=a.pipeline))
    return 0


def _cmd_tiny_lora(a) -> None:
    from qwen_image_trt.core.errors import InputError
    from qwen_image_trt.models.checkpoint import validate_checkpoint
    from qwen_image_trt.models.tiny import make_tiny_lora

    if not 1 <= a.rank <= 64:
        raise InputError("rank", a.rank, "an integer in [1, 64]")
    if not 0 < a.strength <= 4:
        raise InputError("strength", a.strength, "a number in (0, 4]")
    if not str(a.out).endswith(".safetensors"):
        raise InputError("out", a.out, "a .safetensors file path")
    validate_checkpoint(a.checkpoint, parts=("transformer",))
    print(make_tiny_lora(a.checkpoint, a.out, fmt=a.format, rank=a.rank, seed=a.seed, strength=a.strength))


def _cmd_export(a) -> None:
    from qwen_image_trt.compile.export import DEFAULT_OPSET, export_onnx

    m = export_onnx(a.checkpoint, a.out, precision=a.precision,
                    components=a.components.split(",") if a.components else None, opset=a.opset or DEFAULT_OPSET,
                    force=a.force, loras=a.lora, sampling=a.scheduler_config, controlnet=a.controlnet)
    for name, c in m.components.items():
        check = c.check or {}
        ort = check.get("skipped") or f"ORT vs eager max|d|={check['max_abs_err_vs_eager']:.2e}"
        print(f"{name:12s} {c.precision:5s} {c.graph.file:18s} {c.graph.bytes / 1e6:9.1f} MB  export "
              f"{c.seconds:.1f}s  peak RSS {c.peak_rss_bytes / 1e9:.2f} GB  {ort}")
    print(f"manifest: {a.out}/manifest.json")


def _cmd_generate(a) -> None:
    from qwen_image_trt.runtime.generate import generate_image

    backend = a.backend or ("onnxruntime" if a.engines else "torch")
    path = generate_image(a.checkpoint, a.out, prompt=a.prompt, negative_prompt=a.negative_prompt, seed=a.seed,
                          steps=a.steps, height=a.height, width=a.width, engines=a.engines, backend=backend,
                          device=a.device, true_cfg_scale=a.true_cfg_scale, trt_options=_trt_options(a),
                          image=a.image, mask=a.mask, strength=a.strength, pipeline=a.pipeline, loras=a.lora,
                          step_cache=a.step_cache, torch_options=a.torch_fast, control_image=a.control_image,
                          controlnet=a.controlnet, controlnet_scale=a.controlnet_scale, kv_cache=a.kv_cache)
    print(path)


def _cmd_parity(a) -> int:
    from qwen_image_trt.parity.run import ParityConfig, run_parity

    cfg = ParityConfig.from_cli(a)
    report = run_parity(cfg)
    print(report.summary())
    print(f"report: {report.html_path}")
    return 0 if report.passed else 1


def _cmd_quickstart(a) -> int:
    from qwen_image_trt.quickstart import quickstart

    return quickstart(a.workdir)


# One example per command, shown at the end of its --help (the quick start's folders where they fit).
EXAMPLES = {
    "tiny": "qitrt tiny runs/tiny",
    "export": "qitrt export runs/tiny --out runs/engines-fp32 --precision fp32\n"
              "  qitrt export runs/tiny --out runs/engines-style --precision fp32 --lora runs/style.safetensors:0.8",
    "tiny-lora": "qitrt tiny-lora runs/tiny runs/style.safetensors --format kohya",
    "generate": "qitrt generate runs/tiny --engines runs/engines-fp32 --prompt 'a red fox' --out fox.png\n"
                "  qitrt generate runs/tiny-edit-plus --engines runs/engines-edit-plus --prompt 'the cat wears a hat' "
                "--image cat.png --image hat.png --out edit.png",
    "parity": "qitrt parity runs/tiny --engines runs/engines-fp32 --backend onnxruntime --out runs/parity",
    "quickstart": "qitrt quickstart",
    "calibrate": "qitrt calibrate runs/tiny --out runs/calib --num-prompts 8 --steps 4",
    "quantize": "qitrt quantize runs/tiny --graphs runs/engines-fp32 --calibration runs/calib --precision int8 "
                "--out runs/engines-int8",
    "build": "qitrt build /models/Qwen-Image --precision fp8 --out engines/fp8 --plan",
    "lint": "qitrt lint runs/engines-fp32",
    "serve": "qitrt serve runs/tiny --devices cpu,cpu --ui",
    "bench offline": "qitrt bench offline runs/tiny --engines runs/engines-fp32 --sizes 64x64 --batch 1,2",
    "bench serve": "qitrt bench serve --start runs/tiny --concurrency 1,4 --size 64x64 --steps 4",
    "bench chaos": "qitrt bench chaos runs/tiny --fault-seconds 120 --calm-seconds 30",
    "bench batching": "qitrt bench batching runs/tiny --engines runs/engines-fp32 --backend onnxruntime "
                      "--sizes 64x64,128x128 --batch 1,2,4 --steps 4 --out runs/batching --tag tiny",
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The default after every option whose help does not already say it; the example kept as written."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default in (None, False, argparse.SUPPRESS)
                or "%(default)" in text):
            return text
        return f"{text} (default: %(default)s)".strip()


def _document(parser: argparse.ArgumentParser, path: str = "") -> None:
    """Every (sub)command's --help gets its defaults and its example."""
    parser.formatter_class = _HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                _document(child, f"{path} {name}".strip())
    if path in EXAMPLES:
        parser.epilog = f"example:\n  {EXAMPLES[path]}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qitrt", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details, and show the Python "
                        "traceback of an error (by default an error is one line)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_core(sub)
    for module, commands in STAGE_COMMANDS.items():
        try:
            importlib.import_module(module).register(sub)
        except ModuleNotFoundError as e:
            for name in commands:
                stub = sub.add_parser(name, help=f"(unavailable: {e.name} is not installed)")
                stub.set_defaults(func=lambda a, e=e: _unavailable(e))
    _document(parser)
    return parser


def _unavailable(e: ModuleNotFoundError) -> int:
    print(f"error: this command needs the Python package {e.name!r}; install the matching extra, e.g. "
          f"pip install 'qwen-image-trt[all]'", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(map(str, argv))
    args = build_parser().parse_args(argv)
    args.argv = argv  # results record the command that made them
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error a user can cause is one line; the traceback is behind -v
        if args.verbose:
            traceback.print_exc()
        print(one_line_error(e, verbose=args.verbose), file=sys.stderr)
        return 2 if isinstance(e, QitrtError) else 1


def one_line_error(e: BaseException, verbose: bool = False) -> str:
    """Ours say what to fix; anything else is named with its type and where to see more."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, QitrtError):
        return f"error: {text}"
    if isinstance(e, OSError) and e.filename:
        text = f"{e.strerror or text}: {e.filename}"
    return f"error: {type(e).__name__}: {text}" + ("" if verbose else " (run with -v for the traceback)")


if __name__ == "__main__":
    sys.exit(main())
