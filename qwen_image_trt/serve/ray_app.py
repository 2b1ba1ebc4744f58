"""`qitrt serve --ray`: the encoder and the denoiser as Ray Serve deployments, on one host or a cluster.

    ingress (FastAPI, the OpenAI images API) --> denoiser replicas (one per GPU) --> encoder replica(s)

- **encoder**: serve/encoder_service.py's EncoderService (text encoder + embedding cache) in a replica; prompts of
  concurrent callers are encoded together (`@serve.batch`). Embeddings go back through Ray's object store as
  tensors (binary, never JSON).
- **denoiser**: `load_pipeline` without a text encoder, its prompts fetched from the encoder deployment through a
  DeploymentHandle, behind the replica's own embedding cache, and worker.run_batch as the batch runner, the same
  code and the same per-image generators as `qitrt serve`, so a request's image equals its unbatched twin.
  Batching is Ray's `@serve.batch` (max `--max-batch-size` requests, `--max-queue-delay-ms`): Ray splits a batch by
  multiplexed model id, and every request carries its batch key (size, steps, CFG, member, adapter set, step
  cache) as that id, so a batch only ever holds requests our own batcher would have put together: the same
  per-request exactness, without a second queue inside the replica.
- **routing**: the batch key is also the multiplexed model id (`@serve.multiplexed`): Ray sends a request to a
  replica that already holds that key warm (its shapes compiled, its adapters loaded) before any other.
- **failures**: a replica lost mid-batch (its process killed, its node gone) fails the call with an actor error;
  the ingress sends the request again, to another replica, up to `--max-retries` times: none is lost.
- **backpressure and scaling**: `max_queued_requests` (`--max-queue-size`) per deployment handle: beyond it the
  ingress answers 429 + Retry-After; `--ray-replicas N` fixed, or `auto` (Ray's autoscaler between 1 and the GPUs
  it sees, target 2 ongoing requests per replica).

Endpoints: POST /v1/images/generations and /v1/images/edits (the same request model, checks and error shapes as
`qitrt serve`; an edit's condition images are encoded by the encoder deployment with its prompt), GET /health and
GET /metrics (the ingress's Prometheus registry). Async jobs stay on the one-host server (a local job store).
"""

# No `from __future__ import annotations`: Ray pickles the route methods by value, and FastAPI must find
# `Request` in their annotations as an object there, not as a name to look up in globals the pickle left behind.

import asyncio
import logging
import os
import time
from dataclasses import asdict

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from qwen_image_trt.serve.bodies import BodyReader

log = logging.getLogger(__name__)
RETRYABLE = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "ActorUnschedulableError")


def _require_ray():
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as e:
        from qwen_image_trt.core.errors import InputError

        raise InputError("ray", True, f"Ray Serve installed (pip install 'qwen-image-trt[ray]'): {e}") from None


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES to the replica's GPU


class _NoProgress:
    """run_batch reports steps to a worker pipe; a Ray replica has none to report to."""

    def send(self, msg) -> None:
        pass


class _NeverCancelled:
    value = -1


def key_id(key: tuple) -> str:
    """A request's batch key as a multiplexed model id (a string Ray routes and splits batches by)."""
    return "|".join(str(x) for x in key)


def build_app(cfg):
    """The Ray Serve application for `cfg` (a ServerConfig with `ray` set)."""
    _require_ray()
    from ray import serve

    cfg_dict = asdict(cfg)
    cfg_dict.pop("batching_limits", None)
    on_gpu = any(d.startswith("cuda") for d in cfg.device_list())
    replica_resources = {"num_gpus": 1} if on_gpu else {"num_cpus": cfg.ray_cpus_per_replica}
    delay_s = cfg.queue_delay_ms / 1000
    max_batch = cfg.max_batch_size or 8
    replicas = cfg.ray_replicas
    scaling = ({"num_replicas": "auto", "autoscaling_config": {"min_replicas": 1, "max_replicas": max(1, len(
        cfg.device_list())), "target_ongoing_requests": 2}} if replicas == "auto" else {"num_replicas": int(replicas)})

    @serve.deployment(name="encoder", ray_actor_options=replica_resources, max_ongoing_requests=256)
    class Encoder:
        def __init__(self, config: dict):
            from qwen_image_trt.serve.config import ServerConfig
            from qwen_image_trt.serve.encoder_service import EncoderService

            self.service = EncoderService(ServerConfig(**{**config, "role": "encoder", "encoder_url": None,
                                                          "ray": False, "devices": _device()}))
            self.service.load()

        def identity(self) -> str:
            return self.service.identity

        @serve.batch(max_batch_size=64, batch_wait_timeout_s=delay_s)
        async def encode(self, prompt_lists: list[list[str]]) -> list[tuple]:
            from qwen_image_trt.serve.encoder_service import encode_groups

            return await asyncio.to_thread(encode_groups, prompt_lists, self.service._encode)

        async def __call__(self, prompts: list[str]):
            return await self.encode(prompts)

        async def encode_with_images(self, prompts: list[str], images_png: list[str], image_list: bool):
            """An edit's prompts with its condition images (PNG): one call, not batched with others."""
            from qwen_image_trt.serve.encoder_service import _png_image

            images = [_png_image(b) for b in images_png]
            return await asyncio.to_thread(self.service._encode, prompts, images if image_list else images[0])

    @serve.deployment(name="denoiser", ray_actor_options=replica_resources, max_ongoing_requests=2 * max_batch,
                      max_queued_requests=cfg.max_queue_size, **scaling)
    class Denoiser:
        def __init__(self, config: dict, encoder):
            import torch

            from qwen_image_trt.runtime.embed_cache import EmbeddingCache, cache_prompt_embeddings
            from qwen_image_trt.runtime.pipeline import load_pipeline
            from qwen_image_trt.serve.encoder_service import text_encoder_identity
            from qwen_image_trt.serve.worker import Pipelines

            self.device = _device()
            if self.device == "cpu" and config.get("threads_per_worker"):
                torch.set_num_threads(config["threads_per_worker"])
            self.encoder = encoder
            self.identity = text_encoder_identity(config["checkpoint"])
            self.encoder_checked = False  # on the first request: a constructor runs in the replica's event loop
            dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
            pipe = load_pipeline(config["checkpoint"], engines=config["engines"], backend=config["backend"] or (
                "onnxruntime" if config["engines"] else "torch"), device=self.device, dtype=dtype, text_encoder=False)
            cache = EmbeddingCache(config["embedding_cache_bytes"]) if config["embedding_cache_bytes"] else None

            def prepare(p):  # this pipeline and every member made later (img2img, inpaint, edit-inpaint)
                self._prompts_from_encoder(p)
                if cache is not None:
                    cache_prompt_embeddings(p, cache)

            prepare(pipe)
            self.pipes = Pipelines(pipe, prepare=prepare)
            self.warm_keys: list[str] = []
            self.batches = 0

        def _prompts_from_encoder(self, pipe) -> None:
            from qwen_image_trt.serve.remote_encoder import install_prompt_source

            encoder = self.encoder  # blocking on a handle is fine here: pipelines run in worker threads
            install_prompt_source(pipe, lambda prompts: encoder.remote(prompts).result(),
                                  lambda prompts, pngs, is_list: encoder.encode_with_images.remote(
                                      prompts, pngs, is_list).result())

        @serve.multiplexed(max_num_models_per_replica=16)
        async def warm(self, key: str) -> str:
            """What 'loaded' means for a batch key: this replica has run it (shapes compiled, adapters in); Ray
            routes later requests with the key here first."""
            self.warm_keys.append(key)
            return key

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=delay_s)
        async def generate(self, items: list[dict]) -> list[dict]:
            from qwen_image_trt.serve.worker import run_batch

            key = tuple(tuple(x) if isinstance(x, list) else x for x in items[0]["key"])
            self.batches += 1
            images, compute_s = await asyncio.to_thread(run_batch, self.pipes, self.batches, key, items,
                                                        _NoProgress(), _NeverCancelled())
            n = sum(it["n"] for it in items)
            return [{"images": images[it["request_id"]], "compute_s": compute_s, "batch_images": n,
                     "replica_pid": os.getpid()} for it in items]

        async def __call__(self, item: dict) -> dict:
            if not self.encoder_checked:
                theirs = await self.encoder.identity.remote()
                if theirs != self.identity:
                    raise RuntimeError(f"the encoder deployment serves text encoder {theirs}; this checkpoint's is "
                                       f"{self.identity}")
                self.encoder_checked = True
            await self.warm(serve.get_multiplexed_model_id())
            return await self.generate(item)

    app = FastAPI(title="qitrt serve --ray", description="OpenAI-compatible image generation on Ray Serve; see "
                  "docs/serving.md")

    @serve.deployment(name="ingress", max_ongoing_requests=4 * cfg.max_queue_size,
                      ray_actor_options={"num_cpus": 0})
    @serve.ingress(app)
    class Ingress:
        def __init__(self, config: dict, denoiser):
            from qwen_image_trt.serve.config import ServerConfig

            self.denoiser = denoiser
            self.http = IngressHttp(ServerConfig(**config))  # made here: a metrics registry does not pickle

        @app.post("/v1/images/generations")
        async def generations(self, request: Request):
            return await self.http.generations(request, self.denoiser)

        @app.post("/v1/images/edits")
        async def edits(self, request: Request):
            return await self.http.generations(request, self.denoiser, edit=True)

        @app.get("/health")
        async def health(self):
            return self.http.health()

        @app.get("/metrics")
        async def metrics(self):
            return self.http.metrics()

    encoder = Encoder.bind(cfg_dict)
    return Ingress.bind(cfg_dict, Denoiser.bind(cfg_dict, encoder))


class IngressHttp(BodyReader):
    """The HTTP side: the same request model, checks and error shapes as `qitrt serve`, and the retry on a lost
    replica. (The API-key check runs here: Ray's proxy is in front of any middleware we could add.)"""

    def __init__(self, cfg):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        from qwen_image_trt.models.pipelines import pipeline_kind
        from qwen_image_trt.runtime.limits import request_limits

        self.cfg = cfg
        self.limits = request_limits(cfg.engines, cfg.checkpoint)
        self.kind = pipeline_kind(cfg.checkpoint)
        r = self.registry = CollectorRegistry()
        self.requests = Counter("qitrt_requests", "HTTP answers by endpoint and status", ["endpoint", "outcome"],
                                registry=r)
        self.retries = Counter("qitrt_ray_retries", "requests sent again after their replica was lost", registry=r)
        self.latency = Histogram("qitrt_request_seconds", "request latency at the ingress", registry=r)

    def fail(self, status: int, body: dict, headers=None, endpoint: str = "/v1/images/generations") -> JSONResponse:
        self.requests.labels(endpoint, str(status)).inc()
        return JSONResponse(body, status_code=status, headers=headers)

    def authorized(self, request: Request) -> bool:
        import hmac

        if not self.cfg.api_key:
            return True
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        return hmac.compare_digest(given.encode(), self.cfg.api_key.encode())

    async def generations(self, request: Request, denoiser, edit: bool = False):
        """POST /v1/images/generations, or /v1/images/edits (JSON with base64 images or OpenAI's multipart form)."""
        import base64
        import random

        from pydantic import ValidationError

        from qwen_image_trt.core.errors import InputError
        from qwen_image_trt.serve.bodies import _Refused
        from qwen_image_trt.serve.protocol import check_params, error_body, validation_error_body

        cfg, t0 = self.cfg, time.perf_counter()
        endpoint = "/v1/images/edits" if edit else "/v1/images/generations"
        if not self.authorized(request):
            return self.fail(401, error_body("a valid API key is required", "invalid_request_error",
                                             param="Authorization"), {"WWW-Authenticate": "Bearer"}, endpoint)
        try:
            req = await self.parse(request, cfg.max_image_body_bytes if edit else cfg.max_body_bytes)
            params = await asyncio.to_thread(check_params, req, cfg, self.limits,
                                             lambda cfg_on: cfg.max_batch_size or 8, self.kind, edit)
        except _Refused as e:
            return self.fail(e.status, error_body(e.message, "invalid_request_error", param=e.param,
                                                  allowed=e.allowed), {"Connection": "close"}, endpoint)
        except ValidationError as e:
            return self.fail(422, validation_error_body(e), None, endpoint)
        except InputError as e:
            return self.fail(400, error_body(str(e), "invalid_request_error", param=e.field, allowed=e.allowed),
                             None, endpoint)
        request_id = f"{time.time_ns():x}{random.randrange(1 << 16):04x}"
        item = {"request_id": request_id, "prompt": params.prompt, "negative_prompt": params.negative_prompt,
                "n": params.n, "seed": params.seed, "true_cfg_scale": params.true_cfg_scale,
                "images": params.images, "mask": params.mask, "key": list(params.key)}
        # One batch key, one multiplexed id: Ray's batch then holds requests run_batch can run together (the edit
        # members' requests co-batched per step, runtime.co_batch).
        model_id = key_id(params.key)
        handle = denoiser.options(multiplexed_model_id=model_id)
        for attempt in range(cfg.max_retries + 1):
            try:
                out = await handle.remote(item)
                break
            except Exception as e:  # noqa: BLE001 - sorted by kind below
                name = type(e).__name__
                if name == "BackPressureError":
                    return self.fail(429, error_body(f"the queue is full ({e}); retry later", "queue_full",
                                                     code="queue_full"), {"Retry-After": "1"}, endpoint)
                if name in RETRYABLE and attempt < cfg.max_retries:
                    self.retries.inc()
                    log.warning("replica lost (%s); sending request %s again", name, item["request_id"])
                    continue
                status = 503 if name in RETRYABLE else 500
                return self.fail(status, error_body(f"{name}: {e}", "unavailable" if status == 503 else
                                                    "pipeline_error"),
                                 {"Retry-After": str(cfg.drain_retry_after_s)} if status == 503 else None, endpoint)
        self.latency.observe(time.perf_counter() - t0)
        self.requests.labels(endpoint, "200").inc()
        body = {"created": int(time.time()), "data": [{"b64_json": base64.b64encode(png).decode()}
                                                      for png in out["images"]]}
        return JSONResponse(body, headers={"X-Batch-Images": str(out["batch_images"]),
                                           "X-Compute-Time-Ms": f"{out['compute_s'] * 1e3:.1f}",
                                           "X-Replica-Pid": str(out["replica_pid"]), "X-Attempts": str(attempt + 1)})

    def health(self) -> JSONResponse:
        from ray import serve

        status = serve.status()
        apps = {name: {"status": str(a.status), "deployments": {d: str(s.status) for d, s in a.deployments.items()}}
                for name, a in status.applications.items()}
        ready = bool(apps) and all(str(s).endswith("HEALTHY") for a in apps.values()
                                   for s in a["deployments"].values())
        return JSONResponse({"status": "ok" if ready else "unavailable", "ready": ready, "role": "ray",
                             "applications": apps, "workers": [{"ready": ready}]}, status_code=200 if ready else 503)

    def metrics(self) -> Response:
        from prometheus_client import generate_latest

        return Response(generate_latest(self.registry), media_type="text/plain; version=0.0.4")


def run_ray(cfg) -> None:
    """Deploy on the cluster at `--ray-address` (or a local one) and keep serving until interrupted."""
    _require_ray()
    import ray
    from ray import serve

    from qwen_image_trt.core.errors import InputError
    from qwen_image_trt.serve.encoder_service import text_encoder_identity

    ray.init(address=cfg.ray_address, ignore_reinit_error=True, log_to_driver=False)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name="qitrt", route_prefix="/")
    theirs = serve.get_deployment_handle("encoder", app_name="qitrt").identity.remote().result()
    if theirs != text_encoder_identity(cfg.checkpoint):  # the denoisers check too, on their first request
        serve.shutdown()
        raise InputError("checkpoint", cfg.checkpoint, f"the checkpoint the encoder deployment loaded (text encoder "
                         f"{theirs}); the cluster's copy differs from this one")
    print(f"qitrt serve --ray: http://{cfg.host}:{cfg.port} (Ray dashboard: {ray.get_runtime_context().gcs_address})",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
