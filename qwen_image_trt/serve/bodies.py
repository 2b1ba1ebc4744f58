"""Request bodies as `qitrt serve` reads them, for every HTTP front (the one-host app and the Ray ingress): bounded
in size while read (413) and in time (408), JSON or OpenAI's multipart edits form, into an ImageRequest."""

from __future__ import annotations

import asyncio
import base64
import json

from fastapi import Request

from qwen_image_trt.core.errors import InputError
from qwen_image_trt.serve.protocol import ImageRequest


class BodyReader:
    """Needs `self.cfg` (a ServerConfig): its body limits and timeouts."""

    async def read_body(self, request: Request, limit: int | None = None) -> bytes:
        """The body, bounded in size while it is read (413) and in time (408)."""
        limit = limit or self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _Refused(413, f"the body is over {limit} bytes", "body", f"at most {limit} bytes")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.cfg.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise _Refused(413, f"the body is over {limit} bytes", "body", f"at most {limit} bytes")
                    chunks.append(chunk)
        except TimeoutError:
            raise _Refused(408, f"the body did not arrive within {self.cfg.body_timeout_s:g} s", "body",
                           f"a body sent within {self.cfg.body_timeout_s:g} s") from None
        return b"".join(chunks)

    async def parse(self, request: Request, limit: int | None = None) -> ImageRequest:
        """Body -> ImageRequest: 400 not JSON (nesting included), 422 wrong fields or types."""
        if request.headers.get("content-type", "").split(";")[0].strip().lower() == "multipart/form-data":
            return await self.parse_form(request, limit)
        raw = await self.read_body(request, limit)
        try:
            data = json.loads(raw)
        except RecursionError:
            raise InputError("body", f"<{len(raw)} bytes nested too deep>", "a flat JSON object") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise InputError("body", f"<{len(raw)} bytes, not JSON: {e}>", "a JSON object") from None
        if not isinstance(data, dict):
            raise InputError("body", type(data).__name__, "a JSON object")
        return ImageRequest.model_validate(data)

    async def parse_form(self, request: Request, limit: int | None) -> ImageRequest:
        """OpenAI's multipart edits form -> ImageRequest: files `image` (or `image[]`, repeatable) and `mask`, every
        other field a string converted as JSON would type it (422 when it cannot be)."""
        raw = await self.read_body(request, limit)
        request._body = raw  # starlette parses the form from the cached body: read once, bounded above
        try:
            form = await request.form(max_files=MAX_FORM_FILES, max_fields=64)
        except Exception as e:  # noqa: BLE001 - starlette raises its own MultiPartException/HTTPException
            raise InputError("body", f"<{len(raw)} bytes>", f"a multipart/form-data body ({e})") from None
        data: dict = {}
        images = []
        for name, value in form.multi_items():
            if name in ("image", "image[]"):
                images.append(await _file_b64(name, value))
            elif name == "mask":
                data["mask"] = await _file_b64(name, value)
            elif name in ("lora", "lora[]"):  # repeatable, as image is
                data.setdefault("lora", []).append(value if isinstance(value, str) else await _file_text(name, value))
            elif name in data:
                raise InputError(name, "given twice", "one value per field (repeat only image)")
            else:
                data[name] = value if isinstance(value, str) else await _file_text(name, value)
        if images:
            data["image"] = images if len(images) > 1 else images[0]
        return ImageRequest.model_validate(data, strict=False)


MAX_FORM_FILES = 4  # Edit-Plus's three condition images and a mask


async def _file_b64(name: str, value) -> str:
    if isinstance(value, str):  # a client that sent the field as text: base64 as in JSON
        return value
    return base64.b64encode(await value.read()).decode()


async def _file_text(name: str, value) -> str:
    data = await value.read(64 * 1024 + 1)
    try:
        if len(data) > 64 * 1024:
            raise UnicodeDecodeError("utf-8", b"", 0, 1, "too long")
        return data.decode()
    except UnicodeDecodeError:
        raise InputError(name, "<a file>", "a text field (only image, image[] and mask are files)") from None


class _Refused(Exception):
    def __init__(self, status: int, message: str, param: str, allowed: str):
        self.status, self.message, self.param, self.allowed = status, message, param, allowed
        super().__init__(message)
