"""The door, before any route: Host header, API key, content type. Pure ASGI, so /docs and /openapi.json are
behind it like everything else.

- Host: a web page the operator visits can reach a loopback server through DNS rebinding (evil.example resolving
  to 127.0.0.1); the browser then sends `Host: evil.example`. On loopback binds only localhost names pass.
- API key: every path but /health. One rule for the two headers: `Authorization: Bearer KEY` when present, else
  `X-API-Key`; a wrong one is 401 with `WWW-Authenticate`, never overridden by the other header.
- Content type: a body must be `application/json`. Browsers send text/plain cross-site without a preflight (a
  "simple request"), so accepting it would let any page submit work (CSRF). The web UI's uploads (under /ui/) may
  be multipart, and so may POST /v1/images/edits (OpenAI's edits API is multipart), but a multipart request that
  a browser sent from another origin (an `Origin` header naming another host, not in --cors-origins) is refused:
  SDKs send no Origin, a cross-site form always does.
- The web UI (/ui) cannot send headers from a link: `/ui?key=KEY` once sets an HttpOnly, SameSite=Strict cookie
  that carries the key for /ui only (a cross-site page cannot make the browser send it).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from http.cookies import SimpleCookie
from urllib.parse import parse_qs

from qwen_image_trt.serve.protocol import error_body

OPEN_PATHS = {"/health"}
BODY_TYPES = {"application/json"}
UI_PREFIX, UI_BODY_TYPES, KEY_COOKIE = "/ui", {"application/json", "multipart/form-data"}, "qitrt_key"
MULTIPART_PATHS = {"/v1/images/edits"}
# The encoder role's image endpoint takes safetensors bytes. application/octet-stream is not a CORS "simple" type:
# a browser must preflight it cross-site, which no CORS rule here allows.
BINARY_PATHS, BINARY_TYPES = {"/v1/encode_image"}, {"application/json", "application/octet-stream"}


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    def __init__(self, app, api_key: str | None, allowed_hosts: list[str] | None,
                 count: Callable[[str, int], None] = lambda path, status: None, cors_origins=()):
        self.app, self.api_key, self.allowed_hosts, self.count = app, api_key, allowed_hosts, count
        self.cors_origins = {o.strip().rstrip("/").lower() for o in cors_origins}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        query = scope.get("query_string", b"").decode("latin-1")
        refusal = self.check(scope["method"], scope["path"], headers, query)
        if refusal is None:
            return await self.app(scope, receive, send)
        status, body, extra = refusal
        self.count(scope["path"], status)
        data = json.dumps(body).encode() if body else b""
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                                *[(k.encode(), v.encode()) for k, v in extra.items()]]})
        await send({"type": "http.response.body", "body": data})

    def check(self, method: str, path: str, headers: dict, query: str = "") -> tuple[int, dict, dict] | None:
        """None when the request may go on, else (status, error body, extra headers)."""
        ui = path == UI_PREFIX or path.startswith(UI_PREFIX + "/")
        if self.allowed_hosts is not None and _host_name(headers.get("host", "")) not in self.allowed_hosts:
            return 400, error_body(f"Host {headers.get('host', '')!r} is not served here (DNS-rebinding guard)",
                                   "invalid_request_error", param="Host", code="host_not_allowed",
                                   allowed=f"one of {self.allowed_hosts} (--allowed-hosts)"), {}
        if self.api_key is not None and path not in OPEN_PATHS:
            auth = headers.get("authorization")
            if auth is not None:
                scheme, _, given = auth.partition(" ")
                given = given.strip() if scheme.lower() == "bearer" else ""
            else:
                given = headers.get("x-api-key", "")
            if ui and not given:
                link_key = parse_qs(query).get("key", [""])[0]
                if link_key and method == "GET" and self._is_key(link_key):
                    return 303, {}, {"location": UI_PREFIX + "/", "set-cookie": f"{KEY_COOKIE}={link_key}; HttpOnly; "
                                     f"SameSite=Strict; Path={UI_PREFIX}"}
                cookie = SimpleCookie(headers.get("cookie", ""))
                given = cookie[KEY_COOKIE].value if KEY_COOKIE in cookie else ""
            if not self._is_key(given):
                return 401, error_body("missing or wrong API key: send 'Authorization: Bearer KEY' (or X-API-Key "
                                       "without an Authorization header)", "unauthorized", param="Authorization",
                                       code="unauthorized"), {"www-authenticate": 'Bearer realm="qitrt"'}
        if method in ("POST", "PUT", "PATCH"):
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            allowed = (UI_BODY_TYPES if ui or path in MULTIPART_PATHS else BINARY_TYPES if path in BINARY_PATHS
                       else BODY_TYPES)
            if ctype == "multipart/form-data" and not ui and self._cross_site(headers):
                return 403, error_body(f"a multipart form from origin {headers['origin']!r} is refused (cross-site "
                                       "request guard)", "invalid_request_error", param="Origin",
                                       code="cross_site_form", allowed="no Origin header (API clients), this "
                                       "server's own origin, or one in --cors-origins"), {}
            if ctype not in allowed:
                return 415, error_body(f"content-type {ctype or '(none)'!r} is not accepted", "invalid_request_error",
                                       param="Content-Type", code="unsupported_media_type",
                                       allowed=" or ".join(sorted(allowed))), {}
        return None

    def _cross_site(self, headers: dict) -> bool:
        origin = headers.get("origin")
        if origin is None:
            return False
        origin = origin.strip().rstrip("/").lower()
        host = origin.split("://", 1)[-1]
        return origin not in self.cors_origins and host != headers.get("host", "").strip().lower()

    def _is_key(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.api_key.encode())
