"""Tensor-only Qwen-Image-2.1 transformer graphs (qwen_image_trt.models.transformer21_export) equal the stock
QwenImage21Transformer2DModel: uncached vs `kv_cache=None`, Extract21's K/V vs the stock cache after
`kv_cache_mode="extract"`, Cached21 vs the stock `"cached"` forward, in fp32 on the tiny checkpoint, text-to-image and
with a condition image, batch 2 with prompts of different lengths (right padded). Then each graph exported with
torch.onnx.export(dynamo=True) and run in ONNX Runtime (CPU) at other batch sizes, prompt lengths, layouts and
image sizes than traced."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen_image_trt.models.transformer21_export import (
    Cached21,
    Extract21,
    Uncached21,
    layout_21,
    sample_inputs_21,
    stock_cache_to_tensor,
    tensor_to_stock_cache,
)

TOL = 1e-5
# (batch, text before/after the condition image, condition grid or None, target grid, padding of the last prompt)
CASES = {"t2i": {"cond": None}, "edit": {"cond": (4, 4)}}
# what the graphs are traced at (models.specs.TRACE_21: edit, batch 2) and run at besides
OTHER = [
    # text-to-image, batch 3, a longer prompt, another target grid
    {"batch": 3, "text": (3, 9), "cond": None, "target": (4, 6), "pad": 4, "seed": 5},
    # batch 1, another condition-image size, no padding
    {"batch": 1, "text": (2, 4), "cond": (6, 4), "target": (6, 6), "pad": 0, "seed": 6},
]


def _rel(a, b):
    a, b = (torch.as_tensor(x).float() for x in (a, b))
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def root(tiny21):
    return tiny21[0]


@pytest.fixture(scope="module")
def transformer(root):
    from diffusers import QwenImage21Transformer2DModel

    return QwenImage21Transformer2DModel.from_pretrained(root / "transformer", torch_dtype=torch.float32).eval()


def _stock(tr, kw, **extra):
    with torch.no_grad():
        return tr(**kw, return_dict=False, **extra)[0]


def _case(tr, name, **over):
    kw = sample_inputs_21(tr.config, **{**CASES[name], **over})
    lay = layout_21(kw["img_mask"], kw["img_shapes"], kw["encoder_hidden_states_mask"], tr.config.axes_dims_rope)
    return kw, lay


def _next_step(kw, lay, seed=7):
    """The same request one step later: new target latents (condition latents kept), another timestep."""
    g = torch.Generator().manual_seed(seed)
    x = kw["hidden_states"].clone()
    x[:, -lay.target_tokens:] = torch.randn(x.shape[0], lay.target_tokens, x.shape[2], generator=g)
    return dict(kw, hidden_states=x, timestep=torch.rand(x.shape[0], generator=g))


# -- host layout ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_layout_is_the_stock_metadata(transformer, name):
    """Block ids, target split and RoPE tables are what the stock forward derives from img_mask / img_shapes."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21Rope

    kw, lay = _case(transformer, name)
    row = kw["img_mask"][0]
    pad_mask = torch.repeat_interleave(row, torch.where(row, 4, 1))
    ids, target = transformer.build_token_metadata(pad_mask, kw["img_shapes"][0])
    p = lay.prefix_tokens
    assert int((~target).sum()) == p and bool(target[p:].all())
    assert torch.equal(lay.prefix_block_ids, ids[:p])
    rope = QwenImage21Rope(theta=10000, axes_dim=list(transformer.config.axes_dims_rope))(
        kw["img_shapes"][0], pad_mask, torch.device("cpu"))
    cos = torch.cat([lay.prefix_rope_cos, lay.target_rope_cos])
    sin = torch.cat([lay.prefix_rope_sin, lay.target_rope_sin])
    assert (cos - rope.real).abs().max() <= 1e-6 and (sin - rope.imag).abs().max() <= 1e-6
    # padded prompt tokens are the only invalid keys
    n_pad = int((kw["encoder_hidden_states_mask"] == 0).sum())
    assert int((~lay.prefix_key_valid).sum()) == n_pad > 0


# -- torch level: equal to the stock module ----------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_uncached_equals_stock(transformer, name):
    kw, lay = _case(transformer, name)
    want = _stock(transformer, kw)[:, -lay.target_tokens:]
    with torch.no_grad():
        got = Uncached21(transformer)(*lay.uncached_inputs(kw["encoder_hidden_states"], kw["hidden_states"],
                                                           kw["timestep"]))
    assert got.shape == want.shape == (2, lay.target_tokens, 64)
    assert _rel(got, want) <= TOL


@pytest.mark.parametrize("name", CASES)
def test_extract_equals_the_stock_cache(transformer, name):
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    tr = transformer
    kw, lay = _case(tr, name)
    cache = QwenImage21KVCache(len(tr.transformer_blocks))
    _stock(tr, kw, kv_cache=cache, kv_cache_mode="extract")
    want = stock_cache_to_tensor(cache)
    extract = Extract21(tr)
    with torch.no_grad():
        got = extract(*lay.prefix_inputs(kw["encoder_hidden_states"], kw["hidden_states"]))
        # the prefix K/V ignore the target latents (and there is no timestep input)
        other = _next_step(kw, lay)
        again = extract(*lay.prefix_inputs(other["encoder_hidden_states"], other["hidden_states"]))
    c = tr.config
    assert got.shape == want.shape == (c.num_layers, 2, 2, lay.prefix_tokens, c.num_attention_heads,
                                       c.attention_head_dim)
    assert _rel(got, want) <= TOL and torch.equal(got, again)


@pytest.mark.parametrize("name", CASES)
def test_cached_equals_stock(transformer, name):
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    tr = transformer
    kw, lay = _case(tr, name)
    cache = QwenImage21KVCache(len(tr.transformer_blocks))
    _stock(tr, kw, kv_cache=cache, kv_cache_mode="extract")
    step = _next_step(kw, lay)
    want = _stock(tr, step, kv_cache=cache, kv_cache_mode="cached")
    cached = Cached21(tr)
    with torch.no_grad():
        kv = Extract21(tr)(*lay.prefix_inputs(kw["encoder_hidden_states"], kw["hidden_states"]))
        got = cached(*lay.cached_inputs(step["hidden_states"], kv, step["timestep"]))
        from_stock_cache = cached(*lay.cached_inputs(step["hidden_states"], stock_cache_to_tensor(cache),
                                                     step["timestep"]))
        first = cached(*lay.cached_inputs(kw["hidden_states"], kv, kw["timestep"]))
    assert got.shape == want.shape == (2, lay.target_tokens, 64)
    assert _rel(got, want) <= TOL and _rel(from_stock_cache, want) <= TOL
    # and equal to the uncached stock forward at this step; at step 0 extract + cached is the uncached forward
    assert _rel(got, _stock(tr, step)[:, -lay.target_tokens:]) <= TOL
    assert _rel(first, _stock(tr, kw)[:, -lay.target_tokens:]) <= TOL
    assert _rel(got, first) > 1e-2  # the step matters
    # the stock cached forward reads Extract21's K/V too
    assert _rel(_stock(tr, step, kv_cache=tensor_to_stock_cache(kv), kv_cache_mode="cached"), want) <= TOL


# -- ONNX: exported once (by `export_onnx`, the session's tiny21 fixture), run at other shapes -------------------
def _graph_args(tr, graph, kw, lay):
    if graph == "uncached":
        return lay.uncached_inputs(kw["encoder_hidden_states"], kw["hidden_states"], kw["timestep"])
    if graph == "extract":
        return lay.prefix_inputs(kw["encoder_hidden_states"], kw["hidden_states"])
    with torch.no_grad():
        kv = Extract21(tr)(*lay.prefix_inputs(kw["encoder_hidden_states"], kw["hidden_states"]))
    return lay.cached_inputs(kw["hidden_states"], kv, kw["timestep"])


GRAPHS = {"uncached": Uncached21, "extract": Extract21, "cached": Cached21}


@pytest.fixture(scope="module")
def graphs(tiny21):
    """The three graphs `qitrt export` wrote for the checkpoint (traced at models.specs.TRACE_21: edit layout, batch 2,
    a padded prompt): {name: path}, read from the manifest."""
    from qwen_image_trt.compile.export import exported_file

    _, engines = tiny21
    return {graph: exported_file(engines, f"transformer_{graph}") for graph in GRAPHS}


@pytest.mark.parametrize("graph", GRAPHS)
def test_onnx_graph_runs_at_other_shapes(transformer, graphs, graph):
    import onnx
    import onnxruntime as ort

    tr = transformer
    module = GRAPHS[graph](tr)
    path = graphs[graph]
    model = onnx.load(str(path), load_external_data=False)
    assert [i.name for i in model.graph.input] == module.input_names
    assert [o.name for o in model.graph.output] == module.output_names
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in OTHER:
        kw = sample_inputs_21(tr.config, **shape)
        lay = layout_21(kw["img_mask"], kw["img_shapes"], kw["encoder_hidden_states_mask"], tr.config.axes_dims_rope)
        args = _graph_args(tr, graph, kw, lay)
        with torch.no_grad():
            want = module(*args)
        got = sess.run(None, {n: a.numpy() for n, a in zip(module.input_names, args)})[0]
        assert got.shape == tuple(want.shape) and np.isfinite(got).all()
        assert _rel(got, want) <= TOL, (graph, shape)
        if graph != "extract":  # and the stock module's target tokens, transitively
            assert _rel(got, _stock(tr, kw)[:, -lay.target_tokens:]) <= TOL


# -- the stock pipeline with the graphs in place of its transformer ----------------------------------------------
PROMPT = "a red cat on a window sill"
RUN = {"height": 64, "width": 64, "num_inference_steps": 2, "output_type": "latent"}


@pytest.fixture(scope="module")
def pipe(root):
    from PIL import Image

    from qwen_image_trt.models.tiny21 import load_tiny_21_pipeline

    p = load_tiny_21_pipeline(root)
    p.set_progress_bar_config(disable=True)
    p.test_image = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))
    return p


def test_pipeline_with_the_graphs_equals_stock(pipe, graphs):
    """QwenImage21Pipeline with GraphTransformer21 (backed by the three ONNX graphs in ONNX Runtime) as its
    transformer: the stock transformer's latents, KV cache on and off, text-to-image, with a condition image, and with
    true CFG (a negative prompt of another length)."""
    from qwen_image_trt.models.transformer21_export import GraphTransformer21, OrtGraph21

    stock = pipe.transformer
    dropin = GraphTransformer21(stock.config, *(OrtGraph21(graphs[g]) for g in GRAPHS))
    runs = [({"prompt": PROMPT}, True), ({"prompt": PROMPT}, False),
            ({"prompt": PROMPT, "image": pipe.test_image, "output_resolution": 64}, True),
            ({"prompt": PROMPT, "negative_prompt": "blurry", "true_cfg_scale": 4.0}, True)]
    try:
        for kw, cache in runs:
            out = {}
            for name, module in (("stock", stock), ("onnx", dropin)):
                pipe.transformer = module
                out[name] = pipe(generator=torch.Generator().manual_seed(0), use_kv_cache=cache, **RUN, **kw).images
            assert out["onnx"].shape == out["stock"].shape and _rel(out["onnx"], out["stock"]) <= TOL, (list(kw), cache)
    finally:
        pipe.transformer = stock
