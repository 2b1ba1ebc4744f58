"""`qitrt build`: stages in order, skipped when nothing changed, re-run when something did; checks before work."""

from __future__ import annotations

import json

import pytest
import torch

from qwen_image_trt.compile.stages import BuildOptions, build
from qwen_image_trt.core.errors import InputError, QitrtError

SMALL = dict(num_prompts=4, steps=2, progress=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def int8_build(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "int8"
    return out, build(tiny_checkpoint, out, BuildOptions(precision="int8", **SMALL))


def _status(result):
    return {s.stage: s.status for s in result.stages}


def test_build_runs_every_stage_and_makes_a_loadable_engine_folder(int8_build, tiny_checkpoint):
    from qwen_image_trt import load_pipeline
    from qwen_image_trt.core.manifest import read_manifest

    out, result = int8_build
    assert _status(result) == {s: "ran" for s in ("export", "calibrate", "quantize", "lint", "engine")}
    assert all(s.peak_rss_bytes for s in result.stages)  # every stage that ran says what it took
    m = read_manifest(out)
    assert m.precision == "int8" and m.target == "onnxruntime" and m.stage == "build"
    assert m.quantization.recipe["precision"] == "int8" and m.quantization.calibration["set_id"]
    for name in ("transformer", "vae_decoder", "vae_encoder"):
        c = m.components[name]
        assert (out / c.onnxruntime.file).is_file() and c.lint["ok"]
    # Each component says what it computes in: the VAE of an int8 build stays fp32.
    assert m.components["transformer"].precision == "int8" and m.components["vae_decoder"].precision == "fp32"
    assert m.components["transformer"].graph.file == "quantized/transformer.onnx"
    assert m.components["transformer"].graph.intact(out)
    pipe = load_pipeline(tiny_checkpoint, engines=out, backend="onnxruntime")
    img = pipe(prompt="a lighthouse", negative_prompt=" ", height=64, width=64, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (64, 64)


def test_build_skips_unchanged_stages_and_reruns_changed_ones(int8_build, tiny_checkpoint):
    out, first = int8_build
    again = build(tiny_checkpoint, out, BuildOptions(precision="int8", **SMALL))
    assert set(_status(again).values()) == {"skipped"}
    assert again.manifest.components == first.manifest.components

    # A recipe change re-quantizes (and so re-lints and rebuilds), the export and calibration stay.
    changed = build(tiny_checkpoint, out, BuildOptions(precision="int8", keep=("img_mlp",), **SMALL))
    assert _status(changed) == {"export": "skipped", "calibrate": "skipped", "quantize": "ran", "lint": "ran",
                                "engine": "ran"}
    assert changed.manifest.components["transformer"].graph != first.manifest.components["transformer"].graph

    # Another calibration seed re-records the set and everything after it.
    reseeded = build(tiny_checkpoint, out, BuildOptions(precision="int8", keep=("img_mlp",), seed=1, **SMALL))
    assert _status(reseeded)["calibrate"] == "ran" and _status(reseeded)["quantize"] == "ran"
    assert _status(reseeded)["export"] == "skipped"

    # A deleted engine file is rebuilt alone.
    (out / reseeded.manifest.components["vae_decoder"].onnxruntime.file).unlink()
    healed = build(tiny_checkpoint, out, BuildOptions(precision="int8", keep=("img_mlp",), seed=1, **SMALL))
    assert _status(healed) == {"export": "skipped", "calibrate": "skipped", "quantize": "skipped",
                               "lint": "skipped", "engine": "ran"}


def test_a_changed_weight_rebuilds_everything_after_it(tiny_checkpoint, tmp_path):
    """Engine identity cannot go stale: one changed weight in the checkpoint changes the checkpoint identity,
    the exported graph's weight hash, and so every stage after export runs again."""
    import shutil

    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    opts = dict(precision="fp32", progress=False, components=("vae_decoder",))  # the VAE exports in seconds
    first = build(ckpt, tmp_path / "e", BuildOptions(**opts))
    f = next((ckpt / "vae").glob("*.safetensors"))
    tensors = load_file(str(f))
    name = next(k for k, v in tensors.items() if k.startswith("decoder.") and v.dim() == 5)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1.0
    save_file(tensors, str(f))
    from qwen_image_trt import load_pipeline

    with pytest.raises(Exception, match="re-export"):  # the old engines are refused for the new checkpoint
        load_pipeline(ckpt, engines=tmp_path / "e", backend="onnxruntime")
    second = build(ckpt, tmp_path / "e", BuildOptions(**opts))
    assert _status(second)["export"] == "ran" and _status(second)["engine"] == "ran"
    a, b = first.manifest.components["vae_decoder"].graph, second.manifest.components["vae_decoder"].graph
    assert a.external_data_sha256 != b.external_data_sha256


def test_build_checks_before_work(tiny_checkpoint, int8_build, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(InputError, match="precision"):
        build(tiny_checkpoint, out, BuildOptions(precision="int4"))
    with pytest.raises(InputError, match="target"):
        build(tiny_checkpoint, out, BuildOptions(precision="int8", target="openvino"))
    with pytest.raises(InputError, match="num_prompts"):
        build(tiny_checkpoint, out, BuildOptions(precision="fp8", sizes="64x64,96x64,64x96", num_prompts=2))
    with pytest.raises(InputError, match="keep"):
        build(tiny_checkpoint, out, BuildOptions(precision="fp16", keep=("img_mlp",)))
    # A calibration set for other sizes (too few samples at the sizes asked), or from another checkpoint.
    calib = int8_build[0] / "calibration"
    with pytest.raises(InputError, match="too few for 128x128"):
        build(tiny_checkpoint, out, BuildOptions(precision="int8", calibration=str(calib), sizes="128x128"))
    try:
        import tensorrt  # noqa: F401
        has_trt = torch.cuda.is_available()
    except Exception:
        has_trt = False
    if not has_trt:
        with pytest.raises(QitrtError, match="TensorRT"):
            build(tiny_checkpoint, out, BuildOptions(precision="fp8", target="tensorrt"))
    assert not out.exists()


def test_build_rejects_calibration_from_another_checkpoint(tmp_path, int8_build):
    from qwen_image_trt.models.tiny import make_tiny_checkpoint

    other = make_tiny_checkpoint(tmp_path / "other", seed=7)
    with pytest.raises(InputError, match="recorded from this checkpoint"):
        build(other, tmp_path / "o", BuildOptions(precision="int8", calibration=str(int8_build[0] / "calibration")))
    assert not (tmp_path / "o").exists()


def test_build_cli_reuses_a_calibration_set(tiny_checkpoint, int8_build, tmp_path, capsys):
    from qwen_image_trt.cli import main

    calib = int8_build[0] / "calibration"
    args = ["build", str(tiny_checkpoint), "--precision", "fp8", "--out", str(tmp_path / "fp8"),
            "--calibration", str(calib)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "calibrate  reused" in text and "quantize   ran" in text
    m = json.loads((tmp_path / "fp8" / "manifest.json").read_text())
    assert m["precision"] == "fp8" and m["schema_version"] == 2
    assert main(["build", str(tiny_checkpoint), "--precision", "int3", "--out", str(tmp_path / "x")]) == 2
    assert "precision" in capsys.readouterr().err
    assert main(["lint", str(tmp_path / "fp8")]) == 0
