"""Qwen-Image-2.1 and 2.1-Turbo on engines: `export_onnx`/`qitrt export` of a 2.1 checkpoint (the transformer's
uncached, extract and cached passes, the 2.1 VAE), the drop-ins inside diffusers' own QwenImage21Pipeline and the Turbo
modular pipeline (`load_pipeline`), `qitrt generate` and `qitrt parity`, and the TensorRT profiles of the 2.1 graphs
checked against every shape a real pipeline run feeds them. Equal to eager at fp32 with and without the prefix KV
cache, for generation and for editing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_image_trt.cli import main
from qwen_image_trt.core.errors import InputError

PROMPT = "a red cat on a window sill"
NEGATIVE = "blurry, low quality, watermark"
RNG = np.random.RandomState(3)
IMAGE = Image.fromarray((RNG.rand(64, 96, 3) * 255).astype("uint8"))  # 3:2, resized by the pipeline
RUN = {"height": 64, "width": 64, "num_inference_steps": 3, "output_type": "latent"}
EDIT = {"image": IMAGE, "output_resolution": 64}
TOL = 1e-5


def _rel(a, b):
    a, b = (torch.as_tensor(np.asarray(x)).float() for x in (a, b))
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def pipes(tiny21):
    from qwen_image_trt.runtime.pipeline import load_pipeline

    root, engines = tiny21
    return load_pipeline(root, backend="torch"), load_pipeline(root, engines=engines, backend="onnxruntime")


# -- export ----------------------------------------------------------------------------------------------------------
def test_export_writes_the_21_graphs_with_their_checks(tiny21):
    from qwen_image_trt.core.manifest import read_manifest

    root, engines = tiny21
    m = read_manifest(engines)
    assert list(m.components) == ["transformer_uncached", "transformer_extract", "transformer_cached", "vae_decoder",
                                  "vae_encoder"]
    assert m.checkpoint.pipeline == "QwenImage21Pipeline" and m.sampling is None
    for name, c in m.components.items():
        # each graph ran in ONNX Runtime at a shape other than the traced one, against the eager wrapper
        assert c.check["max_abs_err_vs_eager"] <= TOL * max(1.0, c.check["max_abs_eager"]), name
        assert c.graph.intact(engines)
    assert m.components["transformer_cached"].dynamic_axes["prefix_kv"] == {"2": "batch", "3": "prefix_tokens"}


def test_vae_graphs_equal_the_stock_21_vae(tiny21):
    """The one-frame wrappers the VAE graphs are traced from equal AutoencoderKLQwenImage21.decode/encode (its frame
    loop and feature cache, the decoder's first chunk), and the exported graphs equal them at another size."""
    from qwen_image_trt.compile.export import exported_file
    from qwen_image_trt.models import checkpoint as ckpt
    from qwen_image_trt.models.specs import VaeDecoderExport, VaeEncoderExport
    from qwen_image_trt.models.transformer21_export import OrtGraph21

    root, engines = tiny21
    vae = ckpt.load_vae(root)
    assert type(vae).__name__ == "AutoencoderKLQwenImage21"
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 64, 1, 6, 4, generator=g)
    images = torch.rand(1, 4, 1, 96, 64, generator=g) * 2 - 1  # RGBA
    with torch.no_grad():
        decoded = vae.decode(latents).sample
        params = vae.encode(images).latent_dist.parameters
        assert decoded.shape == (2, 4, 1, 96, 64)
        assert _rel(VaeDecoderExport(vae)(latents), decoded) <= TOL
        assert _rel(VaeEncoderExport(vae)(images), params) <= TOL
    assert _rel(OrtGraph21(exported_file(engines, "vae_decoder"))(latents), decoded) <= TOL
    assert _rel(OrtGraph21(exported_file(engines, "vae_encoder"))(images), params) <= TOL


def test_export_refuses_what_21_has_not_by_name(tiny21, tmp_path):
    from qwen_image_trt.compile.export import export_onnx

    root, _ = tiny21
    with pytest.raises(InputError, match=r"components.*transformer_uncached, transformer_extract"):
        export_onnx(root, tmp_path / "x", precision="fp32", components=["transformer"], progress=False)
    with pytest.raises(InputError, match=r"loras.*Qwen-Image-2.1"):
        export_onnx(root, tmp_path / "y", precision="fp32", loras=["/nonexistent.safetensors"], progress=False)
    assert not any(tmp_path.iterdir())


# -- the stock pipeline on the engines --------------------------------------------------------------------------------
CASES = {
    "t2i": ({}, 1),
    "edit": (EDIT, 1),
    "cfg": ({"negative_prompt": NEGATIVE, "true_cfg_scale": 4.0}, 2),
    # (diffusers' own pipeline fails with one negative prompt for several prompts, or with CFG and
    # num_images_per_prompt > 1: its negative embeddings and img_mask are not expanded to the batch)
    "edit-cfg-batch": ({**EDIT, "prompt": [PROMPT, "two dogs on a long beach at dusk"],
                        "negative_prompt": [NEGATIVE, "dark"], "true_cfg_scale": 3.0}, 2),
    "edit-two-prompts-x2": ({**EDIT, "prompt": [PROMPT, "two dogs"], "num_images_per_prompt": 2}, 1),
}


@pytest.mark.parametrize("cache", [True, False], ids=["kv-cache", "no-kv-cache"])
@pytest.mark.parametrize("case", CASES)
def test_engine_pipeline_equals_stock(pipes, case, cache):
    """QwenImage21Pipeline's own loop with the engine drop-ins gives the stock modules' latents; the engine calls show
    which passes ran: with the cache one extract per CFG branch, then at the first step a cached pass per branch and
    at every later step one cached pass for both branches (batched CFG, the engines' default); without the cache
    the uncached pass every time and branch."""
    eager, engine = pipes
    kw, branches = CASES[case]
    kw = {"prompt": PROMPT, **kw, "use_kv_cache": cache}
    want = eager(generator=torch.Generator().manual_seed(0), **RUN, **kw).images
    before = dict(engine.transformer.calls)
    got = engine(generator=torch.Generator().manual_seed(0), **RUN, **kw).images
    calls = {k: v - before[k] for k, v in engine.transformer.calls.items()}
    assert got.shape == want.shape and _rel(got, want) <= TOL
    steps = RUN["num_inference_steps"]
    cfg = branches == 2
    expected = {"uncached": 0, "extract": branches, "cached": steps + 1 if cfg else steps} if cache else \
        {"uncached": steps * branches, "extract": 0, "cached": 0}
    assert calls == expected
    batched = steps - 1 if cfg and cache else 0
    assert engine.cfg_stats == {"batched": batched, "taken": batched, "missed": 0}


@pytest.mark.parametrize("case", ["cfg", "edit-cfg-batch"])
def test_batched_cfg_equals_the_stock_two_calls(pipes, case):
    """The same request with batch_cfg off (diffusers' two calls per step) and on (one call per step after the
    first, prompt and negative of different lengths padded with masked keys): equal latents, 2 * steps against
    steps + 1 cached calls, and the cached graph saw both branches stacked."""
    _, engine = pipes
    kw = {"prompt": PROMPT, **CASES[case][0], **RUN}
    seen = []
    runner = engine.transformer.runners["cached"]
    infer = runner.infer
    runner.infer = lambda feeds: (seen.append(feeds["prefix_kv"].shape), infer(feeds))[1]
    try:
        results = {}
        for on in (False, True):
            before = engine.transformer.calls["cached"]
            results[on] = engine(generator=torch.Generator().manual_seed(0), batch_cfg=on, **kw).images
            results[on, "calls"] = engine.transformer.calls["cached"] - before
    finally:
        runner.infer = infer
    steps, batch = RUN["num_inference_steps"], len(kw["prompt"]) if isinstance(kw["prompt"], list) else 1
    assert _rel(results[True], results[False]) <= TOL
    assert (results[False, "calls"], results[True, "calls"]) == (2 * steps, steps + 1)
    stacked = [s for s in seen[2 * steps:] if s[2] == 2 * batch]
    assert len(stacked) == steps - 1
    # the prompt's and the negative's prefixes differ in length: the stacked K/V hold the longer one
    assert stacked[0][3] == max(s[3] for s in seen[:2 * steps])


def test_a_mispredicted_uncond_call_runs_as_usual(tiny21):
    """At a cond call the drop-in computes the uncond branch it predicts will follow; an uncond call with other
    latents or timestep (a custom loop) must not take it: it runs on its own cache and equals the plain forward."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    from qwen_image_trt.models.transformer21_export import sample_inputs_21
    from qwen_image_trt.runtime.pipeline import load_pipeline

    root, engines = tiny21
    t = load_pipeline(root, engines=engines, backend="onnxruntime", text_encoder=False).transformer
    cond_kw = sample_inputs_21(t.config, batch=1, pad=0, seed=1)
    neg_kw = sample_inputs_21(t.config, batch=1, text=(3, 2), pad=0, seed=2)
    neg_kw["hidden_states"], neg_kw["timestep"] = cond_kw["hidden_states"], cond_kw["timestep"]
    caches = {b: QwenImage21KVCache(len(t.transformer_blocks)) for b in ("cond", "uncond")}
    t.batch_cfg, t.cfg_stats = True, {"batched": 0, "taken": 0, "missed": 0}

    def step(branch, kw, mode, **change):
        with t.cache_context(branch):
            return t(**{**kw, **change}, kv_cache=caches[branch], kv_cache_mode=mode, return_dict=False)[0]

    step("cond", cond_kw, "extract")
    step("uncond", neg_kw, "extract")
    step("cond", cond_kw, "cached")  # predicts the uncond call with these latents and timestep
    other = {"hidden_states": cond_kw["hidden_states"] + 0.5, "timestep": cond_kw["timestep"] * 0.5}
    got = step("uncond", neg_kw, "cached", **other)
    assert t.cfg_stats == {"batched": 1, "taken": 0, "missed": 1}
    t.batch_cfg = False
    want = step("uncond", neg_kw, "cached", **other)
    assert _rel(got, want) <= TOL
    # latents changed in place after the cond call (same tensor object): not taken either
    t.batch_cfg = True
    step("cond", cond_kw, "cached")
    cond_kw["hidden_states"].mul_(0.5)
    moved = step("uncond", neg_kw, "cached")
    assert t.cfg_stats["missed"] == 2
    t.batch_cfg = False
    assert _rel(moved, step("uncond", neg_kw, "cached")) <= TOL
    # the predicted call itself is taken, and equals the plain forward
    t.batch_cfg = True
    step("cond", cond_kw, "cached")
    taken = step("uncond", neg_kw, "cached")
    t.batch_cfg = False
    assert t.cfg_stats["taken"] == 1 and _rel(taken, step("uncond", neg_kw, "cached")) <= TOL


def test_co_batched_requests_of_other_layouts_share_the_cached_calls(pipes, monkeypatch):
    """Three requests with prompts of different lengths, one with its own condition image, each with CFG, run as
    concurrent pipeline calls (runtime.co_batch): after the first step, every step is one engine call for all three
    requests and both branches (K/V padded to the longest prefix), the padded merge made once, not per step; each
    request's latents equal its run alone."""
    from qwen_image_trt.runtime import co_batch21
    from qwen_image_trt.runtime.co_batch import call_together

    _, engine = pipes
    requests = [{"prompt": "a red cat", "negative_prompt": "blurry", "true_cfg_scale": 4.0, "seed": 1},
                {"prompt": "two dogs on a long green sofa in the afternoon sun", "negative_prompt": NEGATIVE,
                 "true_cfg_scale": 3.0, "seed": 2},
                {"prompt": "make it blue", **EDIT, "negative_prompt": "dark", "true_cfg_scale": 4.0, "seed": 3}]

    def call(r):
        kw = {k: v for k, v in r.items() if k != "seed"}
        return {**RUN, **kw, "generator": torch.Generator().manual_seed(r["seed"])}

    alone = [engine(**call(r)).images for r in requests]
    merges = []
    merge = co_batch21.merge_prefixes
    monkeypatch.setattr(co_batch21, "merge_prefixes", lambda sources: (merges.append(len(sources)), merge(sources))[1])
    before = dict(engine.transformer.calls)
    outs, batcher = call_together(engine, [call(r) for r in requests])
    calls = {k: v - before[k] for k, v in engine.transformer.calls.items()}
    steps = RUN["num_inference_steps"]
    # first step: three extracts and a merged cached call per branch; then one call per step
    assert calls == {"uncached": 0, "extract": 6, "cached": 2 + (steps - 1)}
    assert batcher.engine_calls[-1] == (3,) and merges == [3, 3, 3]
    for got, want in zip(outs, alone):
        assert _rel(got.images, want) <= TOL


def test_padding_bound_splits_what_padding_would_slow(pipes):
    """Padding a prefix costs attention work: merges stay within MAX_PADDING_COST of the work. At real width a
    1024^2 generation and an edit with a 1024^2 condition image merge; on the tiny checkpoint at 256^2 they do not.
    A CFG pair whose padding is over the bound (a long prompt, a one-token negative) keeps diffusers' two calls,
    equal to them."""
    from qwen_image_trt.models.flops21 import REAL_21_CONFIG, linear_cost_in_keys
    from qwen_image_trt.runtime.co_batch21 import MAX_PADDING_COST, padding_cost, padding_groups

    _, engine = pipes
    real, tiny = linear_cost_in_keys(REAL_21_CONFIG), engine.transformer.linear_keys
    assert (real, tiny) == (26624, 416)
    t2i, edit = 40, 40 + 16 + 4096  # prefix tokens: prompt and template; + an image wrapper and a 1024^2 image
    assert padding_groups([t2i, edit, t2i + 30], 4096, real) == [[0, 2, 1]]
    assert padding_cost([t2i, edit], 4096, real) < MAX_PADDING_COST
    assert padding_groups([t2i, 40 + 16 + 256, t2i + 30], 256, tiny) == [[0, 2], [1]]
    prompt = " ".join(["a very detailed painting of a red cat"] * 20)
    kw = {"prompt": prompt, "negative_prompt": " ", "true_cfg_scale": 4.0, **RUN}
    results = {}
    for on in (False, True):
        before = engine.transformer.calls["cached"]
        results[on] = engine(generator=torch.Generator().manual_seed(0), batch_cfg=on, **kw).images
        results[on, "calls"] = engine.transformer.calls["cached"] - before
    assert engine.cfg_stats["batched"] == 0
    assert results[False, "calls"] == results[True, "calls"] == 2 * RUN["num_inference_steps"]
    assert _rel(results[True], results[False]) <= TOL


def test_embedding_cache_serves_prompts_without_images(tiny21, pipes):
    """`embedding_cache_bytes` on a 2.1 pipeline: prompts without images (and the negatives) are encoded once, a
    repeat hits, and the latents equal the uncached pipeline's; an edit's prompt (encoded with its images) does not go
    through the cache; a text encoder of another identity never hits."""
    from qwen_image_trt.runtime.embed_cache import cache_prompt_embeddings
    from qwen_image_trt.runtime.pipeline import load_pipeline

    root, engines = tiny21
    _, plain = pipes
    pipe = load_pipeline(root, engines=engines, backend="onnxruntime", embedding_cache_bytes=1 << 20)
    stats = pipe.embedding_cache.stats
    two = {"prompt": [PROMPT, "two dogs"], "negative_prompt": ["", NEGATIVE], "true_cfg_scale": 4.0, **RUN}
    for expected in ({"hits": 0, "misses": 4}, {"hits": 4, "misses": 4}):
        got = pipe(generator=torch.Generator().manual_seed(0), **two).images
        assert {k: getattr(stats, k) for k in expected} == expected
        assert _rel(got, plain(generator=torch.Generator().manual_seed(0), **two).images) <= TOL
    edit = {"prompt": PROMPT, **EDIT, **RUN}
    got = pipe(generator=torch.Generator().manual_seed(0), **edit).images
    assert (stats.hits, stats.misses) == (4, 4)
    assert _rel(got, plain(generator=torch.Generator().manual_seed(0), **edit).images) <= TOL
    pipe.encoder_identity = "another-encoder"
    cache_prompt_embeddings(pipe, pipe.embedding_cache)
    pipe(generator=torch.Generator().manual_seed(0), **{**two, "num_inference_steps": 1})
    assert stats.misses == 8  # the new keys miss (the wrapped encoder underneath is the earlier cached one)


def test_batched_cfg_is_refused_by_name_on_the_torch_backend(pipes):
    eager, _ = pipes
    with pytest.raises(InputError, match="batch_cfg.*torch backend"):
        eager(prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=4.0, batch_cfg=True, **RUN)


def test_without_the_uncached_graph_a_cacheless_step_is_extract_then_cached(tiny21, pipes):
    """`qitrt export` leaves the uncached pass out by default (a third copy of the weights): `use_kv_cache=False`
    then runs extract and cached at every step, equal to the stock uncached forward."""
    from qwen_image_trt.runtime.pipeline import load_pipeline

    root, engines = tiny21
    eager, _ = pipes
    engine = load_pipeline(root, engines=engines, backend="onnxruntime")
    del engine.transformer.runners["uncached"]
    kw = {"prompt": PROMPT, **EDIT, "negative_prompt": NEGATIVE, "true_cfg_scale": 4.0, "use_kv_cache": False, **RUN}
    want = eager(generator=torch.Generator().manual_seed(0), **kw).images
    got = engine(generator=torch.Generator().manual_seed(0), **kw).images
    assert _rel(got, want) <= TOL
    steps = RUN["num_inference_steps"]
    assert engine.transformer.calls == {"uncached": 0, "extract": 2 * steps, "cached": 2 * steps}


def test_layouts_are_computed_once_per_request_and_branch(pipes):
    _, engine = pipes
    engine.transformer._layouts.clear()
    run = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "true_cfg_scale": 4.0, **RUN}
    engine(generator=torch.Generator().manual_seed(0), **run)
    assert len(engine.transformer._layouts) == 2  # the prompt's and the negative prompt's
    engine(generator=torch.Generator().manual_seed(1), **run)
    assert len(engine.transformer._layouts) == 2


def test_images_equal_stock_within_40db(pipes):
    """Decoded through the VAE graphs, with a condition image: PSNR far above the issue's 40 dB."""
    from qwen_image_trt.parity.metrics import psnr

    eager, engine = pipes
    kw = {"prompt": PROMPT, **EDIT, **RUN, "output_type": "np"}
    want = eager(generator=torch.Generator().manual_seed(0), **kw).images[0]
    got = engine(generator=torch.Generator().manual_seed(0), **kw).images[0]
    assert want.shape == (64, 64, 4)
    to8 = lambda x: (x * 255).round().clip(0, 255).astype(np.uint8)  # noqa: E731
    assert psnr(to8(want), to8(got)) >= 60


def test_saved_engine_pipeline_loads_back(pipes, tmp_path):
    from qwen_image_trt.runtime.pipeline import load_pipeline

    _, engine = pipes
    engine.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImage21Pipeline"
    assert index["transformer"] == ["qwen_image_trt.runtime.transformer21", "EngineTransformer21"]
    again = load_pipeline(tmp_path / "saved")
    kw = {"prompt": PROMPT, **RUN, **EDIT}
    want = engine(generator=torch.Generator().manual_seed(0), **kw).images
    got = again(generator=torch.Generator().manual_seed(0), **kw).images
    assert type(again.transformer).__name__ == "EngineTransformer21" and _rel(got, want) == 0


# -- CLI ------------------------------------------------------------------------------------------------------------
def test_cli_generate_on_21_engines(tiny21, pipes, tmp_path, capsys):
    """`qitrt generate` with a condition image and a negative prompt, with and without the cache: the PNG the
    Python eager pipeline makes (conditioned at the output's area); bad sizes and options refused by name."""
    root, engines = tiny21
    eager, _ = pipes
    IMAGE.save(tmp_path / "cond.png")
    base = ["generate", str(root), "--engines", str(engines), "--backend", "onnxruntime", "--prompt", PROMPT,
            "--negative-prompt", NEGATIVE, "--image", str(tmp_path / "cond.png"), "--steps", "3", "--seed", "5"]
    want = eager(prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=4.0, image=Image.open(tmp_path / "cond.png"),
                 output_resolution=64, height=64, width=64, num_inference_steps=3,
                 generator=torch.Generator("cpu").manual_seed(5)).images[0]
    for extra, name in (([], "a.png"), (["--no-kv-cache"], "b.png")):
        assert main([*base, *extra, "--out", str(tmp_path / name)]) == 0
        got = np.asarray(Image.open(tmp_path / name)).astype(int)
        assert got.shape == (64, 64, 4) and np.abs(got - np.asarray(want).astype(int)).max() <= 1
    capsys.readouterr()
    assert main([*base, "--height", "48", "--out", str(tmp_path / "c.png")]) == 2
    assert "height=48" in capsys.readouterr().err and "multiple of 32" not in ""
    assert main([*base, "--strength", "0.5", "--out", str(tmp_path / "d.png")]) == 2
    assert "strength" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists() and not (tmp_path / "d.png").exists()


def test_cli_parity_on_21_engines(tiny21, tmp_path, capsys):
    """`qitrt parity`: the three passes and the decoder per forward (with and without condition images, padded
    batches), then images with and without the cache, text-to-image and editing; a gate set beyond reach fails."""
    root, engines = tiny21
    out = tmp_path / "parity"
    args = ["parity", str(root), "--engines", str(engines), "--out", str(out), "--sizes", "64x64,96x64",
            "--batches", "1,2", "--steps", "2", "--image-size", "64x64"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    components = {r["component"] for r in report["forward"]}
    assert components == {"transformer_uncached", "transformer_extract", "transformer_cached", "vae_decoder"}
    assert any(r.get("cond") for r in report["forward"]) and any(r.get("pad") for r in report["forward"])
    runs = [(r["kv_cache"], bool(r["input_images"])) for r in report["images"]]
    assert sorted(runs) == [(False, False), (False, True), (True, False), (True, True)]
    assert min(r["psnr_db"] for r in report["images"]) >= 40 and report["passed"]
    assert "prefix KV cache off" in (out / "report.html").read_text()
    capsys.readouterr()
    assert main([*args, "--gate", "image_psnr_min=1000"]) == 1
    assert "BAD image_psnr_min" in capsys.readouterr().out


# -- Turbo ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def turbo(tmp_path_factory):
    """`qitrt tiny --pipeline qwen-image-2.1-turbo` (a 4-sigma grid in model_index.json) and `qitrt export` of it."""
    out = tmp_path_factory.mktemp("q21turbo")
    assert main(["tiny", str(out / "turbo"), "--pipeline", "qwen-image-2.1-turbo"]) == 0
    assert main(["export", str(out / "turbo"), "--out", str(out / "engines"), "--precision", "fp32"]) == 0
    return out / "turbo", out / "engines"


def test_turbo_runs_on_the_engines_at_its_steps(turbo):
    from qwen_image_trt.core.manifest import read_manifest
    from qwen_image_trt.models.tiny21 import TURBO_SIGMAS
    from qwen_image_trt.runtime.pipeline import load_pipeline

    root, engines = turbo
    assert list(read_manifest(engines).components) == ["transformer_extract", "transformer_cached", "vae_decoder",
                                                      "vae_encoder"]  # the default: no uncached copy
    sampling = read_manifest(engines).sampling
    assert sampling["name"] == "qwen-image-2.1-turbo" and sampling["steps"] == len(TURBO_SIGMAS) == 4
    assert sampling["sigmas"] == TURBO_SIGMAS
    eager = load_pipeline(root, backend="torch")
    engine = load_pipeline(root, engines=engines, backend="onnxruntime")
    assert type(engine).__name__ == "TurboPipeline" and engine.pipeline_kind == "qwen-image-2.1-turbo"
    assert type(engine.modular).__name__ == "QwenImage21TurboModularPipeline"
    for kw in ({}, EDIT):
        run = {"prompt": PROMPT, "height": 64, "width": 64, "output_type": "np", **kw}
        want = eager(generator=torch.Generator().manual_seed(0), **run).images
        before = dict(engine.transformer.calls)
        got = engine(generator=torch.Generator().manual_seed(0), **run).images
        assert np.asarray(got).shape == (1, 64, 64, 4) and _rel(got, want) <= TOL
        calls = {k: v - before[k] for k, v in engine.transformer.calls.items()}
        assert calls == {"uncached": 0, "extract": 1, "cached": 4}
    with pytest.raises(InputError, match="num_inference_steps"):
        engine(prompt=PROMPT, num_inference_steps=3)
    with pytest.raises(InputError, match="negative_prompt"):
        engine(prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=4.0)


def test_turbo_cli_generate_and_parity_at_its_steps(turbo, tmp_path):
    root, engines = turbo
    assert main(["generate", str(root), "--engines", str(engines), "--backend", "onnxruntime", "--prompt", PROMPT,
                 "--out", str(tmp_path / "t.png")]) == 0
    assert Image.open(tmp_path / "t.png").size == (64, 64)
    assert main(["generate", str(root), "--engines", str(engines), "--backend", "onnxruntime", "--prompt", PROMPT,
                 "--steps", "3", "--out", str(tmp_path / "u.png")]) == 2
    out = tmp_path / "parity"
    assert main(["parity", str(root), "--engines", str(engines), "--out", str(out), "--sizes", "64x64",
                 "--batches", "1", "--image-size", "64x64"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 4 and all(r["negative_prompt"] is None for r in report["images"])
    assert {r["step"] for r in report["per_step"]} == {0, 1, 2, 3}


# -- TensorRT profiles of the 2.1 graphs -----------------------------------------------------------------------------
SIZES = "64x64,128x96"


def _recorded_feeds(engine, runs):
    """Every feed the engine's runners received during `runs` (pipeline kwargs): [(component, {name: shape})]."""
    seen = []
    originals = {}
    for name, runner in engine.transformer.runners.items():
        originals[name] = runner.infer

        def infer(feeds, _name=name, _orig=runner.infer):
            seen.append((f"transformer_{_name}", {k: tuple(v.shape) for k, v in feeds.items()}))
            return _orig(feeds)

        runner.infer = infer
    try:
        for kw in runs:
            engine(generator=torch.Generator().manual_seed(0), **kw)
    finally:
        for name, runner in engine.transformer.runners.items():
            runner.infer = originals[name]
    return seen


def test_tensorrt_profiles_cover_what_the_pipeline_feeds(tiny21, pipes):
    """Profiles for --sizes 64x64,128x96 --max-batch 2 (one condition image): every shape QwenImage21Pipeline fed the
    three passes for requests at those sizes (text-to-image and editing, CFG, two prompts of different lengths, with
    and without the cache) lies inside them; profile names, ranks and static dims are the ONNX graphs' own; an edit
    at a size outside them is refused by name."""
    import onnx

    from qwen_image_trt.compile.export import exported_file
    from qwen_image_trt.compile.profiles21 import component_profile_21
    from qwen_image_trt.core.shapes import check_shape_in_profile
    from qwen_image_trt.models import checkpoint as ckpt

    root, engines = tiny21
    _, engine = pipes
    config = ckpt.read_config(root, "transformer")
    profiles = {c: component_profile_21(c, SIZES, 2, config=config)
                for c in ("transformer_uncached", "transformer_extract", "transformer_cached")}
    for component, profile in profiles.items():
        graph = onnx.load(str(exported_file(engines, component)), load_external_data=False)
        inputs = {i.name: [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
                  for i in graph.graph.input}
        assert list(profile) == list(inputs)
        for name, dims in inputs.items():
            mn, op, mx = profile[name]
            assert len(mn) == len(dims)
            for i, d in enumerate(dims):
                if d is not None:  # a static dim: min == opt == max == the graph's
                    assert mn[i] == op[i] == mx[i] == d, (component, name, i)
    runs = []
    for h, w in ((64, 64), (96, 128)):
        for cache in (True, False):
            runs.append({"prompt": [PROMPT, "a dog"], "negative_prompt": [NEGATIVE, " "], "true_cfg_scale": 4.0,
                         "height": h, "width": w, "num_inference_steps": 2, "output_type": "latent",
                         "use_kv_cache": cache})
            runs.append({"prompt": PROMPT, "image": IMAGE, "output_resolution": 64, "height": h, "width": w,
                         "num_inference_steps": 2, "output_type": "latent", "use_kv_cache": cache})
    seen = _recorded_feeds(engine, runs)
    assert {c for c, _ in seen} == set(profiles)
    for component, shapes in seen:
        for name, shape in shapes.items():
            check_shape_in_profile(name, shape, profiles[component])
    # beyond the profile: a 256x256 edit (the target's tokens exceed 128x96's)
    big = _recorded_feeds(engine, [{"prompt": PROMPT, "image": IMAGE, "output_resolution": 64, "height": 256,
                                    "width": 256, "num_inference_steps": 1, "output_type": "latent"}])
    with pytest.raises(InputError, match="target_rope_cos|latents|hidden_states"):
        for component, shapes in big:
            for name, shape in shapes.items():
                check_shape_in_profile(name, shape, profiles[component])
    # batched CFG stacks both branches of two prompts (batch 4) in the cached graph: beyond a profile without doubling
    single = component_profile_21("transformer_cached", SIZES, 2, config=config, cfg=False)
    stacked = [s for c, s in seen if c == "transformer_cached" and s["latents"][0] == 4]
    assert stacked
    with pytest.raises(InputError, match="latents|prefix_kv|batch"):
        for name, shape in stacked[0].items():
            check_shape_in_profile(name, shape, single)


def test_21_vae_profiles_and_build_plan_refusals(tiny21):
    from qwen_image_trt.compile.profiles21 import component_profile_21, transformer21_profile
    from qwen_image_trt.models import checkpoint as ckpt

    root, _ = tiny21
    vae = ckpt.read_config(root, "vae")
    dec = component_profile_21("vae_decoder", SIZES, 2, config=vae)["latents"]
    assert dec == ((1, 64, 1, 4, 4), (1, 64, 1, 4, 4), (2, 64, 1, 6, 8))
    enc = component_profile_21("vae_encoder", SIZES, 2, config=vae)["images"]
    assert enc[0][1] == 4 and enc[2][3] >= 2048 and enc[0][3] <= 64  # RGBA; 1024^2 at 4:1 either way; the sizes
    with pytest.raises(InputError, match="condition_images"):
        transformer21_profile("cached", SIZES, 2, config=ckpt.read_config(root, "transformer"), condition_images=4)
    with pytest.raises(InputError, match="vae_encoder"):
        component_profile_21("vae_encoder", SIZES, 2, config=vae, condition_images=0)
    config = ckpt.read_config(root, "transformer")
    # only the cached graph runs both CFG branches in one call
    assert transformer21_profile("cached", SIZES, 2, config=config)["latents_rope_cos"][2][0] == 4
    assert transformer21_profile("cached", SIZES, 2, config=config, cfg=False)["latents"][2][0] == 2
    assert transformer21_profile("extract", SIZES, 2, config=config)["prefix_key_valid"][2][0] == 2
    t2i = transformer21_profile("uncached", SIZES, 2, config=ckpt.read_config(root, "transformer"),
                                condition_images=0)
    edit = transformer21_profile("uncached", SIZES, 2, config=ckpt.read_config(root, "transformer"))
    assert t2i["hidden_states"][2][1] == 48 and edit["hidden_states"][2][1] > 4096  # 128x96 alone; + a 1 MP image
