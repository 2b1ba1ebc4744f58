"""`qitrt calibrate`."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="record transformer inputs from the real pipeline (true CFG on) over "
                       "shipped prompts, for int8/fp8 quantization")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="calibration folder (manifest.json + one shard per prompt)")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="prompts to run (default: 32 for real checkpoints, 8 for the tiny one)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per prompt (default 20; tiny 4)")
    p.add_argument("--seed", type=int, default=0, help="selects the prompts and derives each prompt's noise seed")
    p.add_argument("--sizes", default=None, help="WxH list the prompts cycle through (default 1024x1024; tiny 64x64)")
    p.add_argument("--holdout", type=int, default=None,
                   help="prompts kept out of calibration for parity checks (default num_prompts // 8)")
    p.add_argument("--record-every", type=int, default=None,
                   help="record every k-th step (default 2 for real checkpoints, 1 for tiny) to bound the set's size")
    p.add_argument("--device", default=None, help="cuda when a GPU is visible, else cpu")
    p.add_argument("--force", action="store_true", help="re-record even when the set is complete and unchanged")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="LoRA merged into the transformer while recording (repeatable): the same --lora arguments "
                   "as the export the quantized engine is made from")
    p.add_argument("--scheduler-config", default=None, metavar="NAME|FILE", help="sampling recipe to record with "
                   "(lightning-4step | lightning-8step | JSON file): the one the quantized engines are made for")
    p.set_defaults(func=_cmd_calibrate)


def _cmd_calibrate(a) -> int:
    from qwen_image_trt.calibration.capture import calibrate
    from qwen_image_trt.core.resources import default_device

    m = calibrate(a.checkpoint, a.out, num_prompts=a.num_prompts, steps=a.steps, sizes=a.sizes, seed=a.seed,
                  holdout=a.holdout, record_every=a.record_every, device=a.device or default_device(),
                  force=a.force, loras=a.lora, sampling=a.scheduler_config)
    t = m.totals
    state = f"{m.seconds:.1f}s" if m.ran else "unchanged, skipped"
    print(f"calibration set {m.set_id}: {t['prompts']} prompts, {t['calib_calls']} calibration + "
          f"{t['holdout_calls']} held-out forwards, {t['bytes'] / 1e6:.1f} MB ({state})")
    print(f"manifest: {a.out}/manifest.json")
    return 0
