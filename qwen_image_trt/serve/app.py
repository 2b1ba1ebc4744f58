"""HTTP only: FastAPI routes over the Engine. Parsing, body limits, disconnects, metrics, error shapes.
The door (Host, API key, content type) is serve/guard.py, in front of every route."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from qwen_image_trt.core.errors import InputError
from qwen_image_trt.core.manifest import check_engines_match, read_manifest
from qwen_image_trt.models import checkpoint as ckpt
from qwen_image_trt.models.pipelines import QWEN21_MEMBERS, pipeline_kind
from qwen_image_trt.runtime.limits import Limits, request_limits
from qwen_image_trt.serve.adapters import AdapterCatalog, UnknownAdapter
from qwen_image_trt.serve.bodies import BodyReader, _Refused
from qwen_image_trt.serve.config import ServerConfig
from qwen_image_trt.serve.engine import Engine, ServeError
from qwen_image_trt.serve.guard import Guard
from qwen_image_trt.serve.protocol import (
    ImageRequest,
    ImagesResponse,
    JobList,
    JobStatus,
    check_params,
    edits_body,
    error_body,
    error_responses,
    json_body,
    validation_error_body,
)

log = logging.getLogger(__name__)
OUTCOMES = {200: "ok", 202: "accepted", 400: "invalid", 401: "unauthorized", 404: "not_found", 408: "body_timeout",
            409: "conflict", 413: "too_large", 415: "unsupported_media_type", 422: "invalid", 429: "queue_full",
            499: "disconnected", 500: "error", 503: "unavailable", 504: "timeout"}
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")


def server_limits(cfg: ServerConfig) -> Limits:
    return request_limits(cfg.engines, cfg.checkpoint)


def check_start(cfg: ServerConfig) -> None:
    """What would make every worker fail to load, refused before any starts (a crash loop answers 503 for ever):
    a checkpoint that is not one, an engine folder built from another checkpoint, an edit checkpoint's folder
    without the VAE encoder its every request needs."""
    root = ckpt.validate_checkpoint(cfg.checkpoint)
    if ckpt.is_qwen21(root) and cfg.role != "all":
        ckpt.refuse_21(root, f"qitrt serve --role {cfg.role}", "serve it with --role all")
    if cfg.engines:
        if not Path(cfg.engines).is_dir():
            raise InputError("engines", cfg.engines, "an existing engine folder made by `qitrt export`/`qitrt build`")
        manifest = read_manifest(cfg.engines)
        check_engines_match(manifest, ckpt.checkpoint_identity(root), cfg.engines)
        kind = pipeline_kind(root)
        if kind in QWEN21_MEMBERS:
            missing = [c for c in ("transformer_extract", "transformer_cached", "vae_decoder") if c not in manifest.components]
            if missing:
                raise InputError("engines", cfg.engines, f"a Qwen-Image-2.1 engine folder with {', '.join(missing)}")
        elif kind != "text-to-image" and "vae_encoder" not in manifest.components and cfg.role != "denoiser":
            raise InputError("engines", cfg.engines, f"a folder with a vae_encoder graph: the {kind} pipeline encodes "
                             "its input images (export with --components transformer,vae_decoder,vae_encoder)")


def has_vae_encoder(cfg: ServerConfig) -> bool:
    """Whether input images can be encoded: by the VAE encoder graph, the torch VAE, or (--role denoiser) the
    encoder service."""
    return cfg.role == "denoiser" or not cfg.engines or "vae_encoder" in read_manifest(cfg.engines).components


def create_app(cfg: ServerConfig) -> FastAPI:
    """The FastAPI app: an Engine started and stopped with the app, its routes in three groups, the guard
    in front."""
    if cfg.role == "encoder":  # the text encoder as a service: its own small app
        from qwen_image_trt.serve.encoder_service import create_encoder_app

        return create_encoder_app(cfg)
    check_start(cfg)
    encoder = None
    if cfg.role == "denoiser":  # refused here if the encoder serves another text encoder; unreachable is let be
        from qwen_image_trt.serve.encoder_service import text_encoder_identity
        from qwen_image_trt.serve.remote_encoder import EncoderLink

        encoder = EncoderLink(cfg.encoder_url, text_encoder_identity(cfg.checkpoint), cfg.api_key)
        encoder.check_at_start()
    if cfg.default_steps is None:  # engines made for a few-step recipe default to its steps
        sampling = read_manifest(cfg.engines).sampling if cfg.engines else None
        cfg.default_steps = int(sampling["steps"]) if sampling else cfg.steps_default
    limits = server_limits(cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = app.state.engine = Engine(cfg, limits, encoder=encoder)
        await engine.start()
        yield
        await engine.shutdown(cfg.shutdown_grace_s)

    app = FastAPI(title="qitrt serve", lifespan=lifespan, description="OpenAI-compatible image generation over "
                  "Qwen-Image engines, with async jobs. See docs/serving.md.")
    http = _Http(app, cfg, limits)
    _add_error_handlers(app, http)
    _add_image_routes(app, http)
    _add_job_routes(app, http)
    _add_ops_routes(app, http)
    if cfg.ui:
        from qwen_image_trt.serve.ui import mount_ui

        mount_ui(app, cfg, limits, lambda: app.state.engine, http.adapters)
    app.add_middleware(Guard, api_key=cfg.api_key, allowed_hosts=cfg.host_allowlist(), count=http.count_path,
                       cors_origins=(cfg.cors_origins or "").split(",") if cfg.cors_origins else ())
    if cfg.cors_origins:  # outside the guard: a preflight carries no API key
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=[o.strip() for o in cfg.cors_origins.split(",")],
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization", "X-API-Key",
                                                                                   "Content-Type"])
    return app


class _Http(BodyReader):
    """What every route shares: the config, the engine, outcome counting, body parsing (BodyReader)."""

    def __init__(self, app: FastAPI, cfg: ServerConfig, limits: Limits):
        self.app, self.cfg, self.limits = app, cfg, limits
        self.kind = pipeline_kind(cfg.checkpoint)  # the member this checkpoint runs; edits map onto its family
        self.can_edit = has_vae_encoder(cfg)
        self.adapters = AdapterCatalog(cfg.lora_dir, ckpt.read_config(cfg.checkpoint, "transformer"))

    @property
    def engine(self) -> Engine:
        return self.app.state.engine

    def count(self, endpoint: str, status: int) -> None:
        self.engine.metrics.requests.labels(endpoint, OUTCOMES.get(status, str(status))).inc()

    def count_path(self, path: str, status: int) -> None:
        endpoint = "/v1/jobs/{job_id}" if path.startswith("/v1/jobs/") else path
        self.count(endpoint, status)

    def fail(self, endpoint: str, status: int, body: dict, headers=None) -> JSONResponse:
        self.count(endpoint, status)
        return JSONResponse(body, status_code=status, headers=headers)

    async def accept(self, endpoint: str, request: Request, job: bool, edit: bool | None = False):
        """(RequestState, None) or (None, error response). `edit`: True on the edits endpoint, None for jobs (an
        edit when the job carries an image)."""
        try:
            limit = self.cfg.max_image_body_bytes if edit is not False else self.cfg.max_body_bytes
            req = await self.parse(request, limit)
            if (edit or (edit is None and req.image is not None)) and not self.can_edit:
                raise InputError("image", "given", "no input images on this server: its engine folder has no "
                                 "vae_encoder graph (export with --components transformer,vae_decoder,vae_encoder)")
            check = (self.cfg, self.limits, self.engine.max_images, self.kind, edit)
            # Images are decoded in full to be checked (a truncated file must fail here, not in a batch): a 16 MP
            # decode takes ~0.1 s, so off the event loop, which serves every other connection meanwhile.
            params = (await asyncio.to_thread(check_params, req, *check) if req.image is not None
                      else check_params(req, *check))
            if params.loras:  # reads the adapter files once per version: off the event loop too
                await asyncio.to_thread(self.adapters.check, params.loras)
        except _Refused as e:  # the rest of the body is unread: this connection cannot carry another request
            return None, self.fail(endpoint, e.status, error_body(e.message, "invalid_request_error", param=e.param,
                                                                   allowed=e.allowed), {"Connection": "close"})
        except ValidationError as e:
            return None, self.fail(endpoint, 422, validation_error_body(e))
        except UnknownAdapter as e:
            return None, self.fail(endpoint, 404, error_body(str(e), "invalid_request_error", param="lora",
                                                             allowed=", ".join(e.available) or "none",
                                                             code="adapter_not_found"))
        except InputError as e:
            return None, self.fail(endpoint, 400, error_body(str(e), "invalid_request_error", param=e.field,
                                                             allowed=e.allowed))
        return self.engine.accept(params, job=job), None


def _add_error_handlers(app: FastAPI, http: _Http) -> None:
    def endpoint(request: Request) -> str:
        return getattr(request.scope.get("route"), "path", request.url.path)

    @app.exception_handler(ServeError)
    async def on_serve_error(request: Request, e: ServeError):
        headers = {"Retry-After": str(e.retry_after)} if e.retry_after else None
        return http.fail(endpoint(request), e.status, error_body(e.message, e.type, code=e.type), headers)

    @app.exception_handler(InputError)
    async def on_input_error(request: Request, e: InputError):
        return http.fail(endpoint(request), 400, error_body(str(e), "invalid_request_error", param=e.field,
                                                            allowed=e.allowed))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        return http.fail(endpoint(request), 422, error_body(f"{loc}: {first['msg']}", "invalid_request_error",
                                                            param=loc, code=first["type"]))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return http.fail(endpoint(request), 500, error_body(f"internal error: {type(e).__name__}: {e}",
                                                            "server_error", code="internal_error"))


def _add_image_routes(app: FastAPI, http: _Http) -> None:
    @app.post("/v1/images/generations", response_model=ImagesResponse, openapi_extra=json_body(ImageRequest),
              responses=error_responses(400, 401, 408, 413, 415, 422, 429, 500, 503, 504))
    async def generations(request: Request):
        """Generate images (OpenAI images API). Waits for the images; a client that disconnects first is dropped
        from the queue, or from its batch."""
        return await _respond(http, "/v1/images/generations", request, edit=False)


    @app.post("/v1/images/edits", response_model=ImagesResponse, openapi_extra=edits_body(),
              responses=error_responses(400, 401, 403, 408, 413, 415, 422, 429, 500, 503, 504))
    async def edits(request: Request):
        """Edit images (OpenAI images API, multipart: `image` one or several files, `mask`, `prompt`, `n`, `size`,
        plus this server's extra fields; or the same as JSON with base64 images). A text-to-image checkpoint runs
        img2img (inpaint with a mask), an Edit checkpoint edits (edit-inpaint with a mask), Edit-Plus takes 1-3
        images."""
        return await _respond(http, "/v1/images/edits", request, edit=True)


async def _respond(http: "_Http", endpoint: str, request: Request, edit: bool):
    t0 = time.perf_counter()
    st, error = await http.accept(endpoint, request, job=False, edit=edit)
    if error:
        return error
    if not await _until_done_or_gone(http.engine, st, request):
        http.count(endpoint, 499)
        return Response(status_code=499)  # nobody reads it; uvicorn drops it with the closed socket
    if st.error:
        raise st.error
    body = {"created": int(st.created),
            "data": [{"b64_json": base64.b64encode(png).decode(), "seed": st.params.seed + i,
                      "revised_prompt": None} for i, png in enumerate(st.images)]}
    http.count(endpoint, 200)
    return JSONResponse(body, headers=timing_headers(st, time.perf_counter() - t0))


async def _until_done_or_gone(engine: Engine, st, request: Request) -> bool:
    """Wait for `st`; True when it finished, False when the client went away first (then it is cancelled: out of
    the queue, or out of its batch, which stops at the next step once it holds no one)."""
    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait([st.future, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if st.future.done():
        return True
    engine.cancel(st, "the client disconnected")
    return False


def _add_job_routes(app: FastAPI, http: _Http) -> None:
    @app.post("/v1/jobs", status_code=202, response_model=JobStatus, openapi_extra=json_body(ImageRequest),
              responses=error_responses(400, 401, 408, 413, 415, 422, 429, 503))
    async def create_job(request: Request):
        """Submit a job: answered at once (202) with its id. Jobs are durable: they survive a restart."""
        st, error = await http.accept("/v1/jobs", request, job=True, edit=None)
        if error:
            return error
        http.count("/v1/jobs", 202)
        return JSONResponse(http.engine.job_status(st), status_code=202)

    @app.get("/v1/jobs", response_model=JobList, responses=error_responses(400, 401, 422))
    async def list_jobs(status: str | None = None, limit: int = 100):
        """Jobs, newest first; `status` filters."""
        if status is not None and status not in JOB_STATES:
            raise InputError("status", status, f"one of {', '.join(JOB_STATES)}")
        if not 1 <= limit <= 1000:
            raise InputError("limit", limit, "an integer in [1, 1000]")
        return {"data": http.engine.jobs_list(status, limit)}

    @app.get("/v1/jobs/{job_id}", response_model=JobStatus, responses=error_responses(401, 404, 422))
    async def job_status(job_id: str):
        return http.engine.job_status(http.engine.job(job_id))

    @app.get("/v1/jobs/{job_id}/result", responses={200: {"content": {"image/png": {}}, "description": "the PNG"},
                                                    **error_responses(400, 401, 404, 409, 422)})
    async def job_result(job_id: str, index: int = 0):
        st = http.engine.job(job_id)
        if st.status != "succeeded":
            raise ServeError(409, "not_ready", f"job {job_id} is {st.status}" +
                             (f": {st.error.message}" if st.error else ""))
        if not 0 <= index < st.image_count:
            raise InputError("index", index, f"an integer in [0, {st.image_count - 1}]")
        return Response(http.engine.job_image(st, index), media_type="image/png", headers=timing_headers(st))

    @app.delete("/v1/jobs/{job_id}", response_model=JobStatus, responses=error_responses(401, 404, 422))
    async def delete_job(job_id: str):
        """Cancel a queued or running job; delete a finished one (and its result)."""
        st = http.engine.job(job_id)
        http.engine.delete_job(st)
        return http.engine.job_status(st)


def _add_ops_routes(app: FastAPI, http: _Http) -> None:
    @app.get("/v1/models", responses=error_responses(401))
    async def models():
        """The base model and the LoRA adapters a request may name in `lora` (OpenAI's model list format)."""
        created = int(Path(http.cfg.checkpoint).stat().st_mtime)
        base = {"id": Path(http.cfg.checkpoint).name, "object": "model", "created": created, "owned_by": "qitrt",
                "kind": "base", "pipeline": http.kind}
        names = await asyncio.to_thread(http.adapters.names)
        loras = [{"id": n, "object": "model", "created": int(http.adapters.path(n).stat().st_mtime),
                  "owned_by": "qitrt", "kind": "lora", "parent": base["id"]} for n in names]
        return {"object": "list", "data": [base, *loras]}

    @app.get("/health", responses={503: {"description": "no worker ready, or draining"}})
    async def health():
        h = http.engine.health()
        return JSONResponse(h, status_code=200 if h["ready"] else 503)

    @app.get("/metrics", responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
                                    **error_responses(401)})
    async def metrics():
        return Response(http.engine.metrics.render(http.engine), media_type="text/plain; version=0.0.4")


def timing_headers(st, round_trip_s: float | None = None) -> dict:
    """Where the time went, so clients (and benchmarks/serve_overhead.py) can split server overhead off."""
    h = {"X-Request-Id": st.id, "X-Queue-Time-Ms": f"{st.queue_s * 1e3:.3f}",
         "X-Compute-Time-Ms": f"{st.compute_s * 1e3:.3f}", "X-Batch-Images": str(st.batch_images),
         "X-Worker": str(st.worker)}
    if round_trip_s is not None:
        h["X-Server-Time-Ms"] = f"{round_trip_s * 1e3:.3f}"
    return h
