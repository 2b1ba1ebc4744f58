"""`qitrt serve --role encoder`: the text encoder as its own service, in front of denoisers on other devices.

Two of the services this project grew from split the 7 B Qwen2.5-VL encoder from the 20 B transformer: the
encoder runs once per prompt on its own (cheaper) device, every transformer GPU only denoises. This process holds
the tokenizer and text encoder of the checkpoint on `--devices`' first device, an embedding cache (runtime.
embed_cache) and a micro-batcher: prompts arriving within `--max-queue-delay-ms` of each other are encoded in one
text-encoder call (distinct prompts only). Routes:

- POST /v1/encode {"prompts": [...]} -> `application/x-safetensors`: tensors `embeds` [N, L, D] (the encoder's
  dtype) and `mask` [N, L] (int64), metadata `encoder_identity`. Binary, never JSON lists (a 1024-token bf16
  embedding is 7 MB as safetensors, ~4x that as JSON text).
- POST /v1/encode {"prompts": [...], "images": [base64 PNG, ...]}: an edit's prompts with its condition images
  (the Edit pipelines' vision-language path), encoded as one call, not batched with others.
- POST /v1/encode_image (safetensors `image` [B, 3, 1, H, W]) -> `latents`: the pipelines' `_encode_vae_image`
  (argmax of the VAE posterior, so no generator crosses the wire).
- GET /health (open): role, readiness, encoder identity, cache counts. GET /metrics: Prometheus.

The identity is core.identity's fingerprint of the checkpoint's text_encoder and vae folders; a denoiser compares it
with its own checkpoint's before it takes traffic (serve/remote_encoder.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request  # at module level: the routes' annotations are resolved here
from fastapi.responses import JSONResponse, Response

from qwen_image_trt.serve.config import ServerConfig

log = logging.getLogger(__name__)
MAX_PROMPTS = 64  # per POST /v1/encode
CONTENT_TYPE = "application/x-safetensors"


def text_encoder_identity(checkpoint) -> str:
    """What the encoder role computes depends on: the text encoder and the VAE (it encodes edit inputs too)."""
    from qwen_image_trt.core.identity import checkpoint_identity

    return checkpoint_identity(checkpoint, parts=("text_encoder", "vae"))


def encode_groups(groups: list[list[str]], encode) -> list[tuple]:
    """Several callers' prompts in one encoder call (distinct prompts only); each caller gets its rows back, trimmed
    to its own longest prompt, as if it had been encoded alone. Used by this service's batcher and Ray's."""
    distinct = list(dict.fromkeys(p for prompts in groups for p in prompts))
    embeds, mask = encode(distinct)
    row = {p: i for i, p in enumerate(distinct)}
    out = []
    for prompts in groups:
        idx = [row[p] for p in prompts]
        length = int(mask[idx].sum(dim=1).max())
        out.append((embeds[idx, :length], mask[idx, :length]))
    return out


class EncoderService:
    """The text encoder of a checkpoint behind an embedding cache and a micro-batcher."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.identity = text_encoder_identity(cfg.checkpoint)
        self.pipe = None
        self.ready = False
        self._queue: asyncio.Queue | None = None
        self.calls = 0  # text-encoder calls made
        self.prompts_encoded = 0

    def load(self) -> None:
        import torch

        from qwen_image_trt.models import checkpoint as ckpt
        from qwen_image_trt.models.pipelines import load_eager_parts, pipeline_kind, stock_class
        from qwen_image_trt.runtime.embed_cache import EmbeddingCache, cache_prompt_embeddings

        root = ckpt.validate_checkpoint(self.cfg.checkpoint, parts=("text_encoder", "vae"))
        ckpt.refuse_21(root, "the encoder service")
        device = self.cfg.device_list()[0]
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
            self.cfg.dtype, torch.bfloat16 if device.startswith("cuda") else torch.float32)
        if device == "cpu" and self.cfg.threads_per_worker:
            torch.set_num_threads(self.cfg.threads_per_worker)
        kind = pipeline_kind(root)
        # The checkpoint's own member (img2img for a text-to-image one: it has _encode_vae_image) without a
        # transformer: its _get_qwen_prompt_embeds and _encode_vae_image are what the denoisers would run.
        member = "img2img" if kind == "text-to-image" else kind
        parts = load_eager_parts(root, device, dtype, member)
        parts["scheduler"] = None
        self.pipe = stock_class(member)(transformer=None, vae=ckpt.load_vae(root, dtype).to(device).eval(), **parts)
        self.pipe.encoder_identity = self.identity
        if self.cfg.embedding_cache_bytes:
            cache_prompt_embeddings(self.pipe, EmbeddingCache(self.cfg.embedding_cache_bytes))
        self.device = device
        self.ready = True

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        await asyncio.to_thread(self.load)
        self._task = asyncio.create_task(self._batch_loop())

    async def stop(self) -> None:
        if getattr(self, "_task", None):
            self._task.cancel()

    async def encode(self, prompts: list[str]):
        """(embeds [N, L, D], mask [N, L]) for `prompts`, batched with other callers' prompts."""
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((prompts, future))
        return await future

    async def _batch_loop(self) -> None:
        delay = self.cfg.queue_delay_ms / 1000
        while True:
            waiting = [await self._queue.get()]
            deadline = time.monotonic() + delay
            while sum(len(p) for p, _ in waiting) < MAX_PROMPTS:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    waiting.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:
                    break
            try:
                results = await asyncio.to_thread(encode_groups, [p for p, _ in waiting], self._encode)
            except Exception as e:  # noqa: BLE001 - every caller of this batch gets the error
                results = [e] * len(waiting)
            for (_, fut), result in zip(waiting, results):
                if fut.done():
                    continue
                if isinstance(result, Exception):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)

    def _encode(self, prompts: list[str], images=None):
        """Prompt embeddings; with `images` (an edit's condition images, one PIL image or a list, as the Edit
        pipelines pass them) through the member's vision-language path."""
        import torch

        with torch.no_grad():
            if images is None:
                embeds, mask = self.pipe._get_qwen_prompt_embeds(prompts, device=self.device)
            else:
                embeds, mask = self.pipe._get_qwen_prompt_embeds(prompts, images, device=self.device)
        self.calls += 1
        self.prompts_encoded += len(prompts)
        return embeds.cpu(), mask.cpu()

    def _encode_image(self, image):
        """VAE latents of preprocessed images [B, 3, 1, H, W] (the pipelines' _encode_vae_image: argmax, no noise)."""
        import torch

        with torch.no_grad():
            latents = self.pipe._encode_vae_image(image.to(self.device, self.pipe.vae.dtype), generator=None)
        return latents.float().cpu()

    def health(self) -> dict:
        cache = getattr(self.pipe, "embedding_cache", None) if self.pipe is not None else None
        return {"status": "ok" if self.ready else "loading", "ready": self.ready, "role": "encoder",
                "encoder_identity": self.identity, "checkpoint": str(self.cfg.checkpoint),
                "workers": [{"device": self.cfg.device_list()[0], "ready": self.ready}],
                "encoder_calls": self.calls, "prompts_encoded": self.prompts_encoded,
                "cache": cache.stats.as_dict() if cache is not None else None}


def create_encoder_app(cfg: ServerConfig):
    from prometheus_client import CollectorRegistry, Counter, generate_latest
    from safetensors.torch import save

    from qwen_image_trt.serve.guard import Guard
    from qwen_image_trt.serve.protocol import error_body

    service = EncoderService(cfg)
    registry = CollectorRegistry()
    requests = Counter("qitrt_encoder_requests", "POST /v1/encode by outcome", ["outcome"], registry=registry)
    cache_events = Counter("qitrt_embedding_cache", "embedding cache lookups: hits, misses, evictions", ["event"],
                           registry=registry)
    seen = {"hits": 0, "misses": 0, "evictions": 0}

    @asynccontextmanager
    async def lifespan(app):
        await service.start()
        yield
        await service.stop()

    app = FastAPI(title="qitrt serve --role encoder", lifespan=lifespan)
    app.state.encoder = service

    def bad(field: str, value, allowed: str) -> JSONResponse:
        requests.labels("invalid").inc()
        return JSONResponse(error_body(f"{field}={value!r} is not allowed: {allowed}", "invalid_request_error",
                                       field), status_code=400)

    @app.post("/v1/encode")
    async def encode(request: Request):
        if not service.ready:
            requests.labels("unavailable").inc()
            return JSONResponse(error_body("the text encoder is loading", "unavailable"), status_code=503,
                                headers={"Retry-After": "2"})
        try:
            body = await request.json()
        except ValueError:
            return bad("body", "<not JSON>", 'a JSON object {"prompts": [...]}')
        prompts = body.get("prompts") if isinstance(body, dict) else None
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            return bad("prompts", prompts if not isinstance(prompts, list) else "<list>",
                       f"a list of 1-{MAX_PROMPTS} strings")
        if len(prompts) > MAX_PROMPTS:
            return bad("prompts", f"<{len(prompts)} prompts>", f"at most {MAX_PROMPTS}")
        too_long = next((p for p in prompts if len(p) > cfg.max_prompt_chars), None)
        if too_long is not None:
            return bad("prompts", f"<{len(too_long)} characters>", f"at most {cfg.max_prompt_chars} characters each")
        if body.get("images") is not None:  # an edit: its prompts are encoded with its condition images
            try:
                images = [_png_image(b) for b in body["images"]]
            except Exception:  # noqa: BLE001 - any undecodable entry
                return bad("images", "<undecodable>", "a list of base64 PNG images")
            if not images or len(images) > 4:
                return bad("images", f"<{len(images)} images>", "1-4 base64 PNG images")
            embeds, mask = await asyncio.to_thread(service._encode, prompts,
                                                   images if body.get("image_list", True) else images[0])
        else:
            embeds, mask = await service.encode(prompts)
        requests.labels("ok").inc()
        data = save({"embeds": embeds.contiguous(), "mask": mask.contiguous()},
                    metadata={"encoder_identity": service.identity})
        return Response(data, media_type=CONTENT_TYPE, headers={"X-Encoder-Identity": service.identity})

    @app.post("/v1/encode_image")
    async def encode_image(request: Request):
        from safetensors.torch import load

        try:
            image = load(await request.body())["image"]
        except Exception:  # noqa: BLE001 - not safetensors, or no `image` tensor
            return bad("body", "<not safetensors with an image tensor>", "safetensors bytes holding `image` "
                       "[B, 3, 1, H, W] in [-1, 1]")
        if image.dim() != 5 or image.shape[1] != 3 or image.shape[2] != 1 or image.shape[0] > 16:
            return bad("image", list(image.shape), "[B <= 16, 3, 1, H, W]")
        latents = await asyncio.to_thread(service._encode_image, image)
        requests.labels("ok").inc()
        return Response(save({"latents": latents.contiguous()}, metadata={"encoder_identity": service.identity}),
                        media_type=CONTENT_TYPE)

    @app.get("/health")
    async def health():
        h = service.health()
        return JSONResponse(h, status_code=200 if h["ready"] else 503)

    @app.get("/metrics")
    async def metrics():
        cache = getattr(service.pipe, "embedding_cache", None) if service.pipe is not None else None
        if cache is not None:
            now = cache.stats.as_dict()
            for k, v in now.items():
                if v > seen[k]:
                    cache_events.labels(k).inc(v - seen[k])
                    seen[k] = v
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    app.add_middleware(Guard, api_key=cfg.api_key, allowed_hosts=cfg.host_allowlist(), count=lambda p, s: None,
                       cors_origins=())
    return app


def _png_image(b64: str):
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")
