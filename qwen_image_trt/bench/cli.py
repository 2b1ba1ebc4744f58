"""`qitrt bench offline`, `serve`, `chaos` and `batching`: flags become OfflineConfig / LoadConfig / ChaosConfig /
BatchingConfig here, once."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from qwen_image_trt.core.errors import InputError

SCRATCH, RECORDED = "runs/bench", "benchmarks/results"


def _out(a) -> str:
    """Where results go: --out, else the tracked folder with --record, else a git-ignored scratch folder."""
    if a.out is None:
        a.out = RECORDED if a.record else SCRATCH
    return a.out


def _csv(kind):
    def parse(text: str):
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}") from None

    return parse


def _sizes(text: str) -> list[tuple[int, int]]:
    from qwen_image_trt.core.shapes import parse_size as _size

    return [_size(item) for item in text.split(",")]


def register(sub) -> None:
    bench = sub.add_parser("bench", help="throughput/latency benchmarks (offline pipeline, or load on a server)",
                           description="Benchmarks with the physical limit beside every figure. See benchmarks/README.md.")
    bsub = bench.add_subparsers(dest="bench_command", required=True)

    p = bsub.add_parser("offline", help="time eager torch and engine backends on the same images, per component")
    p.add_argument("checkpoint")
    p.add_argument("--backends", type=_csv(str), default=["torch", "onnxruntime"],
                   help="comma-separated: torch,onnxruntime,tensorrt (eager torch is always measured as the baseline)")
    p.add_argument("--engines", nargs="+", default=[], metavar="DIR",
                   help="engine folders (one per precision); each backend runs every folder it can read")
    p.add_argument("--sizes", type=_sizes, default=[(1024, 1024)], help="WxH[,WxH...] (default 1024x1024)")
    p.add_argument("--batch", type=_csv(int), default=[1], help="images per call, e.g. 1,2,4")
    p.add_argument("--steps", type=int, default=4, help="denoising steps per call (default 4)")
    p.add_argument("--repeat", type=int, default=3, help="timed calls per cell; figures are medians (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per cell first (default 1)")
    p.add_argument("--no-cfg", dest="cfg", action="store_false", help="no negative prompt: one branch per step")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--torch-dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="eager torch dtype")
    p.add_argument("--prompt", default=None)
    _add_output(p, "offline")
    p.set_defaults(func=_cmd_offline)

    p = bsub.add_parser("serve", help="load generator against `qitrt serve` (closed and open loop)")
    p.add_argument("url", nargs="?", default=None, help="http://HOST:PORT of a running server (omit with --start)")
    p.add_argument("--start", metavar="CHECKPOINT", default=None,
                   help="start `qitrt serve CHECKPOINT` on a free local port first, stop it at the end")
    p.add_argument("--engines", default=None, help="with --start: passed to qitrt serve")
    p.add_argument("--backend", default=None, help="with --start: passed to qitrt serve")
    p.add_argument("--devices", default=None, help="with --start: passed to qitrt serve, e.g. cuda:0,cuda:1")
    p.add_argument("--max-batch-size", type=int, default=None, help="with --start: passed to qitrt serve")
    p.add_argument("--max-queue-delay-ms", type=float, default=None, help="with --start: passed to qitrt serve")
    p.add_argument("--serve-args", default="", help="with --start: more qitrt serve flags, one quoted string")
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for the started server")
    p.add_argument("--concurrency", type=_csv(int), default=[], help="closed-loop phases, e.g. 1,4,16")
    p.add_argument("--rate", type=_csv(float), default=[], help="open-loop phases (Poisson), requests/s, e.g. 0.5,1")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per phase (default 30)")
    p.add_argument("--requests", type=int, default=None, help="closed loop: requests per phase instead of --duration")
    p.add_argument("--size", default="1024x1024")
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the server's)")
    p.add_argument("--n", type=int, default=1, help="images per request")
    p.add_argument("--no-cfg", dest="cfg", action="store_false")
    p.add_argument("--timeout", type=float, default=600.0, help="client timeout per request, seconds")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests before the first phase")
    p.add_argument("--repeat", type=int, default=1, help="runs of each phase; the table shows the median run and "
                   "the spread of all")
    p.add_argument("--api-key", default=None)
    p.add_argument("--prompt", default=None)
    _add_output(p, "serve")
    p.set_defaults(func=_cmd_serve)
    _register_chaos(bsub)
    _register_batching(bsub)


def _register_batching(bsub) -> None:
    from qwen_image_trt.bench.batching import DEFAULT_DELAY_FRACTION, DEFAULT_MAX_DELAY_MS, DEFAULT_MIN_GAIN

    p = bsub.add_parser("batching", help="images/s against batch per backend and size: writes the batching "
                        "profile `qitrt serve --batching-profile FILE` reads",
                        description="Measures pipeline calls of 1, 2, 4 ... images per (backend, size, CFG mode) "
                        "and picks per size the largest batch that still gains and a queue delay. See "
                        "benchmarks/README.md and docs/serving.md.")
    p.add_argument("checkpoint")
    p.add_argument("--engines", default=None, metavar="DIR", help="engine folder the server will serve (needed for "
                   "onnxruntime/tensorrt)")
    p.add_argument("--backend", type=_csv(str), default=None, help="comma-separated: torch,onnxruntime,tensorrt "
                   "(default: onnxruntime with --engines, else torch; as `qitrt serve`)")
    p.add_argument("--sizes", type=_sizes, default=[(1024, 1024)], help="WxH[,WxH...] size buckets (default "
                   "1024x1024)")
    p.add_argument("--batch", type=_csv(int), default=[1, 2, 4, 8], help="images per call, with 1 (default 1,2,4,8)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps per call: the server's (default 20); the "
                   "queue delay scales with them")
    p.add_argument("--repeat", type=int, default=3, help="timed calls per cell; figures are medians (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per cell first (default 1)")
    p.add_argument("--cfg", default="on", choices=["on", "off", "both"], help="CFG modes to measure (the server "
                   "batches them apart; default on: requests with a negative prompt)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--torch-dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="eager torch dtype")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch and ONNX Runtime threads, as each server "
                   "worker gets (`qitrt serve --threads-per-worker`; cores / CPU workers) (default: torch's)")
    p.add_argument("--prompt", default=None)
    p.add_argument("--min-gain", type=float, default=DEFAULT_MIN_GAIN, help="a bigger batch is kept while its "
                   f"images/s is at least this times the previous one's (default {DEFAULT_MIN_GAIN})")
    p.add_argument("--delay-fraction", type=float, default=DEFAULT_DELAY_FRACTION, help="queue delay as a fraction "
                   f"of the batch-1 latency (default {DEFAULT_DELAY_FRACTION})")
    p.add_argument("--max-delay-ms", type=float, default=DEFAULT_MAX_DELAY_MS, help="cap on the queue delay "
                   f"(default {DEFAULT_MAX_DELAY_MS:g})")
    _add_output(p, "batching")
    p.set_defaults(func=_cmd_batching)


def _cmd_batching(a) -> int:
    _out(a)
    from qwen_image_trt.bench.batching import BatchingConfig, run_batching, summary_lines, write_profile

    backends = a.backend or (["onnxruntime"] if a.engines else ["torch"])
    cfg = BatchingConfig(checkpoint=a.checkpoint, backends=backends, engines=a.engines, sizes=a.sizes,
                         batches=a.batch, steps=a.steps, repeat=a.repeat, warmup=a.warmup, cfg=a.cfg, device=a.device,
                         torch_dtype=a.torch_dtype, prompt=a.prompt, min_gain=a.min_gain,
                         delay_fraction=a.delay_fraction, max_delay_ms=a.max_delay_ms, threads=a.threads,
                         progress=a.progress)
    cfg.check()  # refused before any output folder is made
    command = getattr(a, "command_line", None) or command_line(getattr(a, "argv", None))
    state = {}

    def update(profile):
        profile["command"] = command
        state["paths"] = write_profile(profile, a.out, a.tag, plots=a.plots)

    try:
        profile = run_batching(cfg, on_update=update)
    except KeyboardInterrupt:
        print(f"interrupted; partial results in {a.out} (marked incomplete: `qitrt serve` refuses them)",
              file=sys.stderr)
        return 130
    for line in summary_lines(profile):
        print(line)
    return _finish(profile, state)


def _register_chaos(bsub) -> None:
    p = bsub.add_parser("chaos", help="faults on a schedule against a started `qitrt serve` (two CPU workers); "
                                      "counts lost requests and jobs")
    p.add_argument("checkpoint", help="checkpoint folder (the tiny one: `qitrt tiny DIR`)")
    p.add_argument("--fault-seconds", type=float, default=600.0, help="length of the fault phase (default 600)")
    p.add_argument("--calm-seconds", type=float, default=120.0, help="the no-fault phase before it (default 120)")
    p.add_argument("--fault-every", type=float, default=40.0, help="seconds between faults (default 40)")
    p.add_argument("--clients", type=int, default=8, help="closed-loop clients of good requests (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve-args", default="", help="more qitrt serve flags, one quoted string")
    p.add_argument("--out", default=None, help=f"results folder: chaos.md, chaos.json (default {SCRATCH}; "
                   f"--record: {RECORDED})")
    p.add_argument("--record", action="store_true", help=f"write into {RECORDED} (tracked: results to commit)")
    p.set_defaults(func=_cmd_chaos)


def _cmd_chaos(a) -> int:
    _out(a)
    import json
    import platform
    from pathlib import Path

    from qwen_image_trt.bench.chaos import ChaosConfig, render_markdown, run_chaos

    cfg = ChaosConfig(a.checkpoint, fault_s=a.fault_seconds, calm_s=a.calm_seconds, fault_every_s=a.fault_every,
                      clients=a.clients, seed=a.seed, serve_args=shlex.split(a.serve_args), out=a.out,
                      on_progress=lambda line: print(line, file=sys.stderr, flush=True))
    result = run_chaos(cfg)
    machine = (f"{os.cpu_count()} CPU cores, {platform.machine()}, {time.strftime('%Y-%m-%d')}")
    out = Path(a.out)
    (out / "chaos.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "chaos.md").write_text(render_markdown(result, command_line(getattr(a, "argv", None)), machine))
    print(f"{out / 'chaos.md'}\ngood requests lost: {result['lost_good_requests']}, jobs lost: "
          f"{result['jobs']['lost']}")
    return 0 if result["lost_good_requests"] == 0 and result["jobs"]["lost"] == 0 else 1


def _add_output(p, kind: str) -> None:
    p.add_argument("--out", default=None, help=f"results folder (default {SCRATCH}, git-ignored; --record: "
                   f"{RECORDED})")
    p.add_argument("--record", action="store_true", help=f"write into {RECORDED} (tracked: results to commit)")
    p.add_argument("--tag", default=kind, help=f"file name stem: TAG.json, TAG.md, TAG_*.png (default {kind})")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def command_line(argv=None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    return "qitrt " + shlex.join(argv)


def _writer(a, command: str):
    from qwen_image_trt.bench.report import write_result

    state = {}

    def update(result):
        result["command"] = command
        state["paths"] = write_result(result, a.out, a.tag, plots=a.plots)

    return update, state


def _cmd_offline(a) -> int:
    _out(a)
    from qwen_image_trt.bench.offline import DEFAULT_PROMPT, OfflineConfig, run_offline

    cfg = OfflineConfig(checkpoint=a.checkpoint, backends=a.backends, engines=a.engines, sizes=a.sizes,
                        batches=a.batch, steps=a.steps, repeat=a.repeat, warmup=a.warmup, cfg=a.cfg, device=a.device,
                        torch_dtype=a.torch_dtype, prompt=a.prompt or DEFAULT_PROMPT, progress=a.progress)
    update, state = _writer(a, getattr(a, "command_line", None) or command_line(getattr(a, "argv", None)))
    try:
        result = run_offline(cfg, on_update=update)
    except KeyboardInterrupt:
        print(f"interrupted; partial results in {a.out}", file=sys.stderr)
        return 130
    return _finish(result, state)


def _cmd_serve(a) -> int:
    _out(a)
    from qwen_image_trt.bench.serve_load import DEFAULT_PROMPT, LoadConfig, ServerProcess, run_serve_load

    if (a.url is None) == (a.start is None):
        raise InputError("url", a.url, "either a server URL or --start CHECKPOINT (not both)")
    server = None
    url = a.url
    if a.start:
        extra = []
        for flag in ("engines", "backend", "devices", "max_batch_size", "max_queue_delay_ms"):
            value = getattr(a, flag)
            if value is not None:
                extra += ["--" + flag.replace("_", "-"), str(value)]
        extra += shlex.split(a.serve_args)
        from pathlib import Path

        server = ServerProcess(a.start, extra, log_path=Path(a.out) / f"{a.tag}_server.log",
                               start_timeout_s=a.start_timeout)
        print(f"starting: {' '.join(server.command)}", file=sys.stderr)
        server.start()
        url = server.url
    try:
        cfg = LoadConfig(url=url, concurrency=a.concurrency, rates=a.rate, duration_s=a.duration,
                         requests=a.requests, size=a.size, steps=a.steps, n=a.n, cfg=a.cfg,
                         request_timeout_s=a.timeout, warmup_requests=a.warmup, api_key=a.api_key, repeat=a.repeat,
                         prompt=a.prompt or DEFAULT_PROMPT, progress=a.progress)
        update, state = _writer(a, getattr(a, "command_line", None) or command_line(getattr(a, "argv", None)))
        try:
            result = run_serve_load(cfg, on_update=update, server=server.describe() if server else None)
        except KeyboardInterrupt:
            print(f"interrupted; partial results in {a.out}", file=sys.stderr)
            return 130
    finally:
        if server is not None:
            server.stop()
    return _finish(result, state)


def _finish(result: dict, state: dict) -> int:
    for kind, path in (state.get("paths") or {}).items():
        print(f"{kind:28s} {path}")
    for e in result.get("errors", []):
        print("error: " + ", ".join(f"{k}={v}" for k, v in e.items()), file=sys.stderr)
    return 0 if result.get("complete") and not result.get("errors") else 1
