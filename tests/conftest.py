"""Shared fixtures: one tiny checkpoint and one fp32 export per test session (both take seconds)."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    """`slow` tests (real-width graphs of several GB, long sweeps) run only with QITRT_SLOW=1."""
    if os.environ.get("QITRT_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: opt-in with QITRT_SLOW=1 (needs several GB of RAM and disk)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from qwen_image_trt.models.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "qwen-image-tiny")


@pytest.fixture(scope="session")
def tiny_engines(tiny_checkpoint, tmp_path_factory):
    """fp32 ONNX export of the tiny checkpoint (transformer, vae_decoder, vae_encoder) with manifest.json."""
    from qwen_image_trt.compile.export import export_onnx

    out = tmp_path_factory.mktemp("engines") / "fp32"
    export_onnx(tiny_checkpoint, out, precision="fp32", progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_edit_2511(tmp_path_factory):
    """A tiny Edit-2511 checkpoint (Edit-Plus with zero_cond_t) and its fp32 export: (checkpoint, engines)."""
    from qwen_image_trt.compile.export import export_onnx
    from qwen_image_trt.models.tiny import make_tiny_checkpoint

    root = make_tiny_checkpoint(tmp_path_factory.mktemp("edit-2511") / "qwen-image-edit-2511-tiny",
                                pipeline="edit-2511")
    engines = root.parent / "engines-fp32"
    export_onnx(root, engines, precision="fp32", progress=False)
    return root, engines


@pytest.fixture(scope="session")
def tiny_engines_bf16(tiny_checkpoint, tmp_path_factory):
    """bf16 export (the real model's precision): transformer in bf16, the VAE graphs kept in fp32."""
    from qwen_image_trt.compile.export import export_onnx

    out = tmp_path_factory.mktemp("engines") / "bf16"
    export_onnx(tiny_checkpoint, out, precision="bf16", progress=False)
    return out


@pytest.fixture(scope="session")
def eager_pipe(tiny_checkpoint):
    from qwen_image_trt import load_pipeline

    return load_pipeline(tiny_checkpoint, backend="torch")


@pytest.fixture(scope="session")
def ort_pipe(tiny_checkpoint, tiny_engines):
    from qwen_image_trt import load_pipeline

    return load_pipeline(tiny_checkpoint, engines=tiny_engines, backend="onnxruntime")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Quantization tests run ~10x faster with one torch thread than with two fighting over 2 shared cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny21(tmp_path_factory):
    """A tiny Qwen-Image-2.1 checkpoint and its fp32 export (the transformer's three passes, the optional uncached one
    included, and the 2.1 VAE's decoder and encoder): (checkpoint, engines)."""
    from qwen_image_trt.compile.export import export_onnx
    from qwen_image_trt.models.specs import ALL_COMPONENTS_21
    from qwen_image_trt.models.tiny21 import make_tiny_21_checkpoint

    root = make_tiny_21_checkpoint(tmp_path_factory.mktemp("q21") / "qwen-image-2.1-tiny")
    engines = root.parent / "engines-fp32"
    export_onnx(root, engines, precision="fp32", components=ALL_COMPONENTS_21, progress=False)
    return root, engines
