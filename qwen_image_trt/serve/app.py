"""HTTP only: FastAPI routes over the Engine. Parsing, auth, limits on the body, metrics, error shapes."""

from __future__ import annotations

import base64
import hmac
import json
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from qwen_image_trt.core.errors import InputError
from qwen_image_trt.runtime.limits import Limits, request_limits
from qwen_image_trt.serve.config import ServerConfig
from qwen_image_trt.serve.engine import Engine, ServeError
from qwen_image_trt.serve.protocol import ImageRequest, check_params, error_body, validation_error_body

OUTCOMES = {200: "ok", 202: "accepted", 400: "invalid", 401: "unauthorized", 404: "not_found", 409: "conflict",
            413: "too_large", 422: "invalid", 429: "queue_full", 500: "error", 503: "unavailable", 504: "timeout"}


def server_limits(cfg: ServerConfig) -> Limits:
    return request_limits(cfg.engines, cfg.checkpoint)


def create_app(cfg: ServerConfig) -> FastAPI:
    """The FastAPI app: an Engine started and stopped with the app, and its routes in four groups."""
    limits = server_limits(cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = app.state.engine = Engine(cfg, limits)
        await engine.start()
        yield
        await engine.shutdown(cfg.shutdown_grace_s)

    app = FastAPI(title="qitrt serve", lifespan=lifespan)
    http = _Http(app, cfg, limits)
    _add_error_handlers(app, http)
    _add_image_routes(app, http)
    _add_job_routes(app, http)
    _add_ops_routes(app, http)
    return app


class _Http:
    """What every route shares: the config, the engine, outcome counting, the API key check, body parsing."""

    def __init__(self, app: FastAPI, cfg: ServerConfig, limits: Limits):
        self.app, self.cfg, self.limits = app, cfg, limits

    @property
    def engine(self) -> Engine:
        return self.app.state.engine

    def count(self, endpoint: str, status: int) -> None:
        self.engine.metrics.requests.labels(endpoint, OUTCOMES.get(status, str(status))).inc()

    def fail(self, endpoint: str, status: int, body: dict, headers=None) -> JSONResponse:
        self.count(endpoint, status)
        return JSONResponse(body, status_code=status, headers=headers)

    async def check_key(self, request: Request) -> None:
        if self.cfg.api_key is None:
            return
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            given = given or auth[7:].strip()
        if not hmac.compare_digest(given.encode(), self.cfg.api_key.encode()):
            raise ServeError(401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer KEY'")

    async def parse(self, request: Request) -> ImageRequest:
        """Body -> ImageRequest: 413 over the size limit, 400 not JSON, 422 wrong fields or types."""
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _TooLarge()
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _TooLarge()
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise InputError("body", f"<{size} bytes, not JSON: {e}>", "a JSON object") from None
        if not isinstance(data, dict):
            raise InputError("body", type(data).__name__, "a JSON object")
        return ImageRequest.model_validate(data)

    async def accept(self, endpoint: str, request: Request, job: bool):
        """(RequestState, None) or (None, error response)."""
        try:
            req = await self.parse(request)
            params = check_params(req, self.cfg, self.limits, self.engine.max_images)
        except _TooLarge:
            limit = self.cfg.max_body_bytes
            return None, self.fail(endpoint, 413, error_body(f"the body is over {limit} bytes", "invalid_request_error",
                                                             param="body", allowed=f"at most {limit} bytes"))
        except ValidationError as e:
            return None, self.fail(endpoint, 422, validation_error_body(e))
        except InputError as e:
            return None, self.fail(endpoint, 400, error_body(str(e), "invalid_request_error", param=e.field,
                                                             allowed=e.allowed))
        return self.engine.accept(params, job=job), None


def _add_error_handlers(app: FastAPI, http: _Http) -> None:
    @app.exception_handler(ServeError)
    async def on_serve_error(request: Request, e: ServeError):
        route = request.scope.get("route")
        headers = {"Retry-After": str(e.retry_after)} if e.retry_after else None
        return http.fail(getattr(route, "path", request.url.path), e.status, error_body(e.message, e.type, code=e.type),
                         headers)

    @app.exception_handler(InputError)
    async def on_input_error(request: Request, e: InputError):
        route = request.scope.get("route")
        return http.fail(getattr(route, "path", request.url.path), 400,
                         error_body(str(e), "invalid_request_error", param=e.field, allowed=e.allowed))


def _add_image_routes(app: FastAPI, http: _Http) -> None:
    @app.post("/v1/images/generations", dependencies=[Depends(http.check_key)])
    async def generations(request: Request):
        endpoint = "/v1/images/generations"
        t0 = time.perf_counter()
        st, error = await http.accept(endpoint, request, job=False)
        if error:
            return error
        await http.engine.result(st)
        body = {"created": int(st.created),
                "data": [{"b64_json": base64.b64encode(png).decode(), "seed": st.params.seed + i,
                          "revised_prompt": None} for i, png in enumerate(st.images)]}
        http.count(endpoint, 200)
        return JSONResponse(body, headers=timing_headers(st, time.perf_counter() - t0))


def _add_job_routes(app: FastAPI, http: _Http) -> None:
    @app.post("/v1/jobs", status_code=202, dependencies=[Depends(http.check_key)])
    async def create_job(request: Request):
        st, error = await http.accept("/v1/jobs", request, job=True)
        if error:
            return error
        http.count("/v1/jobs", 202)
        return JSONResponse(http.engine.job_status(st), status_code=202)

    @app.get("/v1/jobs/{job_id}", dependencies=[Depends(http.check_key)])
    async def job_status(job_id: str):
        return http.engine.job_status(http.engine.job(job_id))

    @app.get("/v1/jobs/{job_id}/result", dependencies=[Depends(http.check_key)])
    async def job_result(job_id: str, index: int = 0):
        st = http.engine.job(job_id)
        if st.status != "succeeded":
            raise ServeError(409, "not_ready", f"job {job_id} is {st.status}" +
                             (f": {st.error.message}" if st.error else ""))
        if not 0 <= index < len(st.images):
            raise InputError("index", index, f"an integer in [0, {len(st.images) - 1}]")
        return Response(st.images[index], media_type="image/png", headers=timing_headers(st))

    @app.delete("/v1/jobs/{job_id}", dependencies=[Depends(http.check_key)])
    async def delete_job(job_id: str):
        st = http.engine.job(job_id)
        http.engine.delete_job(st)
        return http.engine.job_status(st)


def _add_ops_routes(app: FastAPI, http: _Http) -> None:
    @app.get("/health")
    async def health():
        h = http.engine.health()
        return JSONResponse(h, status_code=200 if h["ready"] else 503)

    @app.get("/metrics", dependencies=[Depends(http.check_key)])
    async def metrics():
        return Response(http.engine.metrics.render(http.engine), media_type="text/plain; version=0.0.4")


class _TooLarge(Exception):
    pass


def timing_headers(st, round_trip_s: float | None = None) -> dict:
    """Where the time went, so clients (and benchmarks/serve_overhead.py) can split server overhead off."""
    h = {"X-Request-Id": st.id, "X-Queue-Time-Ms": f"{st.queue_s * 1e3:.3f}",
         "X-Compute-Time-Ms": f"{st.compute_s * 1e3:.3f}", "X-Batch-Images": str(st.batch_images),
         "X-Worker": str(st.worker)}
    if round_trip_s is not None:
        h["X-Server-Time-Ms"] = f"{round_trip_s * 1e3:.3f}"
    return h
