"""`qitrt serve --ray` on a local Ray cluster of CPU replicas (the real CLI in a subprocess): the OpenAI API, images
equal to their unbatched twins, routing of a batch key to the replica that holds it warm, and a replica killed
mid-request whose request is sent again elsewhere. Skipped where Ray Serve is not installed (it is not in the
`all` extra: pip install 'qwen-image-trt[ray]')."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from serve_helpers import AUTH, KEY, ROOT, free_port

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'qwen-image-trt[ray]'")


def start_ray_server(checkpoint, log_dir, *extra: str) -> tuple[str, subprocess.Popen]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "QITRT_API_KEY": KEY, "RAY_DEDUP_LOGS": "0"}
    log = open(log_dir / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "qwen_image_trt.cli", "serve", str(checkpoint), "--ray",
                             "--ray-cpus-per-replica", "0.5", "--port", str(port), "--default-size", "64x64",
                             "--max-queue-delay-ms", "20", "--threads-per-worker", "1", *extra], env=env, cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail("qitrt serve --ray exited: " + log.read()[-4000:])
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        log.seek(0)
        pytest.fail("qitrt serve --ray did not become ready: " + log.read()[-4000:])
    return url, proc


def stop_ray_server(proc) -> None:
    os.killpg(proc.pid, signal.SIGINT)  # serve.shutdown(), then the local cluster goes with the driver
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)


@pytest.fixture(scope="module")
def ray_server(tiny_checkpoint, tmp_path_factory):
    url, proc = start_ray_server(tiny_checkpoint, tmp_path_factory.mktemp("ray"), "--ray-replicas", "2",
                                 "--devices", "cpu,cpu")
    yield url
    stop_ray_server(proc)


@pytest.fixture(scope="module")
def twin_pipe(tiny_checkpoint):
    from qwen_image_trt import load_pipeline

    return load_pipeline(tiny_checkpoint, backend="torch")


def post(url, body):
    return httpx.post(url + "/v1/images/generations", json=body, headers=AUTH, timeout=120)


def image(res) -> np.ndarray:
    data = base64.b64decode(res.json()["data"][0]["b64_json"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_concurrent_requests_batch_and_equal_their_unbatched_twins(ray_server, twin_pipe):
    bodies = [{"prompt": f"a red fox number {i}", "negative_prompt": "blurry", "seed": 11 + i, "size": "64x64",
               "num_inference_steps": 2, "true_cfg_scale": 3.0 + i} for i in range(6)]

    async def main():
        async with httpx.AsyncClient(headers=AUTH, timeout=120) as c:
            return await asyncio.gather(*[c.post(ray_server + "/v1/images/generations", json=b) for b in bodies])

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text for r in responses]
    assert max(int(r.headers["x-batch-images"]) for r in responses) > 1  # Ray's @serve.batch did batch them
    for b, r in zip(bodies, responses):
        want = twin_pipe(prompt=b["prompt"], negative_prompt="blurry", true_cfg_scale=b["true_cfg_scale"], height=64,
                         width=64, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(b["seed"]))
        assert np.abs(image(r) - np.asarray(want.images[0], dtype=np.int16)).max() <= 1


def test_bad_input_and_missing_key_are_refused(ray_server):
    r = post(ray_server, {"prompt": "x", "size": "72x64"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "size"
    assert httpx.post(ray_server + "/v1/images/generations", json={"prompt": "x"}).status_code == 401


def test_a_batch_key_goes_to_the_replica_that_holds_it_warm(ray_server):
    body = {"prompt": "a cat", "size": "64x64", "num_inference_steps": 3}
    pids = {post(ray_server, {**body, "seed": i}).headers["x-replica-pid"] for i in range(4)}
    assert len(pids) == 1, pids


def test_a_replica_killed_mid_request_has_it_retried_elsewhere(ray_server):
    body = {"prompt": "a slow dog", "size": "128x128", "num_inference_steps": 100, "seed": 1}
    first = post(ray_server, body)  # warms the key on one replica: the next request goes there too
    assert first.status_code == 200, first.text
    victim = int(first.headers["x-replica-pid"])
    box = {}
    thread = threading.Thread(target=lambda: box.update(r=post(ray_server, {**body, "seed": 2})))
    thread.start()
    time.sleep(0.5 * float(first.headers["x-compute-time-ms"]) / 1000)  # mid-request
    os.kill(victim, signal.SIGKILL)
    thread.join(180)
    r = box["r"]
    assert r.status_code == 200, r.text
    assert int(r.headers["x-attempts"]) == 2 and int(r.headers["x-replica-pid"]) != victim
    metrics = httpx.get(ray_server + "/metrics", headers=AUTH).text
    assert "qitrt_ray_retries_total 1.0" in metrics


def test_openai_edits_run_as_img2img_on_ray(ray_server, tiny_checkpoint):
    """OpenAI's multipart edits form on the Ray ingress: a text-to-image checkpoint runs it as img2img, the
    prompt's embeddings from the encoder deployment, equal to diffusers' img2img member in one process."""
    from openai import OpenAI

    from qwen_image_trt import load_pipeline

    red = Image.new("RGB", (80, 48), (220, 30, 30))
    buf = io.BytesIO()
    red.save(buf, format="PNG")
    client = OpenAI(base_url=ray_server + "/v1", api_key=KEY, timeout=120)
    res = client.images.edit(image=("red.png", buf.getvalue(), "image/png"), prompt="a red cube", size="64x64",
                             extra_body={"seed": 5, "strength": 0.8, "num_inference_steps": 4})
    pipe = load_pipeline(tiny_checkpoint, pipeline="img2img")
    want = pipe(prompt="a red cube", image=red, strength=0.8, height=64, width=64, num_inference_steps=4,
                true_cfg_scale=1.0, generator=torch.Generator("cpu").manual_seed(5)).images[0]
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json))).convert("RGB"), dtype=np.int16)
    assert np.abs(got - np.asarray(want, dtype=np.int16)).max() <= 1


def test_edit_plus_with_two_images_on_ray(tiny_edit_2511, tmp_path):
    """Edit-2511 on Ray: the prompt is encoded with both condition images by the encoder deployment (the
    vision-language path); the image equals the same edit in one process on the same engines."""
    from qwen_image_trt import load_pipeline

    checkpoint, engines = tiny_edit_2511
    red, blue = Image.new("RGB", (80, 48), (220, 30, 30)), Image.new("RGB", (64, 96), (20, 40, 230))
    files = []
    for name, im in (("red.png", red), ("blue.png", blue)):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        files.append(("image", (name, buf.getvalue(), "image/png")))
    url, proc = start_ray_server(checkpoint, tmp_path, "--engines", str(engines), "--devices", "cpu")
    try:
        r = httpx.post(url + "/v1/images/edits", headers=AUTH, timeout=120, files=files,
                       data={"prompt": "the cat wears a hat", "size": "64x64", "seed": "3", "negative_prompt": " ",
                             "num_inference_steps": "2"})
    finally:
        stop_ray_server(proc)
    assert r.status_code == 200, r.text
    pipe = load_pipeline(checkpoint, engines=engines, backend="onnxruntime")
    want = pipe(prompt="the cat wears a hat", image=[red, blue], negative_prompt=" ", true_cfg_scale=4.0, height=64,
                width=64, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert np.abs(image(r) - np.asarray(want, dtype=np.int16)).max() <= 1
