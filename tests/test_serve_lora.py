"""Per-request LoRA adapters on a real `qitrt serve` (uvicorn on loopback, one ONNX Runtime worker process):
adapters listed in /v1/models, picked per request, batched only with the same adapter set, each image equal to
the same call made in this process with diffusers' LoRA API, and bad adapter requests refused by name."""

import base64
import io
import shutil
import threading

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from qwen_image_trt.models.tiny import make_tiny_lora
from tests.serve_helpers import AUTH, Server


def _img(item) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def lora_dir(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    make_tiny_lora(tiny_checkpoint, folder / "style.safetensors", fmt="kohya", seed=3)
    make_tiny_lora(tiny_checkpoint, folder / "detail.safetensors", fmt="peft", seed=4)
    # A LoRA made for another model: same module names, other widths.
    from safetensors.torch import save_file

    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 96),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(96, 4)},
              str(folder / "foreign.safetensors"))
    return folder


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tiny_engines, lora_dir, tmp_path_factory):
    s = Server(tiny_checkpoint, tmp_path_factory.mktemp("jobs"), "--engines", str(tiny_engines), "--lora-dir",
               str(lora_dir), "--max-queue-delay-ms", "1000", devices="cpu")  # room for slow thread starts
    yield s
    s.kill()


@pytest.fixture(scope="module")
def twin(tiny_checkpoint, tiny_engines, lora_dir):
    from qwen_image_trt import load_pipeline

    pipe = load_pipeline(tiny_checkpoint, engines=tiny_engines, backend="onnxruntime")
    for name in ("style", "detail"):
        pipe.load_lora_weights(str(lora_dir / f"{name}.safetensors"), adapter_name=name)

    def run(seed, loras):
        if loras:
            pipe.enable_lora()
            pipe.set_adapters([n for n, _ in loras], [s for _, s in loras])
        else:
            pipe.disable_lora()
        out = pipe(prompt="a red fox", height=64, width=64, num_inference_steps=2, true_cfg_scale=1.0,
                   generator=torch.Generator("cpu").manual_seed(seed)).images[0]
        return np.asarray(out, dtype=np.int16)

    return run


def test_models_lists_the_base_model_and_the_adapters(server, tiny_checkpoint):
    r = httpx.get(server.url + "/v1/models", headers=AUTH, timeout=10)
    assert r.status_code == 200
    data = r.json()["data"]
    assert data[0]["id"] == tiny_checkpoint.name and data[0]["kind"] == "base"
    assert [(m["id"], m["kind"]) for m in data[1:]] == [("detail", "lora"), ("foreign", "lora"), ("style", "lora")]


def test_requests_pick_adapters_batch_by_adapter_set_and_equal_their_twins(server, twin):
    """Four requests at once: two with style:0.8 (one batch of two), one with detail+style, one without. Each
    image equals the in-process pipeline with the same adapters; the adapters change the image."""
    bodies = [dict(prompt="a red fox", seed=11, lora="style:0.8"), dict(prompt="a red fox", seed=12, lora=["style:0.8"]),
              dict(prompt="a red fox", seed=13, lora=["style:0.5", "detail:-0.7"]), dict(prompt="a red fox", seed=14)]
    results = [None] * len(bodies)

    def post(i):
        results[i] = server.post(bodies[i])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200] * 4, [r.text for r in results]
    batch = [int(r.headers["X-Batch-Images"]) for r in results]
    assert batch[0] == batch[1] == 2 and batch[2] == batch[3] == 1
    wants = [twin(11, [("style", 0.8)]), twin(12, [("style", 0.8)]), twin(13, [("detail", -0.7), ("style", 0.5)]),
             twin(14, [])]
    for r, want in zip(results, wants):
        assert np.abs(_img(r.json()["data"][0]) - want).max() <= 1
    assert np.abs(twin(11, []) - wants[0]).max() >= 4  # what "equal" is measured against: the adapter shows


@pytest.mark.parametrize("lora, status, needle", [
    ("missing", 404, "no LoRA adapter named 'missing'"),
    ("foreign", 400, "another model"),
    ("style:11", 400, "scale in"),
    (["style", "style:0.5"], 400, "each adapter once"),
    ("../style", 400, "adapter name"),
    (["a", "b", "c", "d", "e"], 400, "at most 4"),
])
def test_bad_adapter_requests_are_refused_by_name(server, lora, status, needle):
    r = server.post(dict(prompt="a red fox", lora=lora))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["param"] == "lora"


def test_a_new_adapter_file_is_served_without_a_restart(server, lora_dir):
    shutil.copy(lora_dir / "style.safetensors", lora_dir / "style_copy.safetensors")
    r = server.post(dict(prompt="a red fox", seed=1, lora="style_copy"))
    assert r.status_code == 200, r.text
    ids = [m["id"] for m in httpx.get(server.url + "/v1/models", headers=AUTH, timeout=10).json()["data"]]
    assert "style_copy" in ids


def test_worker_adapter_budget_unloads_the_least_recently_used(tiny_checkpoint, tiny_engines, lora_dir):
    """The worker side alone (in process): a budget of one adapter file keeps one adapter loaded."""
    from qwen_image_trt import load_pipeline
    from qwen_image_trt.serve.adapters import WorkerAdapters

    pipe = load_pipeline(tiny_checkpoint, engines=tiny_engines, backend="onnxruntime")
    one_file = (lora_dir / "style.safetensors").stat().st_size
    cache = WorkerAdapters(lora_dir, max_bytes=one_file)
    cache.activate(pipe, [("style", 1.0)])
    cache.activate(pipe, [("detail", 0.5)])
    assert list(cache.loaded) == ["detail"] and pipe.get_list_adapters() == {"transformer": ["detail"]}
    cache.activate(pipe, [("detail", 0.5), ("style", 1.0)])  # a set over the budget by itself still runs
    assert set(pipe.get_active_adapters()) == {"detail", "style"}
    cache.activate(pipe, [])
    assert pipe.transformer.runner._overrides == {}  # no adapter: the graph's own weights


def test_a_job_read_back_from_the_store_keeps_its_batch_key():
    """Jobs persist their parameters as JSON (tuples come back as lists); a restored job must batch as it was."""
    import dataclasses
    import json

    from qwen_image_trt.serve.protocol import GenParams

    p = GenParams("a fox", None, 1, 64, 64, 2, 4.0, 7, 1, 60.0, loras=(("detail", -0.5), ("style", 0.8)))
    back = GenParams(**json.loads(json.dumps(dataclasses.asdict(p))))
    assert back.key == p.key and hash(back.key) == hash(p.key)
