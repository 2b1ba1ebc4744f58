"""The denoiser's side of the encoder service: prompt embeddings fetched from `--encoder-url` instead of a local
text encoder, and the link's health as the server sees it.

`remote_prompt_embeddings(pipe, url)` replaces the pipeline's `_get_qwen_prompt_embeds` (the one place diffusers
encodes text prompts), so the stock and batched loops run unchanged; the worker's own embedding cache goes in
front of it, so a repeated prompt does not even cross the network. A refused connection, a timeout or a 503 from
the encoder raises EncoderUnavailable: the server answers 503 + Retry-After for it, not 500.

`EncoderLink` is the server's view: the encoder's /health, polled; its identity (the text encoder's fingerprint,
core.identity) must equal the one of the denoiser's own checkpoint, else the denoiser refuses to start (or, if the
encoder was replaced by another model while running, refuses work until it is put back).
"""

from __future__ import annotations

import time

from qwen_image_trt.core.errors import InputError, QitrtError

HEALTH_TIMEOUT_S = 2.0


class EncoderUnavailable(QitrtError):
    """The encoder service cannot be reached or is not ready; retry later."""


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def remote_prompt_embeddings(pipe, url: str, api_key: str | None = None, timeout_s: float = 60.0):
    """Text prompts, an edit's prompts with its condition images, and the VAE encoding of input images, all from
    the encoder service: the pipeline's `_get_qwen_prompt_embeds` and `_encode_vae_image` are replaced."""
    import httpx
    from safetensors.torch import load, save

    client = httpx.Client(timeout=timeout_s, headers=_headers(api_key))
    base = url.rstrip("/")

    def call(path: str, **kw) -> dict:
        try:
            r = client.post(base + path, **kw)
        except httpx.TransportError as e:
            raise EncoderUnavailable(f"the encoder service at {url} is unreachable ({type(e).__name__})") from None
        if r.status_code == 503:
            raise EncoderUnavailable(f"the encoder service at {url} is not ready (503)")
        if r.status_code != 200:
            raise QitrtError(f"the encoder service at {url} answered {r.status_code}: {r.text[:300]}")
        return load(r.content)

    def text(prompts):
        tensors = call("/v1/encode", json={"prompts": prompts})
        return tensors["embeds"], tensors["mask"]

    def with_images(prompts, pngs, image_list):
        tensors = call("/v1/encode", json={"prompts": prompts, "images": pngs, "image_list": image_list})
        return tensors["embeds"], tensors["mask"]

    def vae(image):
        return call("/v1/encode_image", content=save({"image": image.detach().float().cpu().contiguous()}),
                    headers={"Content-Type": "application/octet-stream"})["latents"]

    return install_prompt_source(pipe, text, with_images, vae)


def install_prompt_source(pipe, encode_text, encode_with_images, encode_image=None):
    """Route `pipe`'s prompt encoding (and, with `encode_image`, its VAE encoding of input images) to another
    process, whatever carries the call (HTTP here, a Ray handle in ray_app): `encode_text(prompts)` and
    `encode_with_images(prompts, png_b64_list, image_list)` return (embeds, mask), `encode_image(images)` latents.
    The pipeline's own `_get_qwen_prompt_embeds` / `_encode_vae_image` signatures are kept."""
    import inspect

    import torch

    def placed(embeds, mask, device, dtype):
        device = device or pipe._execution_device
        return embeds.to(device=device, dtype=dtype or pipe.transformer.dtype), mask.to(device, torch.long)

    def remote(prompt=None, device=None, dtype=None):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        return placed(*encode_text(prompts), device, dtype)

    def remote_with_images(prompt=None, image=None, device=None, dtype=None):
        if image is None:
            return remote(prompt, device, dtype)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        images = image if isinstance(image, list) else [image]  # PNG: lossless, the very pixels the stock sees
        return placed(*encode_with_images(prompts, [_png_b64(im) for im in images], isinstance(image, list)),
                      device, dtype)

    def remote_vae(image, generator=None):  # the pipelines encode with sample_mode="argmax": no noise to share
        return encode_image(image).to(device=image.device, dtype=image.dtype)

    takes_images = "image" in inspect.signature(type(pipe)._get_qwen_prompt_embeds).parameters
    pipe._get_qwen_prompt_embeds = remote_with_images if takes_images else remote
    if encode_image is not None and hasattr(type(pipe), "_encode_vae_image"):
        pipe._encode_vae_image = remote_vae
    return pipe


def _png_b64(image) -> str:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class EncoderLink:
    """The encoder service as one denoiser server sees it: reachable, ready and of the right text encoder."""

    def __init__(self, url: str, expected_identity: str, api_key: str | None = None):
        self.url, self.expected, self.api_key = url.rstrip("/"), expected_identity, api_key
        self.ok, self.identity, self.last_error, self.checked_at = False, None, "not checked yet", 0.0

    def check(self) -> bool:
        """One /health probe; sets `ok`. A reachable encoder of another text encoder is never ok."""
        import httpx

        self.checked_at = time.monotonic()
        try:
            r = httpx.get(self.url + "/health", timeout=HEALTH_TIMEOUT_S, headers=_headers(self.api_key))
            health = r.json()
        except (httpx.HTTPError, ValueError) as e:
            self.ok, self.last_error = False, f"unreachable ({type(e).__name__})"
            return False
        self.identity = health.get("encoder_identity")
        if health.get("role") != "encoder":
            self.ok, self.last_error = False, f"{self.url} is not an encoder service (role {health.get('role')!r})"
        elif self.identity != self.expected:
            self.ok, self.last_error = False, (f"the encoder serves text encoder {self.identity}, this checkpoint's "
                                               f"is {self.expected}")
        elif not health.get("ready"):
            self.ok, self.last_error = False, "loading"
        else:
            self.ok, self.last_error = True, None
        return self.ok

    def check_at_start(self) -> None:
        """Refuse to start against an encoder of another model; an unreachable one may come up later."""
        self.check()
        if self.identity is not None and self.identity != self.expected:
            raise InputError("encoder_url", self.url, f"an encoder service of this checkpoint's text encoder "
                             f"(identity {self.expected}); it serves {self.identity}")

    def as_dict(self) -> dict:
        return {"url": self.url, "ok": self.ok, "identity": self.identity, "expected_identity": self.expected,
                "last_error": self.last_error}
