"""`qitrt serve`: flags generated from ServerConfig's fields, turned into a ServerConfig once, here."""

from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, fields

from qwen_image_trt.serve.config import ServerConfig


def register(sub) -> None:
    p = sub.add_parser("serve", help="HTTP server: dynamic batching over one worker process per device",
                       description="OpenAI-compatible image server (POST /v1/images/generations, /v1/jobs, "
                                   "/health, /metrics). See docs/serving.md.")
    hints = typing.get_type_hints(ServerConfig)
    for f in fields(ServerConfig):
        meta = f.metadata
        if meta.get("positional"):
            p.add_argument(f.name, help=meta["help"])
            continue
        kind = hints[f.name]
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        default = None if f.default is MISSING else f.default
        if base is bool:
            p.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=default,
                           help=f"{meta['help']} (default: {'on' if default else 'off'})")
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=base, default=default,
                       help=f"{meta['help']} (default: {default})")
    p.set_defaults(func=_cmd_serve)


def config_from_args(a: argparse.Namespace) -> ServerConfig:
    return ServerConfig(**{f.name: getattr(a, f.name) for f in fields(ServerConfig)})


def _cmd_serve(a: argparse.Namespace) -> int:
    cfg = config_from_args(a)
    if cfg.ray:
        from qwen_image_trt.serve.ray_app import run_ray

        run_ray(cfg)
        return 0
    from qwen_image_trt.serve.server import run_server

    print(f"qitrt serve: {cfg.checkpoint} on {cfg.device_list()} at http://{cfg.host}:{cfg.port} "
          f"(api key {'on' if cfg.api_key else 'off'}; jobs in {cfg.resolved_jobs_dir})", flush=True)
    run_server(cfg)
    return 0
