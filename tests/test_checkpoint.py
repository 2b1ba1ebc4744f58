"""Tiny checkpoint: real classes, diffusers layout, deterministic, loaded like a real one; bad folders refused."""

import json
import shutil

import pytest

from qwen_image_trt.core.errors import CheckpointError
from qwen_image_trt.models.checkpoint import checkpoint_identity, validate_checkpoint
from qwen_image_trt.models.tiny import SYSTEM_PREFIX, make_tiny_checkpoint


def test_tiny_is_deterministic_and_loads_through_from_pretrained(tiny_checkpoint, tmp_path):
    again = make_tiny_checkpoint(tmp_path / "again")
    for f in sorted(p.relative_to(tiny_checkpoint) for p in tiny_checkpoint.rglob("*") if p.is_file()):
        assert (again / f).read_bytes() == (tiny_checkpoint / f).read_bytes(), f
    assert checkpoint_identity(again) == checkpoint_identity(tiny_checkpoint)

    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    pipe = QwenImagePipeline.from_pretrained(tiny_checkpoint)
    assert isinstance(pipe.transformer, QwenImageTransformer2DModel)
    assert type(pipe.text_encoder).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert pipe.vae_scale_factor == 8  # x8 VAE as in the real model
    assert len(pipe.transformer.transformer_blocks) == 6
    # The pipeline drops 34 template tokens; the tiny tokenizer must agree or prompts get eaten.
    assert len(pipe.tokenizer(SYSTEM_PREFIX).input_ids) == pipe.prompt_template_encode_start_idx == 34


def test_identity_changes_with_weights(tiny_checkpoint, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, copy)
    weights = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # flip bits in the last tensor's data
    weights.write_bytes(bytes(data))
    changed = checkpoint_identity(copy)
    assert changed != checkpoint_identity(tiny_checkpoint)
    cfg = json.loads((copy / "vae" / "config.json").read_text())
    cfg["base_dim"] = 32
    (copy / "vae" / "config.json").write_text(json.dumps(cfg))
    assert checkpoint_identity(copy) not in (changed, checkpoint_identity(tiny_checkpoint))


@pytest.mark.parametrize("damage, message", [
    (lambda p: shutil.rmtree(p / "vae"), "missing part(s) vae"),
    (lambda p: (p / "model_index.json").unlink(), "no model_index.json"),
    (lambda p: (p / "model_index.json").write_text('{"_class_name": "FluxPipeline"}'), "'FluxPipeline'"),
    (lambda p: (p / "transformer" / "diffusion_pytorch_model.safetensors").unlink(), "no weights"),
])
def test_bad_checkpoint_folders_are_named(tiny_checkpoint, tmp_path, damage, message):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    damage(broken)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_checkpoint(broken)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        validate_checkpoint(tmp_path / "nope")


def test_tiny_refuses_to_overwrite(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        make_tiny_checkpoint(tmp_path / "x")
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"
