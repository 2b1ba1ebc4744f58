"""ControlNet on engines: the ControlNet runs eagerly, its residuals are an input of the transformer graph's ControlNet
variant (`transformer_controlnet`), and diffusers' own QwenImageControlNetPipeline runs with the drop-ins, equal to
the stock pipeline with eager modules. Also from the CLI and over HTTP."""

import base64
import io
import json
import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_image_trt import load_pipeline
from qwen_image_trt.core.errors import InputError
from qwen_image_trt.models.pipelines import load_stock_pipeline
from qwen_image_trt.parity.metrics import psnr

RED = Image.new("RGB", (64, 64), (220, 30, 30))
STRIPES = Image.fromarray(np.kron(np.eye(8, dtype=np.uint8)[:, :, None] * 255, np.ones((8, 8, 3), np.uint8)))
KW = dict(prompt="a fox in the snow", negative_prompt=" ", true_cfg_scale=4.0, height=64, width=64,
          num_inference_steps=3)


def _latents_and_image(pipe, control_image, seed=0, **kw):
    seen = {}

    def keep(p, i, t, tensors):
        seen["latents"] = tensors["latents"].clone()
        return tensors

    image = pipe(**{**KW, **kw}, control_image=control_image, generator=torch.Generator().manual_seed(seed),
                 callback_on_step_end=keep).images[0]
    return seen["latents"], np.asarray(image)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def controlnet(tiny_checkpoint, tmp_path_factory):
    from qwen_image_trt.models.tiny import make_tiny_controlnet

    return make_tiny_controlnet(tiny_checkpoint, tmp_path_factory.mktemp("cn") / "controlnet")


@pytest.fixture(scope="module")
def cn_engines(tiny_checkpoint, tiny_engines, controlnet, tmp_path_factory):
    """The tiny engine folder with the ControlNet graph added to it: an export resumes into a folder of the same
    checkpoint and keeps what it holds."""
    from qwen_image_trt.compile.export import export_onnx

    out = tmp_path_factory.mktemp("cn_engines") / "fp32"
    shutil.copytree(tiny_engines, out)
    m = export_onnx(tiny_checkpoint, out, precision="fp32", components=("transformer_controlnet",),
                    controlnet=controlnet, progress=False)
    assert set(m.components) == {"transformer", "vae_decoder", "vae_encoder", "transformer_controlnet"}
    assert m.components["transformer_controlnet"].source["controlnet_blocks"] == 2
    return out


def test_the_graph_module_adds_residuals_as_the_stock_transformer_does(tiny_checkpoint):
    from qwen_image_trt.models import checkpoint as ckpt
    from qwen_image_trt.models.transformer_export import (
        ControlNetExportableTransformer,
        RopeTables,
        controlnet_interval,
        sample_inputs,
    )

    config = ckpt.read_config(tiny_checkpoint, "transformer")
    stock = ckpt.load_transformer(tiny_checkpoint, torch.float32).eval()
    module = ControlNetExportableTransformer(ckpt.load_transformer(tiny_checkpoint, torch.float32)).eval()
    args = sample_inputs(config, batch=2, grid=(4, 6), text_len=9, controlnet_blocks=4)
    hidden, text, mask, t, *_, residuals = args
    with torch.no_grad():
        got = module(*args)
        want = stock(hidden_states=hidden, encoder_hidden_states=text, encoder_hidden_states_mask=mask, timestep=t,
                     img_shapes=[[(1, 4, 6)]] * 2, controlnet_block_samples=list(residuals), return_dict=False)[0]
        plain = stock(hidden_states=hidden, encoder_hidden_states=text, encoder_hidden_states_mask=mask, timestep=t,
                      img_shapes=[[(1, 4, 6)]] * 2, return_dict=False)[0]
    assert float((got - want).abs().max()) <= 1e-5
    assert float((plain - want).abs().max()) >= 1e-3  # the residuals matter, so the comparison can fail
    # 6 blocks, 4 residuals: ceil(6/4) = 2 blocks each, the last residual unused -- as diffusers computes it
    assert controlnet_interval(6, 4) == 2 and controlnet_interval(60, 5) == 12
    assert len(RopeTables(config["axes_dims_rope"])(1, 4, 6, 9)) == 4


def test_tiny_controlnet_checkpoint_runs_in_diffusers_own_pipeline(tmp_path):
    from diffusers import DiffusionPipeline

    from qwen_image_trt.models.tiny import make_tiny_checkpoint

    root = make_tiny_checkpoint(tmp_path / "cn", pipeline="controlnet")
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageControlNetPipeline"
    assert index["controlnet"] == ["diffusers", "QwenImageControlNetModel"]
    pipe = DiffusionPipeline.from_pretrained(root)
    assert type(pipe).__name__ == "QwenImageControlNetPipeline"
    pipe.set_progress_bar_config(disable=True)
    a, _ = _latents_and_image(pipe, RED, output_type="latent")
    b, _ = _latents_and_image(pipe, STRIPES, output_type="latent")
    off, _ = _latents_and_image(pipe, RED, output_type="latent", controlnet_conditioning_scale=0.0)
    assert _rel(a, b) >= 1e-3 and _rel(a, off) >= 1e-2  # the tiny ControlNet is not a zero module


def test_controlnet_pipeline_on_engines_equals_stock(tiny_checkpoint, cn_engines, controlnet):
    pipe = load_pipeline(tiny_checkpoint, engines=cn_engines, backend="onnxruntime", pipeline="controlnet",
                         controlnet=controlnet)
    assert type(pipe).__name__ == "QwenImageControlNetEnginePipeline"
    stock = load_stock_pipeline(tiny_checkpoint, pipeline="controlnet", controlnet=controlnet)
    got_lat, got_img = _latents_and_image(pipe, STRIPES, controlnet_conditioning_scale=0.8)
    want_lat, want_img = _latents_and_image(stock, STRIPES, controlnet_conditioning_scale=0.8)
    assert _rel(got_lat, want_lat) <= 1e-5
    assert psnr(want_img, got_img) >= 40
    other, _ = _latents_and_image(pipe, RED, controlnet_conditioning_scale=0.8)
    assert _rel(other, want_lat) >= 1e-3  # the control image reaches the graph


def test_controlnet_refusals_name_what_is_missing(tiny_checkpoint, tiny_engines, cn_engines, controlnet):
    from qwen_image_trt.runtime.transformer import EngineTransformer

    with pytest.raises(InputError, match="transformer_controlnet"):
        load_pipeline(tiny_checkpoint, engines=tiny_engines, backend="onnxruntime", pipeline="controlnet",
                      controlnet=controlnet)
    with pytest.raises(InputError, match="controlnet"):  # a text-to-image checkpoint has no controlnet/ of its own
        load_pipeline(tiny_checkpoint, pipeline="controlnet")
    plain = load_pipeline(tiny_checkpoint, engines=tiny_engines, backend="onnxruntime")
    assert isinstance(plain.transformer, EngineTransformer)
    hidden = torch.randn(1, 16, 64)
    call = dict(hidden_states=hidden, encoder_hidden_states=torch.randn(1, 5, 64), timestep=torch.ones(1),
                encoder_hidden_states_mask=torch.ones(1, 5, dtype=torch.bool), img_shapes=[(1, 4, 4)])
    residual = [torch.zeros(1, 16, 64)] * 2
    with pytest.raises(NotImplementedError, match="controlnet_block_samples: this engine folder has no"):
        plain.transformer(**call, controlnet_block_samples=residual)
    cn = load_pipeline(tiny_checkpoint, engines=cn_engines, backend="onnxruntime", pipeline="controlnet",
                       controlnet=controlnet)
    with pytest.raises(ValueError, match="has 3 residuals; .* 2 blocks"):
        cn.transformer(**call, controlnet_block_samples=residual + residual[:1])
    out = cn.transformer(**call, controlnet_block_samples=residual, return_dict=False)[0]  # flat img_shapes work
    assert out.shape == (1, 16, 64)
    from qwen_image_trt.runtime.images import check_image_inputs

    with pytest.raises(InputError, match="control_image"):
        check_image_inputs("controlnet")
    with pytest.raises(InputError, match="controlnet_scale"):
        check_image_inputs("controlnet", control_image=RED, controlnet_scale=3.0)
    with pytest.raises(InputError, match="control_image.*only for the controlnet member"):
        check_image_inputs("img2img", images=[RED], control_image=RED)


def test_quantized_builds_with_a_controlnet_are_refused_by_name(tmp_path):
    from qwen_image_trt.compile.stages import BuildOptions, build
    from qwen_image_trt.models.tiny import make_tiny_checkpoint

    root = make_tiny_checkpoint(tmp_path / "cn", pipeline="controlnet")
    with pytest.raises(InputError, match="precision='int8'.*transformer_controlnet"):
        build(root, tmp_path / "out", BuildOptions(precision="int8", target="onnxruntime", device="cpu"))


def test_controlnet_profile_covers_the_residuals():
    from qwen_image_trt.compile.profiles import component_profile

    p = component_profile("transformer_controlnet", ["1024x1024", "512x512"], 4,
                          config={"controlnet_blocks": 5, "num_attention_heads": 24, "attention_head_dim": 128})
    assert p["controlnet_residuals"] == ((5, 1, 1024, 3072), (5, 2, 4096, 3072), (5, 8, 4096, 3072))
    assert [s[:2] for s in p["hidden_states"]] == [s[1:3] for s in p["controlnet_residuals"]]
    with pytest.raises(InputError, match="controlnet_blocks"):
        component_profile("transformer_controlnet", ["1024x1024"], 4, config={})


def test_generate_from_the_cli_with_a_control_image(tiny_checkpoint, cn_engines, controlnet, tmp_path):
    from qwen_image_trt.cli import main

    control = tmp_path / "control.png"
    STRIPES.save(control)
    out = tmp_path / "out.png"
    rc = main(["generate", str(tiny_checkpoint), "--engines", str(cn_engines), "--pipeline", "controlnet",
               "--controlnet", str(controlnet), "--control-image", str(control), "--controlnet-scale", "0.8",
               "--prompt", KW["prompt"], "--negative-prompt", " ", "--steps", "3", "--height", "64", "--width", "64",
               "--out", str(out)])
    assert rc in (0, None) and out.is_file()
    stock = load_stock_pipeline(tiny_checkpoint, pipeline="controlnet", controlnet=controlnet)
    _, want = _latents_and_image(stock, STRIPES, controlnet_conditioning_scale=0.8)
    assert psnr(want, np.asarray(Image.open(out).convert("RGB"))) >= 40


def test_a_controlnet_server_takes_the_control_image_on_the_edits_endpoint(tmp_path):
    from openai import OpenAI

    from qwen_image_trt.models.tiny import make_tiny_checkpoint
    from tests.serve_helpers import KEY, Server

    root = make_tiny_checkpoint(tmp_path / "cn", pipeline="controlnet")
    server = Server(root, tmp_path / "jobs", "--max-queue-delay-ms", "500", devices="cpu")
    try:
        buf = io.BytesIO()
        STRIPES.save(buf, format="PNG")
        client = OpenAI(base_url=server.url + "/v1", api_key=KEY)
        res = client.images.edit(image=("c.png", buf.getvalue(), "image/png"), prompt=KW["prompt"], size="64x64",
                                 extra_body={"seed": 3, "num_inference_steps": 3})
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json))).convert("RGB"), np.int16)
        pipe = load_pipeline(root)
        want = pipe(prompt=KW["prompt"], control_image=STRIPES, height=64, width=64, num_inference_steps=3,
                    true_cfg_scale=1.0, generator=torch.Generator().manual_seed(3)).images[0]
        assert np.abs(got - np.asarray(want, np.int16)).max() <= 1
        r = server.post({"prompt": "x", "size": "64x64", "num_inference_steps": 2})  # text alone: the base model
        assert r.status_code == 200, r.text
        two = {"image": [base64.b64encode(buf.getvalue()).decode()] * 2, "prompt": "x", "size": "64x64"}
        r = server.post(two, path="/v1/jobs")
        assert r.status_code == 400 and r.json()["error"]["param"] == "image", r.text
        r = server.post({**two, "image": two["image"][0], "controlnet_conditioning_scale": 2.5}, path="/v1/jobs")
        assert r.status_code == 400 and r.json()["error"]["param"] == "controlnet_conditioning_scale", r.text
        assert r.json()["error"]["allowed"] == "a number in [0, 2]"
        # two requests with their own control images and a conditioning scale: one pipeline call, each equal to its
        # call alone (diffusers' ControlNet pipeline takes one control image per prompt)
        got = {}

        def send(name, image, seed):
            got[name] = server.post({"image": _b64png(image), "prompt": f"a {name} fox", "size": "64x64",
                                     "seed": seed, "num_inference_steps": 2, "controlnet_conditioning_scale": 0.5},
                                    path="/v1/images/edits")

        threads = [threading.Thread(target=send, args=a) for a in (("striped", STRIPES, 4), ("red", RED, 6))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.kill()
    for name, image, seed in (("striped", STRIPES, 4), ("red", RED, 6)):
        r = got[name]
        assert r.status_code == 200, r.text
        assert r.headers["X-Batch-Images"] == "2"
        want = pipe(prompt=f"a {name} fox", control_image=image, height=64, width=64, num_inference_steps=2,
                    true_cfg_scale=1.0, controlnet_conditioning_scale=0.5,
                    generator=torch.Generator().manual_seed(seed)).images[0]
        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).convert("RGB"))
        assert np.abs(img.astype(np.int16) - np.asarray(want, np.int16)).max() <= 1


def _b64png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
