"""Split roles: `qitrt serve --role encoder` (the text encoder as a service) in front of `--role denoiser`, both
real servers on loopback with the tiny model. Embeddings travel as safetensors; identities are checked at start;
losing the encoder gives 503 + Retry-After, and the denoiser recovers when it comes back."""

from __future__ import annotations

import io
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch

from serve_helpers import AUTH, ROOT, Server, wait_until


def b64png(item: dict) -> np.ndarray:
    import base64
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def twin_pipe(tiny_checkpoint):
    from qwen_image_trt import load_pipeline

    return load_pipeline(tiny_checkpoint, backend="torch")


def twin(pipe, prompt: str, seed: int) -> np.ndarray:
    img = pipe(prompt=prompt, negative_prompt="blurry", true_cfg_scale=4.0, height=64, width=64,
               num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    return np.asarray(img, dtype=np.int16)


def body(prompt: str, seed: int) -> dict:
    return {"prompt": prompt, "negative_prompt": "blurry", "seed": seed, "size": "64x64", "num_inference_steps": 2}


def test_denoiser_with_an_encoder_service_loses_and_regains_it(tiny_checkpoint, tmp_path, twin_pipe):
    encoder = Server(tiny_checkpoint, tmp_path / "jobs-e", "--role", "encoder", devices="cpu")
    denoiser = Server(tiny_checkpoint, tmp_path / "jobs-d", "--role", "denoiser", "--encoder-url", encoder.url,
                      devices="cpu")
    try:
        wait_until("the denoiser sees its encoder", lambda: denoiser.health().get("encoder", {}).get("ok"))
        r = denoiser.post(body("a red fox", 3))
        assert r.status_code == 200, r.text
        assert np.abs(b64png(r.json()["data"][0]) - twin(twin_pipe, "a red fox", 3)).max() <= 1
        encoded = encoder.health()["prompts_encoded"]
        assert encoded == 2  # the prompt and the negative, once each
        assert denoiser.post(body("a red fox", 4)).status_code == 200
        assert encoder.health()["prompts_encoded"] == encoded  # the worker's own cache answered

        raw = httpx.post(encoder.url + "/v1/encode", json={"prompts": ["a cat", "a cat on a mat"]}, headers=AUTH)
        assert raw.headers["content-type"] == "application/x-safetensors"
        from safetensors.torch import load

        tensors = load(raw.content)  # binary tensors, not JSON lists
        assert tensors["embeds"].shape[:2] == tensors["mask"].shape and tensors["embeds"].shape[0] == 2
        bad = httpx.post(encoder.url + "/v1/encode", json={"prompts": "a cat"}, headers=AUTH)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompts"

        encoder.kill()
        wait_until("the denoiser notices", lambda: not denoiser.health()["encoder"]["ok"], limit=20)
        lost = denoiser.post(body("a new prompt", 5))
        assert lost.status_code == 503 and int(lost.headers["retry-after"]) > 0, lost.text
        assert lost.json()["error"]["type"] == "encoder_unavailable"
        assert denoiser.health()["status"] == "unavailable"

        encoder = Server(tiny_checkpoint, tmp_path / "jobs-e2", "--role", "encoder", devices="cpu",
                         port=encoder.port)
        wait_until("the denoiser sees it back", lambda: denoiser.health()["encoder"]["ok"], limit=30)
        back = denoiser.post(body("a new prompt", 5))
        assert back.status_code == 200, back.text
        assert np.abs(b64png(back.json()["data"][0]) - twin(twin_pipe, "a new prompt", 5)).max() <= 1
    finally:
        denoiser.kill()
        encoder.kill()


def test_denoiser_refuses_an_encoder_of_another_model(tiny_checkpoint, tmp_path):
    from qwen_image_trt.models.tiny import make_tiny_checkpoint

    other = make_tiny_checkpoint(tmp_path / "other", seed=1)
    encoder = Server(other, tmp_path / "jobs-e", "--role", "encoder", devices="cpu")
    try:
        run = subprocess.run([sys.executable, "-m", "qwen_image_trt.cli", "serve", str(tiny_checkpoint), "--role",
                              "denoiser", "--encoder-url", encoder.url, "--devices", "cpu", "--port", "1",
                              "--jobs-dir", str(tmp_path / "jobs-d")], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode != 0
        assert "encoder_url" in run.stderr and "identity" in run.stderr, run.stderr[-2000:]
    finally:
        encoder.kill()


@pytest.mark.parametrize("args,field", [(["--role", "denoiser"], "encoder_url"),
                                        (["--encoder-url", "http://x:1"], "encoder_url"),
                                        (["--role", "decoder"], "role"),
                                        (["--role", "denoiser", "--encoder-url", "ftp://x"], "encoder_url")])
def test_role_flags_are_checked_by_name(tiny_checkpoint, args, field):
    from qwen_image_trt.core.errors import InputError
    from qwen_image_trt.serve.config import ServerConfig

    kw = dict(zip([a.lstrip("-").replace("-", "_") for a in args[::2]], args[1::2]))
    with pytest.raises(InputError) as e:
        ServerConfig(checkpoint=str(tiny_checkpoint), **kw)
    assert e.value.field == field


def test_an_edit_through_split_roles_equals_the_one_process_pipeline(tiny_edit_2511, tmp_path):
    """Edit-2511 with two condition images of different sizes: the encoder service encodes the prompt with the
    images (vision-language path) and the images with the VAE; the denoiser's engines have no VAE encoder graph
    needed. The image equals the same edit run in one process on the same engines."""
    from PIL import Image

    from qwen_image_trt import load_pipeline

    checkpoint, engines = tiny_edit_2511
    red, blue = Image.new("RGB", (80, 48), (220, 30, 30)), Image.new("RGB", (64, 96), (20, 40, 230))

    def png(image) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()

    encoder = Server(checkpoint, tmp_path / "jobs-e", "--role", "encoder", devices="cpu")
    denoiser = Server(checkpoint, tmp_path / "jobs-d", "--engines", str(engines), "--role", "denoiser",
                      "--encoder-url", encoder.url, devices="cpu")
    try:
        wait_until("the denoiser sees its encoder", lambda: denoiser.health().get("encoder", {}).get("ok"))
        r = httpx.post(denoiser.url + "/v1/images/edits", headers=AUTH, timeout=120,
                       data={"prompt": "the cat wears a hat", "size": "64x64", "seed": "3", "negative_prompt": " ",
                             "num_inference_steps": "2"},
                       files=[("image", ("red.png", png(red), "image/png")),
                              ("image", ("blue.png", png(blue), "image/png"))])
        assert r.status_code == 200, r.text
        assert encoder.health()["encoder_calls"] >= 2  # prompt + negative, each with the images
    finally:
        denoiser.kill()
        encoder.kill()
    pipe = load_pipeline(checkpoint, engines=engines, backend="onnxruntime")
    want = pipe(prompt="the cat wears a hat", image=[red, blue], negative_prompt=" ", true_cfg_scale=4.0, height=64,
                width=64, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert np.abs(b64png(r.json()["data"][0]) - np.asarray(want, dtype=np.int16)).max() <= 1
