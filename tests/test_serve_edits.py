"""POST /v1/images/edits and jobs with images on a real `qitrt serve` (uvicorn on loopback, worker processes):
OpenAI's multipart form through the official client, JSON with base64, safe decoding, batching of compatible edits,
and every result equal to the same call made alone in this process."""

import base64
import io
import threading

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from tests.serve_helpers import AUTH, KEY, Server, wait_until

RED = Image.new("RGB", (80, 48), (220, 30, 30))
BLUE = Image.new("RGB", (64, 96), (20, 40, 230))


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _img(item) -> np.ndarray:
    b64 = item["b64_json"] if isinstance(item, dict) else item.b64_json
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def _twin(pipe, seed, n=1, **kw) -> list[np.ndarray]:
    gens = [torch.Generator("cpu").manual_seed(seed + k) for k in range(n)]
    out = pipe(generator=gens if n > 1 else gens[0], num_images_per_prompt=n, **kw).images
    return [np.asarray(im, dtype=np.int16) for im in out]


@pytest.fixture(scope="module")
def t2i_server(tiny_checkpoint, tmp_path_factory):
    s = Server(tiny_checkpoint, tmp_path_factory.mktemp("jobs"), "--max-queue-delay-ms", "300", devices="cpu")
    yield s
    s.kill()


@pytest.fixture(scope="module")
def twins(tiny_checkpoint):
    from qwen_image_trt import load_pipeline

    return {k: load_pipeline(tiny_checkpoint, pipeline=k) for k in ("img2img", "inpaint")}


def test_openai_client_edit_is_img2img_on_a_text_to_image_model(t2i_server, twins):
    from openai import OpenAI

    client = OpenAI(base_url=t2i_server.url + "/v1", api_key=KEY)
    res = client.images.edit(image=("red.png", _png(RED), "image/png"), prompt="a red cube", n=2, size="64x64",
                             extra_body={"seed": 5, "strength": 0.8, "num_inference_steps": 4})
    want = [_twin(twins["img2img"], 5 + k, prompt="a red cube", image=RED, strength=0.8, height=64, width=64,
                  num_inference_steps=4, true_cfg_scale=1.0)[0] for k in range(2)]
    assert len(res.data) == 2
    for item, w in zip(res.data, want):
        assert np.abs(_img(item) - w).max() <= 1
    # with a mask it is inpaint, equal to the inpaint pipeline alone
    mask = Image.new("L", RED.size, 0)
    mask.paste(255, (20, 10, 60, 40))
    res = client.images.edit(image=("red.png", _png(RED), "image/png"), mask=("m.png", _png(mask), "image/png"),
                             prompt="a hat", size="64x64", extra_body={"seed": 9, "strength": 0.9})
    want = _twin(twins["inpaint"], 9, prompt="a hat", image=RED, mask_image=mask, strength=0.9, height=64,
                 width=64, num_inference_steps=2, true_cfg_scale=1.0)[0]
    assert np.abs(_img(res.data[0]) - want).max() <= 1


def test_compatible_edits_share_one_batch_and_equal_their_twins(t2i_server, twins):
    results = {}

    def send(name, image, seed):
        results[name] = httpx.post(t2i_server.url + "/v1/images/edits", headers=AUTH, timeout=90,
                                   files={"image": ("x.png", _png(image), "image/png")},
                                   data={"prompt": f"a {name} thing", "size": "64x64", "seed": str(seed),
                                         "strength": "0.7", "num_inference_steps": "4"})

    threads = [threading.Thread(target=send, args=a) for a in (("red", RED, 1), ("blue", BLUE, 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, image, seed in (("red", RED, 1), ("blue", BLUE, 2)):
        r = results[name]
        assert r.status_code == 200, r.text
        assert r.headers["X-Batch-Images"] == "2"  # two requests with their own images, one pipeline call
        want = _twin(twins["img2img"], seed, prompt=f"a {name} thing", image=image, strength=0.7, height=64,
                     width=64, num_inference_steps=4, true_cfg_scale=1.0)[0]
        assert np.abs(_img(r.json()["data"][0]) - want).max() <= 1


def _bomb() -> bytes:
    return _png(Image.new("1", (6000, 6000)))  # a few KB, 36 M pixels


@pytest.mark.parametrize("files, data, field, allowed", [
    ({"image": ("t.png", _png(RED)[:70], "image/png")}, {}, "image", "a complete image file"),
    ({"image": ("b.png", _bomb(), "image/png")}, {}, "image", "an image of at most 16777216 pixels"),
    ({"image": ("x.txt", b"not an image at all", "text/plain")}, {}, "image", "a PNG, JPEG or WebP image"),
    ({"image": ("r.png", _png(RED), "image/png")}, {"strength": "1.5"}, "strength", "a number in (0, 1]"),
    ({"mask": ("m.png", _png(Image.new("L", (80, 48))), "image/png")}, {}, "image", "1 image(s) for inpaint"),
])
def test_bad_edit_inputs_get_400_naming_the_field(t2i_server, files, data, field, allowed):
    r = httpx.post(t2i_server.url + "/v1/images/edits", headers=AUTH, timeout=30, files=files or None,
                   data={"prompt": "x", "size": "64x64", **data})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["allowed"].startswith(allowed)
    assert t2i_server.health()["ready"]  # and the server goes on


def test_edits_refusals_at_the_door_and_on_other_endpoints(t2i_server):
    url = t2i_server.url
    # a browser form from another site (CSRF) is refused; an API client sends no Origin
    r = httpx.post(url + "/v1/images/edits", headers={**AUTH, "Origin": "http://evil.example"},
                   files={"image": ("r.png", _png(RED), "image/png")}, data={"prompt": "x"})
    assert r.status_code == 403 and r.json()["error"]["param"] == "Origin"
    # multipart is for the edits endpoint only
    r = httpx.post(url + "/v1/images/generations", headers=AUTH, files={"image": ("r.png", _png(RED))},
                   data={"prompt": "x"})
    assert r.status_code == 415
    # images belong to edits and jobs, not to generations
    r = httpx.post(url + "/v1/images/generations", headers=AUTH,
                   json={"prompt": "x", "image": base64.b64encode(_png(RED)).decode()})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"
    r = httpx.post(url + "/v1/images/edits", headers=AUTH, json={"prompt": "x", "image": "!!not base64!!"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"
    r = httpx.post(url + "/v1/images/edits", headers=AUTH, json={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["allowed"] == "1 image(s) for img2img"
    # a form field sent twice is ambiguous: refused, not one of them silently kept
    r = httpx.post(url + "/v1/images/edits", headers=AUTH, files=[("image", ("r.png", _png(RED), "image/png")),
                                                                  ("prompt", (None, "a")), ("prompt", (None, "b"))])
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(url + "/v1/images/edits", headers=AUTH, files={"image": ("r.png", _png(RED), "image/png")},
                   data={"prompt": "x", "colour": "red"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "colour"
    # a ControlNet field on a server without one: refused by name, not ignored
    r = httpx.post(url + "/v1/images/edits", headers=AUTH, files={"image": ("r.png", _png(RED), "image/png")},
                   data={"prompt": "x", "controlnet_conditioning_scale": "0.5"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "controlnet_conditioning_scale", r.text
    assert "ControlNet server" in r.json()["error"]["allowed"]


def test_a_job_with_a_base64_image(t2i_server, twins):
    body = {"prompt": "a job", "image": base64.b64encode(_png(BLUE)).decode(), "strength": 0.9, "seed": 4,
            "size": "64x64"}
    r = httpx.post(t2i_server.url + "/v1/jobs", headers=AUTH, json=body, timeout=30)
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    wait_until("job done", lambda: t2i_server.job(job)["status"] == "succeeded", 90)
    png = httpx.get(f"{t2i_server.url}/v1/jobs/{job}/result", headers=AUTH, timeout=10).content
    got = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    want = _twin(twins["img2img"], 4, prompt="a job", image=BLUE, strength=0.9, height=64, width=64,
                 num_inference_steps=2, true_cfg_scale=1.0)[0]
    assert np.abs(got - want).max() <= 1


# -- an Edit-Plus (2511) server: several condition images through the official client -------------------------------
GREEN = Image.new("RGB", (160, 96), (20, 200, 30))  # RED's aspect ratio: resized to the same size
GRAY = Image.new("RGB", (64, 96), (120, 120, 120))  # BLUE's


def test_openai_client_edits_with_two_images_on_edit_plus_co_batched(tiny_edit_2511, tmp_path):
    """Edit-2511 on engines: the official client's images.edit with two condition images, and two concurrent
    requests with their own images (resized to the same sizes) sharing one batch, each equal to its call alone."""
    from openai import OpenAI

    from qwen_image_trt import load_pipeline

    root, engines = tiny_edit_2511
    server = Server(root, tmp_path / "jobs", "--engines", str(engines), "--max-queue-delay-ms", "500",
                    devices="cpu")
    results = {}
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=300)

        def send(name, images, seed, n):
            results[name] = client.images.with_raw_response.edit(
                image=[(f"{k}.png", _png(im), "image/png") for k, im in enumerate(images)], prompt=f"the {name} cat",
                n=n, size="64x64", extra_body={"seed": seed, "negative_prompt": " "})

        threads = [threading.Thread(target=send, args=a) for a in (("red", (RED, BLUE), 3, 2),
                                                                   ("green", (GREEN, GRAY), 8, 1))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        r = httpx.post(server.url + "/v1/images/generations", headers=AUTH, json={"prompt": "x"})
        assert r.status_code == 400 and "POST /v1/images/edits" in r.json()["error"]["message"]
        r = httpx.post(server.url + "/v1/images/edits", headers=AUTH, timeout=30, data={"prompt": "x"},
                       files=[("image", ("r.png", _png(RED), "image/png"))] * 4)
        assert r.status_code == 400 and r.json()["error"]["allowed"] == "1 to 3 image(s) for edit-plus"
    finally:
        server.kill()
    pipe = load_pipeline(root, engines=engines, backend="onnxruntime")
    for name, images, seed, n in (("red", [RED, BLUE], 3, 2), ("green", [GREEN, GRAY], 8, 1)):
        raw = results[name]
        assert raw.headers["X-Batch-Images"] == "3"  # both requests' images in one batch
        data = raw.parse().data
        want = _twin(pipe, seed, n=n, prompt=f"the {name} cat", image=images, negative_prompt=" ",
                     true_cfg_scale=4.0, height=64, width=64, num_inference_steps=2)
        assert len(data) == n
        for item, w in zip(data, want):
            assert np.abs(_img(item) - w).max() <= 1


def _without_vae_encoder(engines, out):
    """A copy of an engine folder whose manifest lists no vae_encoder (as `--components transformer,vae_decoder`)."""
    import json
    import shutil

    shutil.copytree(engines, out)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["components"]["vae_encoder"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_an_engine_folder_without_the_vae_encoder(tiny_checkpoint, tiny_engines, tiny_edit_2511, tmp_path):
    from qwen_image_trt.core.errors import InputError
    from qwen_image_trt.serve.app import check_start
    from qwen_image_trt.serve.config import ServerConfig

    # an edit checkpoint cannot serve a single request without it: refused at start, not per request
    edit_root, edit_engines = tiny_edit_2511
    bare = _without_vae_encoder(edit_engines, tmp_path / "edit-bare")
    with pytest.raises(InputError) as e:
        check_start(ServerConfig(checkpoint=str(edit_root), engines=str(bare)))
    assert e.value.field == "engines" and "vae_encoder" in e.value.allowed
    # a text-to-image server still generates, and answers an edit with a 400 naming why
    server = Server(tiny_checkpoint, tmp_path / "jobs", "--engines", str(_without_vae_encoder(tiny_engines,
                                                                                              tmp_path / "bare")),
                    devices="cpu")
    try:
        r = httpx.post(server.url + "/v1/images/edits", headers=AUTH, timeout=30,
                       files={"image": ("r.png", _png(RED), "image/png")}, data={"prompt": "x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "image"
        assert "vae_encoder" in r.json()["error"]["allowed"]
        assert server.post({"prompt": "still fine", "size": "64x64"}).status_code == 200
    finally:
        server.kill()
