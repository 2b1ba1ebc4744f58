"""CLI commands end to end (real subprocess), bad input before heavy work, and the parity gates."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from qwen_image_trt.parity.run import ParityConfig, run_parity


def qitrt(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "qwen_image_trt.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def test_generate_with_engines_matches_eager(tiny_checkpoint, tiny_engines, tmp_path):
    common = ["--prompt", "a lighthouse at dusk", "--negative-prompt", " ", "--seed", 3, "--steps", 3,
              "--height", 64, "--width", 80]
    r1 = qitrt("generate", tiny_checkpoint, *common, "--out", tmp_path / "eager.png")
    r2 = qitrt("generate", tiny_checkpoint, "--engines", tiny_engines, "--backend", "onnxruntime", *common,
               "--out", tmp_path / "ort.png")
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr
    a, b = (np.asarray(Image.open(tmp_path / f)).astype(int) for f in ("eager.png", "ort.png"))
    assert a.shape == (64, 80, 3) and np.abs(a - b).max() <= 1


@pytest.mark.parametrize("args, field", [
    (["--height", 100], "height=100"),
    (["--width", 8192], "width=8192"),
    (["--steps", 0], "steps=0"),
    (["--steps", 1], "steps=1"),  # Qwen-Image's shift_terminal makes a 1-step schedule NaN
    (["--prompt", "  "], "prompt="),
    (["--backend", "tensorflow"], "backend="),
    (["--engines", "/nonexistent"], "engines="),
])
def test_generate_bad_input_names_the_field(tiny_checkpoint, tmp_path, capsys, args, field):
    """In process (the CLI's own main, exit code and stderr): a subprocess per case would cost its imports."""
    from qwen_image_trt.cli import main

    base = {"--prompt": "a cat", "--height": 64, "--width": 64, "--steps": 2}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    flat = [x for kv in base.items() for x in kv if kv[0] not in ("--backend", "--engines")]
    extra = [a for a in args if args.index(a) % 2 == 0 and a in ("--backend", "--engines")]
    for flag in extra:
        flat += [flag, base[flag]]
    code = main(["generate", tiny_checkpoint, *flat, "--out", tmp_path / "x.png"])
    err = capsys.readouterr().err
    assert code == 2
    assert field in err and "allowed" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_generate_missing_checkpoint(tmp_path):
    r = qitrt("generate", tmp_path / "missing", "--prompt", "a cat", "--out", tmp_path / "x.png", "--height", 64,
              "--width", 64)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_parity_passes_and_writes_report(tiny_checkpoint, tiny_engines, tmp_path):
    r = qitrt("parity", tiny_checkpoint, "--engines", tiny_engines, "--backend", "onnxruntime", "--out",
              tmp_path / "report", "--steps", 2, "--sizes", "32x32,64x32", "--batches", "1,2")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["passed"] and {g["name"] for g in report["gates"]} >= {"forward_cosine_min", "image_psnr_min"}
    assert {(row["batch"], tuple(row["grid"])) for row in report["forward"] if row["component"] == "transformer"} \
        == {(1, (2, 2)), (2, (2, 2)), (1, (2, 4)), (2, (2, 4))}
    assert len(report["per_step"]) == 2 * len(report["images"])
    html = (tmp_path / "report" / "report.html").read_text()
    for img in report["images"]:
        for f in img["files"].values():
            assert f in html and (tmp_path / "report" / f).is_file()


def test_parity_fails_on_perturbed_weights(tiny_checkpoint, tiny_engines, tmp_path):
    """Engines whose weights differ slightly from the checkpoint's (one Linear scaled by 1.5 in the graph's data
    file, as an export from a perturbed checkpoint would hold it) must fail the gates."""
    import onnx

    engines = tmp_path / "engines"
    shutil.copytree(tiny_engines, engines)
    graph = onnx.load(str(engines / "transformer.onnx"), load_external_data=False)
    tensor = next(t for t in graph.graph.initializer
                  if t.name.startswith("transformer.transformer_blocks.3.img_mlp.net.2.weight"))
    where = {e.key: e.value for e in tensor.external_data}
    assert tensor.data_type == onnx.TensorProto.FLOAT and where["location"] == "transformer.onnx.data"
    data = np.memmap(engines / where["location"], dtype=np.float32, mode="r+", offset=int(where["offset"]),
                     shape=(int(where["length"]) // 4,))
    data *= 1.5
    data.flush()
    del data
    report = run_parity(ParityConfig(checkpoint=tiny_checkpoint, engines=engines, out=tmp_path / "r", steps=2,
                                     sizes=[(32, 32)], batches=[1], image_size=(64, 64), progress=False))
    assert not report.passed
    failed = {g["name"] for g in report.data["gates"] if not g["ok"]}
    assert "forward_cosine_min" in failed or "forward_rel_l2_max" in failed
    r = qitrt("parity", tiny_checkpoint, "--engines", engines, "--out", tmp_path / "r2", "--steps", 2,
              "--sizes", "32x32", "--batches", "1")
    assert r.returncode == 1 and "FAIL" in r.stdout


def test_parity_gate_override_and_bad_gate(tiny_checkpoint, tiny_engines, tmp_path):
    r = qitrt("parity", tiny_checkpoint, "--engines", tiny_engines, "--out", tmp_path / "r", "--gate",
              "image_psnr_min=1000", "--steps", 2, "--sizes", "32x32", "--batches", "1")
    assert r.returncode == 1 and "BAD image_psnr_min" in r.stdout
    r = qitrt("parity", tiny_checkpoint, "--engines", tiny_engines, "--out", tmp_path / "r2", "--gate", "speed=1")
    assert r.returncode == 2 and "gate='speed=1'" in r.stderr and not (tmp_path / "r2").exists()


def test_tiny_command(tmp_path):
    r = qitrt("tiny", tmp_path / "t")
    assert r.returncode == 0 and (tmp_path / "t" / "model_index.json").is_file()
    r = qitrt("tiny", tmp_path / "t")
    assert r.returncode != 0  # refuses to overwrite without --overwrite
