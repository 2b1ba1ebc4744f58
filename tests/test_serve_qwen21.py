"""`qitrt serve` on a Qwen-Image-2.1 checkpoint and its engines (uvicorn on loopback, a worker process): generations
and edits over HTTP, concurrent requests batched, each image equal to the same request run alone in this process.

2.1 pads a call's prompts to the longest, and a padded token moves the RoPE positions of everything after it, so the
worker puts requests in one pipeline call only when their prompts (and negative prompts) have equal token counts: a
request with a longer prompt in the same batch would differ from its twin if it were padded into their call. The
pipeline calls of a batch then co-batch their engine calls (runtime.co_batch21), which must leave every image equal
to its twin."""

from __future__ import annotations

import base64
import io
import threading

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from tests.serve_helpers import AUTH, Server

RNG = np.random.RandomState(7)
COND = Image.fromarray((RNG.rand(64, 96, 3) * 255).astype("uint8"))
RUN = {"height": 64, "width": 64, "num_inference_steps": 2}


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _arrays(response) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))), dtype=np.int16)
            for d in response.json()["data"]]


@pytest.fixture(scope="module")
def server(tiny21, tmp_path_factory):
    root, engines = tiny21
    s = Server(root, tmp_path_factory.mktemp("jobs21"), "--engines", str(engines), "--backend", "onnxruntime",
               "--max-queue-delay-ms", "600", devices="cpu")
    yield s
    s.kill()


@pytest.fixture(scope="module")
def twin(tiny21):
    from qwen_image_trt.runtime.pipeline import load_pipeline

    root, engines = tiny21
    return load_pipeline(root, engines=engines, backend="onnxruntime")


def _alone(pipe, prompt, seed, n=1, **kw) -> list[np.ndarray]:
    out = pipe(prompt=[prompt] * n, generator=[torch.Generator("cpu").manual_seed(seed + k) for k in range(n)],
               **RUN, **kw).images
    return [np.asarray(im, dtype=np.int16) for im in out]


def test_concurrent_generations_batch_and_equal_their_twins(server, twin):
    bodies = {"a": {"prompt": "a red cat", "seed": 1, "n": 2}, "b": {"prompt": "a blue dog", "seed": 2},
              "c": {"prompt": "a much longer prompt about a cat in the rain", "seed": 3}}
    results = {}

    def send(name):
        results[name] = httpx.post(server.url + "/v1/images/generations", headers=AUTH, timeout=120,
                                   json={**bodies[name], "size": "64x64", "num_inference_steps": 2})

    threads = [threading.Thread(target=send, args=(n,)) for n in bodies]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(r.status_code == 200 for r in results.values()), {k: r.text for k, r in results.items()}
    assert {r.headers["X-Batch-Images"] for r in results.values()} == {"4"}  # one batch of all four images
    for name, body in bodies.items():
        got = _arrays(results[name])
        want = _alone(twin, body["prompt"], body["seed"], body.get("n", 1), true_cfg_scale=1.0)
        assert len(got) == len(want) and got[0].shape == (64, 64, 4)
        for g, w in zip(got, want):
            assert np.abs(g - w).max() <= 1, name


def test_edit_with_cfg_equals_its_twin(server, twin):
    from qwen_image_trt.core.shapes import condition_resolution

    r = httpx.post(server.url + "/v1/images/edits", headers=AUTH, timeout=120,
                   files={"image": ("c.png", _png(COND), "image/png")},
                   data={"prompt": "make it red", "negative_prompt": "blurry", "true_cfg_scale": "4", "seed": "4",
                         "size": "64x64", "num_inference_steps": "2", "n": "2"})
    assert r.status_code == 200, r.text
    want = _alone(twin, "make it red", 4, 2, negative_prompt=["blurry"] * 2, true_cfg_scale=4.0, image=[COND],
                  output_resolution=condition_resolution(64, 64))
    got = _arrays(r)
    assert len(got) == 2 and all(np.abs(g - w).max() <= 1 for g, w in zip(got, want))


def test_21_server_refuses_what_21_has_not_by_name(server):
    r = httpx.post(server.url + "/v1/images/edits", headers=AUTH, timeout=60,
                   files={"image": ("c.png", _png(COND), "image/png"), "mask": ("m.png", _png(COND), "image/png")},
                   data={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "mask"
    r = httpx.post(server.url + "/v1/images/generations", headers=AUTH, timeout=60,
                   json={"prompt": "x", "size": "48x64"})
    assert r.status_code == 400 and "multiple of 32" in r.json()["error"]["message"]
    assert server.health()["status"] == "ok"


def test_worker_runs_a_turbo_batch_each_image_equal_to_its_request_alone(tmp_path):
    """The worker's batch for a 2.1-Turbo server (in process, a real pipe): Turbo's modular pipeline has no step
    callback and its own step count, so the calls carry neither; equal-length prompts share a call."""
    import multiprocessing

    from qwen_image_trt.models.tiny21 import TURBO_SIGMAS, make_tiny_21_checkpoint
    from qwen_image_trt.runtime.pipeline import load_pipeline
    from qwen_image_trt.serve.worker import Pipelines, prompt_tokens_21, run_batch

    root = make_tiny_21_checkpoint(tmp_path / "turbo", sample_sigmas=TURBO_SIGMAS)
    pipe = load_pipeline(root, backend="torch")
    assert pipe.pipeline_kind == "qwen-image-2.1-turbo"
    items = [dict(request_id="a", prompt="a red cat", negative_prompt=None, n=2, seed=1, true_cfg_scale=1.0,
                  images=[], mask=None),
             dict(request_id="b", prompt="a blue dog", negative_prompt=None, n=1, seed=7, true_cfg_scale=1.0,
                  images=[], mask=None)]
    assert prompt_tokens_21(pipe, "a red cat") == prompt_tokens_21(pipe, "a blue dog")
    key = (64, 64, len(TURBO_SIGMAS), False, "qwen-image-2.1-turbo", None, "", (), None, None)
    _, child = multiprocessing.Pipe()
    results, _ = run_batch(Pipelines(pipe), 1, key, items, child, multiprocessing.Value("i", -1))
    for it in items:
        got = [np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16) for png in results[it["request_id"]]]
        want = [np.asarray(im, dtype=np.int16) for im in pipe(
            prompt=[it["prompt"]] * it["n"], height=64, width=64,
            generator=[torch.Generator("cpu").manual_seed(it["seed"] + k) for k in range(it["n"])]).images]
        assert len(got) == it["n"] and all(np.abs(g - w).max() <= 1 for g, w in zip(got, want))
