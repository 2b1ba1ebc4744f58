"""Wire formats: the OpenAI images request (plus our extra fields), responses, errors, and the checked
`GenParams` the engine works with. Type errors are pydantic's (422); range errors are InputError (400)."""

from __future__ import annotations

import base64
import binascii
import io
import random
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from qwen_image_trt.core.errors import InputError
from qwen_image_trt.core.shapes import CONDITION_AREA, condition_dimensions, condition_resolution
from qwen_image_trt.models.pipelines import IMAGE_MEMBERS, QWEN21_MEMBERS
from qwen_image_trt.runtime.images import ImageLimits, check_image_inputs
from qwen_image_trt.runtime.limits import Limits, check_size
from qwen_image_trt.runtime.limits import check_threshold
from qwen_image_trt.serve.adapters import parse_lora_field
from qwen_image_trt.serve.config import ServerConfig, parse_size


class ImageRequest(BaseModel):
    """POST /v1/images/generations, /v1/images/edits and /v1/jobs. Unknown fields are refused (422) so a typo is not
    ignored. `image` (one or several), `mask` and `strength` make an edit: base64 in JSON, files in multipart."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    n: int = 1
    size: str | None = None
    response_format: Literal["b64_json"] = "b64_json"
    negative_prompt: str | None = None
    seed: int | None = None
    num_inference_steps: int | None = None
    true_cfg_scale: float = 4.0
    image: str | list[str] | None = None
    mask: str | None = None
    strength: float | None = None
    priority: int | None = None
    timeout: float | None = None
    lora: str | list[str] | None = None  # "name" or "name:scale", or a list: adapters from GET /v1/models
    step_cache: float | None = None  # threshold of runtime.step_cache; 0 turns the server's default off
    controlnet_conditioning_scale: float | None = None  # ControlNet servers' edits: the residuals' weight (1.0)
    # accepted for OpenAI compatibility, no effect on this model
    model: str | None = None
    user: str | None = None
    quality: str | None = None
    style: str | None = None


ALLOWED_FIELDS = sorted(ImageRequest.model_fields)


@dataclass
class GenParams:
    """One checked request: what a worker needs, plus how the server schedules it."""

    prompt: str
    negative_prompt: str | None
    n: int
    width: int
    height: int
    steps: int
    true_cfg_scale: float
    seed: int
    priority: int
    timeout_s: float
    kind: str = "text-to-image"  # the family member that runs it (models.pipelines.FAMILY)
    images: list[str] = field(default_factory=list)  # input images, base64 of the file as sent (checked)
    mask: str | None = None
    strength: float | None = None
    group: str = ""  # edit members: the condition images' resized sizes (requests that agree co-batch)
    loras: tuple = ()  # ((adapter name, scale), ...) sorted by name
    step_cache: float | None = None  # runtime.step_cache threshold; None: every step runs
    control_scale: float | None = None  # ControlNet: controlnet_conditioning_scale (None: the pipeline's 1.0)

    def __post_init__(self):
        # A job read back from the job store comes through JSON, where tuples became lists: the batch key hashes it.
        self.loras = tuple((str(name), float(scale)) for name, scale in self.loras)

    @property
    def cfg(self) -> bool:
        return self.negative_prompt is not None and self.true_cfg_scale > 1

    @property
    def key(self) -> tuple:
        """Requests with equal keys share a batch: same size, steps, CFG on/off, member, strength, adapter set,
        step-cache threshold and ControlNet scale; img2img, inpaint and ControlNet requests with different images share
        one call (one image per prompt), edit requests whose condition images resize to the same sizes (`group`) share
        each step's engine call. Within a batch each image's skip decisions stay its own (runtime.step_cache)."""
        return (self.width, self.height, self.steps, self.cfg, self.kind, self.strength, self.group, self.loras,
                self.step_cache, self.control_scale)


def check_text(name: str, text: str) -> None:
    """JSON may carry lone surrogates ("\\ud800") that Python decodes but no tokenizer can encode: refuse them here,
    at the edge, instead of failing the whole batch they would be put in."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(name, f"<lone surrogate U+{ord(text[e.start]):04X} at character {e.start}>",
                         "valid Unicode text (no lone surrogates)") from None


def request_kind(server_kind: str, edit: bool, has_mask: bool) -> str:
    """The member a request runs as. A text-to-image server edits with img2img (inpaint with a mask); an Edit server
    edits (edit-inpaint with a mask); an Edit-Plus server takes 1-3 images and no mask. A ControlNet server
    generates from text alone on its base model, and with an image (the ControlNet's condition image) on the edits
    endpoint runs the ControlNet."""
    if server_kind == "controlnet":
        return "controlnet" if edit else "text-to-image"
    if server_kind in QWEN21_MEMBERS:  # one pipeline generates (no image) and edits (1-3 images, no mask)
        return server_kind
    if not edit:
        if server_kind != "text-to-image":
            raise InputError("image", None, f"one or more input images: this server runs the {server_kind} model "
                             "(POST /v1/images/edits, or a job with `image`)")
        return server_kind
    if server_kind == "text-to-image":
        return "inpaint" if has_mask else "img2img"
    if server_kind == "edit":
        return "edit-inpaint" if has_mask else "edit"
    return server_kind


def _b64(field_name: str, text: str, max_bytes: int) -> bytes:
    if len(text) > (max_bytes + 2) // 3 * 4 + 4:  # bounded before decoding
        raise InputError(field_name, f"<{len(text)} base64 characters>", f"an image of at most {max_bytes} bytes")
    try:
        return base64.b64decode(text.split(",", 1)[1] if text.startswith("data:") else text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(field_name, f"<{len(text)} characters>", "base64 of a PNG, JPEG or WebP file") from None


def check_images(req: ImageRequest, kind: str, cfg: ServerConfig, max_aspect: float | None = None,
                 condition_area: int = CONDITION_AREA) -> dict:
    """Decode (bounded) and check the request's images for `kind`; {images, mask, strength, group} for GenParams.
    `condition_area`: the pixels each condition image is resized to (Qwen-Image-2.1: the output's area)."""
    raw = req.image if isinstance(req.image, list) else [] if req.image is None else [req.image]
    names = [f"image[{i}]" if len(raw) > 1 else "image" for i in range(len(raw))]
    files = [_b64(n, t, cfg.max_image_bytes) for n, t in zip(names, raw)]
    mask = _b64("mask", req.mask, cfg.max_image_bytes) if req.mask is not None else None
    limits = ImageLimits(max_bytes=cfg.max_image_bytes, max_pixels=cfg.max_image_pixels)
    if kind == "controlnet":  # the one image is the ControlNet's condition image
        if len(files) != 1:
            raise InputError("image", f"{len(files)} images", "exactly one control image for a ControlNet server")
        check_image_inputs(kind, None, mask, req.strength, limits, control_image=files[0])
    else:
        check_image_inputs(kind, files, mask, req.strength, limits, max_aspect)  # decodes: bombs, truncation stop
    group = ""
    if kind in IMAGE_MEMBERS and kind not in ("img2img", "inpaint", "controlnet"):
        group = condition_layout(files, condition_area)
    return {"images": [base64.b64encode(f).decode() for f in files],
            "mask": base64.b64encode(mask).decode() if mask is not None else None,
            "strength": req.strength, "group": group}


def condition_layout(files: list[bytes], area: int = CONDITION_AREA) -> str:
    """The sizes the edit pipelines resize these condition images to (diffusers' calculate_dimensions at ~1024^2,
    by aspect ratio), e.g. "1024x1024,832x1248": requests that agree have equal image tokens and grids, so their
    transformer forwards share one engine call (runtime.co_batch)."""
    from PIL import Image

    sizes = []
    for f in files:
        with Image.open(io.BytesIO(f)) as im:  # the header only: the file was checked and decoded above
            w, h = condition_dimensions(area, im.width / im.height)
        sizes.append(f"{w}x{h}")
    return ",".join(sizes)


def check_control_scale(value, kind: str) -> float | None:
    if value is None:
        return None
    if kind != "controlnet":
        raise InputError("controlnet_conditioning_scale", value, "only with a control image on a ControlNet server "
                         f"(this request runs as {kind})")
    if not 0 <= value <= CONTROL_SCALE_MAX:
        raise InputError("controlnet_conditioning_scale", value, f"a number in [0, {CONTROL_SCALE_MAX:g}]")
    return float(value)


CONTROL_SCALE_MAX = 2.0  # diffusers sets no bound; above 2 the residuals swamp the base model's own features


def _condition_area(kind: str, width: int, height: int) -> int:
    """The area the pipeline resizes condition images to: ~1024^2 for the edit members; Qwen-Image-2.1 is given
    the output's own (core.shapes.condition_resolution, as `qitrt generate` does)."""
    if kind in QWEN21_MEMBERS:
        return condition_resolution(height, width) ** 2
    return CONDITION_AREA


def check_params(req: ImageRequest, cfg: ServerConfig, limits: Limits, max_images, server_kind: str = "text-to-image",
                 edit: bool | None = None) -> GenParams:
    """Range checks of a well-typed request; raises InputError naming the field and the allowed values.
    `edit`: the request came to the edits endpoint (None: an edit when it carries an image, as a job may)."""
    for name in ALLOWED_FIELDS:
        if isinstance(getattr(req, name), str):
            check_text(name, getattr(req, name))
    if not req.prompt.strip():
        raise InputError("prompt", req.prompt, "a non-empty string")
    for name in ("prompt", "negative_prompt"):
        text = getattr(req, name)
        if text is not None and len(text) > cfg.max_prompt_chars:
            raise InputError(name, f"<{len(text)} characters>", f"at most {cfg.max_prompt_chars} characters")
    width, height = parse_size(req.size or cfg.default_size)
    try:
        check_size("width", width, limits.width, limits.size_multiple)
        check_size("height", height, limits.height, limits.size_multiple)
    except InputError as e:
        raise InputError("size", req.size, f"'WxH' with {e.field} {e.allowed}") from None
    lo, hi = limits.image_tokens
    if not lo <= (width // 16) * (height // 16) <= hi:
        raise InputError("size", req.size, f"'WxH' with (W/16)*(H/16) image tokens in [{lo}, {hi}] (engine profile)")
    steps = cfg.steps_default if req.num_inference_steps is None else req.num_inference_steps
    lo, hi = limits.steps[0], min(limits.steps[1], cfg.max_steps)
    if not lo <= steps <= hi:
        raise InputError("num_inference_steps", steps, f"an integer in [{lo}, {hi}]")
    if not 0 < req.true_cfg_scale <= 100:
        raise InputError("true_cfg_scale", req.true_cfg_scale, "a number in (0, 100] (> 1 with a negative_prompt "
                                                               "turns CFG on)")
    edit = req.image is not None if edit is None else edit
    if not edit:
        for name in ("image", "mask", "strength"):
            if getattr(req, name) is not None:
                raise InputError(name, "given", "only on POST /v1/images/edits or a job (this endpoint generates "
                                 "from text)")
    kind = request_kind(server_kind, edit, req.mask is not None)
    p = GenParams(req.prompt, req.negative_prompt, req.n, width, height, steps, req.true_cfg_scale,
                  random.randrange(2**31) if req.seed is None else req.seed,
                  cfg.priority_levels // 2 if req.priority is None else req.priority,
                  cfg.default_timeout_s if req.timeout is None else req.timeout, kind=kind,
                  loras=parse_lora_field(req.lora, cfg.max_loras),
                  step_cache=check_threshold(cfg.step_cache if req.step_cache is None else req.step_cache),
                  control_scale=check_control_scale(req.controlnet_conditioning_scale, kind),
                  **(check_images(req, kind, cfg, limits.condition_aspect, _condition_area(kind, width, height))
                     if edit else {}))
    top = min(cfg.max_n, max_images(p.cfg))
    if not 1 <= p.n <= top:
        raise InputError("n", p.n, f"an integer in [1, {top}]")
    if not 0 <= p.seed < 2**63:
        raise InputError("seed", p.seed, "an integer in [0, 2**63)")
    if not 0 <= p.priority < cfg.priority_levels:
        raise InputError("priority", p.priority, f"an integer in [0, {cfg.priority_levels - 1}] (0 is most urgent)")
    if not cfg.min_timeout_s <= p.timeout_s <= cfg.max_timeout_s:
        raise InputError("timeout", p.timeout_s, f"seconds in [{cfg.min_timeout_s:g}, {cfg.max_timeout_s:g}]")
    return p


def error_body(message: str, type_: str, param=None, allowed=None, code=None) -> dict:
    """OpenAI's error shape, plus `allowed` when the server knows what would have been accepted."""
    err = {"message": message, "type": type_, "param": param, "code": code}
    if allowed is not None:
        err["allowed"] = allowed
    return {"error": err}


def validation_error_body(e: ValidationError) -> dict:
    first = e.errors()[0]
    loc = ".".join(str(x) for x in first["loc"]) or "body"
    if first["type"] == "extra_forbidden":
        allowed = f"one of the fields {ALLOWED_FIELDS}"
    elif first["loc"] and first["loc"][0] in ImageRequest.model_fields:
        ann = ImageRequest.model_fields[first["loc"][0]].annotation
        allowed = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
        if first["loc"][0] == "response_format":
            allowed = "'b64_json' (url is not served)"
    else:
        allowed = "a JSON object"
    msg = f"{loc}: {first['msg']}"
    return error_body(msg, "invalid_request_error", param=loc, allowed=allowed, code=first["type"])


# ---- response shapes, for the OpenAPI document (generated clients) -------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    allowed: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ImageData(BaseModel):
    b64_json: str
    seed: int
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


class JobProgress(BaseModel):
    step: int
    total: int


class JobError(BaseModel):
    type: str
    message: str


class JobStatus(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created: int
    n: int
    queue_position: int | None
    progress: JobProgress
    attempts: int
    seed: int
    queue_time_s: float | None = None
    compute_time_s: float | None = None
    batch_images: int | None = None
    worker: int | None = None
    images: int | None = None
    error: JobError | None = None


class JobList(BaseModel):
    data: list[JobStatus]


ERRORS = {400: "a value out of range, a bad Host header or a body that is not JSON", 401: "missing or wrong API key",
          403: "a multipart form sent by a browser from another origin",
          404: "no such job", 408: "the body did not arrive in time", 409: "the job is not finished, or cancelled",
          413: "the body is too large", 415: "the body is not application/json",
          422: "a wrong type or an unknown field", 429: "the queue is full (Retry-After)",
          500: "the pipeline failed on this request", 503: "shutting down or no worker (Retry-After)",
          504: "not finished within its timeout"}


def error_responses(*codes: int) -> dict:
    """FastAPI `responses=` for these status codes, each with the error schema."""
    return {c: {"model": ErrorResponse, "description": ERRORS[c]} for c in codes}


def json_body(model: type[BaseModel]) -> dict:
    """`openapi_extra` for a route that reads its body itself (to bound its size while reading)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def edits_body() -> dict:
    """`openapi_extra` for POST /v1/images/edits: OpenAI's multipart form, or the JSON request with base64 images."""
    schema = ImageRequest.model_json_schema()
    props = dict(schema["properties"])  # every field as JSON types it; the form's text values are converted so
    props["image"] = {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": "1-3 image files (field `image` or `image[]`, repeated)"}
    props["mask"] = {"type": "string", "format": "binary", "description": "white = repaint"}
    form = {"type": "object", "properties": props, "required": ["image", "prompt"]}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form},
                                                          "application/json": {"schema": schema}}}}
