"""Real width: Qwen-Image's real transformer config (width 3072, 24 heads x 128, joint_attention_dim 3584) with a
few of its 60 blocks, through the stock pipeline and the exporter; the scale benchmark's analysis.

The 2-block fp32 export (~40 s, ~5 GB of RAM and 6 GB of disk) runs in the default suite: it is the one test of
a graph over 2 GB. The other slow ones are opt-in: QITRT_SLOW=1 pytest tests/test_scale.py
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen_image_trt.models import checkpoint as ckpt

GB = 1e9
REPO = Path(__file__).resolve().parent.parent
ONE_BLOCK_PARAMS = 380_354_624  # 40.5 M outside the blocks + 339.8 M per block


slow = pytest.mark.slow  # skipped unless QITRT_SLOW=1 (tests/conftest.py)


@pytest.fixture(scope="module")
def real_width(tmp_path_factory):
    """A 1-block real-width checkpoint, made through the CLI (~12 s, 0.85 GB)."""
    from qwen_image_trt.cli import main

    out = tmp_path_factory.mktemp("real-width") / "rw1"
    assert main(["tiny", str(out), "--real-width", "--layers", "1"]) == 0
    return out


def test_real_width_checkpoint_has_the_real_config(real_width):
    from qwen_image_trt.calibration.capture import REAL_DEFAULTS, default_settings
    from qwen_image_trt.models.tiny import REAL_TRANSFORMER_CONFIG

    cfg = ckpt.read_config(real_width, "transformer")
    for k, v in REAL_TRANSFORMER_CONFIG.items():
        want = list(v) if isinstance(v, tuple) else v
        assert cfg[k] == (1 if k == "num_layers" else want), k
    te = ckpt.read_config(real_width, "text_encoder")
    text = te.get("text_config", te)
    assert text["hidden_size"] == 3584 == cfg["joint_attention_dim"]
    assert text["num_attention_heads"] == 28 and text["num_key_value_heads"] == 4
    assert ckpt.read_config(real_width, "vae")["z_dim"] == 16
    w = ckpt.weights_info(real_width, "transformer")
    assert (w.parameters, w.precision) == (ONE_BLOCK_PARAMS, "bf16")
    assert ckpt.weights_info(real_width, "text_encoder").precision == "bf16"
    # not the tiny marker: stages treat it as a real checkpoint (real calibration defaults and sizes)
    assert not ckpt.is_tiny(real_width) and (real_width / "RANDOM_WEIGHTS.txt").is_file()
    assert default_settings(real_width) == dict(REAL_DEFAULTS)
    ckpt.validate_checkpoint(real_width)


def test_real_width_pipeline_runs_and_depends_on_the_prompt(real_width):
    from qwen_image_trt.models.pipelines import load_stock_pipeline

    pipe = load_stock_pipeline(real_width)
    out = {}
    for prompt in ("a red cat on a table", "a city street at night, neon sign"):
        out[prompt] = pipe(prompt=prompt, negative_prompt=" ", true_cfg_scale=4.0, height=64, width=64,
                           num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                           output_type="latent").images
    a, b = out.values()
    assert torch.isfinite(a).all() and a.shape == b.shape
    assert (a - b).abs().max() > 1e-3 * a.abs().max()  # the prompt reaches the output
    del pipe
    gc.collect()


def test_cli_tiny_options_are_checked(tmp_path, capsys):
    from qwen_image_trt.cli import main

    assert main(["tiny", str(tmp_path / "a"), "--layers", "3"]) == 2  # --layers needs --real-width/--sparse
    assert main(["tiny", str(tmp_path / "b"), "--real-width", "--layers", "61"]) == 2
    assert main(["tiny", str(tmp_path / "c"), "--sparse", "--dtype", "fp32"]) == 2
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("")
    assert main(["tiny", str(tmp_path / "d"), "--real-width"]) == 2  # not empty, no --overwrite
    err = capsys.readouterr().err
    assert "layers" in err and "[1, 60]" in err and "--overwrite" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------ the benchmark
def _bench():
    spec = importlib.util.spec_from_file_location("scale_build", REPO / "benchmarks" / "scale_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _synthetic_runs(sb):
    """Runs of an exactly linear model: 40 M + 340 M parameters per block, RSS = 0.5 GB + 1.1 x weights."""
    runs = []
    for blocks in (1, 2, 4):
        params = 40_000_000 + 340_000_000 * blocks
        run = {"blocks": blocks, "weights": {"transformer": {"parameters": params},
                                             "text_encoder": {"parameters": 40_000_000}}, "stages": {}}
        for stage in sb.STAGES:
            w = sb.stage_weights(run, stage) or params * 2
            run["stages"][stage] = {"ok": True, "seconds": 5 + 1e-8 * w, "wall_s": 8 + 1e-8 * w,
                                    "peak_rss_bytes": int(0.5e9 + 1.1 * w), "ru_maxrss_bytes": int(0.5e9 + 1.1 * w),
                                    "disk_bytes": int(0.9 * w), "loadavg_before": [1.0], "loadavg_after": [2.0],
                                    "import_rss_bytes": 2.6e8}
        runs.append(run)
    return runs


def test_benchmark_fits_predicts_and_writes_what_plan_reads(tmp_path):
    from qwen_image_trt.compile.plan import load_fit

    sb = _bench()
    f = sb.fit_line([1, 2, 4], [3.0, 5.0, 9.0])
    assert abs(f["a"] - 1) < 1e-9 and abs(f["b"] - 2) < 1e-9 and f["r2"] == pytest.approx(1.0)
    assert sb.fit_line([1], [3.0]) is None
    runs = _synthetic_runs(sb)
    an = sb.analyse(runs)
    assert an["parameters"]["real_model"] == 40_000_000 + 60 * 340_000_000
    pred = an["predictions"]["export_fp32"]
    w60 = (40_000_000 + 60 * 340_000_000) * 4
    assert pred["weights_bytes"] == pytest.approx(w60)
    assert pred["peak_rss_bytes"] == pytest.approx(0.5e9 + 1.1 * w60, rel=1e-9)
    assert an["limits"]["export_fp32"]["real_ok"] and all(v["ok"] for v in an["limits"]["export_fp32"]["measured"])
    coef = an["coefficients"]["quantize_bf16"]["peak_rss_bytes"]
    assert coef["per_weight_byte"] == pytest.approx(1.1) and coef["fixed"] == pytest.approx(0.5e9)
    result = {"command": "test", "started": "2026-01-01T00:00:00+00:00",
              "machine": {"cpu_count": 2, "ram_bytes": 24e9, "versions": {}, "cpu_matmul_flops_per_s": 4e10},
              "settings": {"blocks": [1, 2, 4], "calibration": sb.CALIBRATION}}
    assert sb.report(result, runs, tmp_path, tmp_path / "fit.json") == 0
    md = (tmp_path / "scale_build.md").read_text()
    assert "| 4 | quantize_fp32 |" in md and "within limit" in md and "Caveats" in md
    assert json.loads((tmp_path / "scale_build.json").read_text())["analysis"]["predictions"]
    fit = load_fit(str(tmp_path / "fit.json"))
    assert fit["stages"]["export"]["bf16"]["peak_rss_bytes"]["per_weight_byte"] == pytest.approx(1.1)
    assert set(fit["stages"]) == {"export", "calibrate", "quantize", "ort_engine"}
    pytest.importorskip("matplotlib")
    assert (tmp_path / "scale_build.png").stat().st_size > 10_000


def test_benchmark_limit_verdict_fails_an_over_limit_stage():
    sb = _bench()
    runs = _synthetic_runs(sb)
    for run in runs:  # quantization at 2.5 x weights: over the 2 x + 2 GB limit at 60 blocks
        row = run["stages"]["quantize_fp32"]
        row["peak_rss_bytes"] = int(2.5 * sb.stage_weights(run, "quantize_fp32"))
    an = sb.analyse(runs)
    assert not an["limits"]["quantize_fp32"]["real_ok"]
    assert an["predictions"]["quantize_fp32"]["ratio_peak_over_weights"] == pytest.approx(2.5, rel=1e-6)


# -------------------------------------------------------------------------------------------- slow ones
def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


@slow
def test_real_width_checkpoint_is_seeded(real_width, tmp_path):
    from qwen_image_trt.models.tiny import make_real_width_checkpoint

    again = make_real_width_checkpoint(tmp_path / "again", 1)
    for rel in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                "vae/diffusion_pytorch_model.safetensors", "transformer/config.json"):
        assert _sha(real_width / rel) == _sha(again / rel), rel


def test_real_width_two_blocks_fp32_export_runs_in_onnxruntime(tmp_path):
    """2 real-width blocks in fp32: 2.9 GB of weights, a data file over 2 GB (no threshold patched), the graph
    run in ONNX Runtime at a shape other than the traced one, equal to eager; export's peak within its limit."""
    from qwen_image_trt.compile import onnx_io
    from qwen_image_trt.compile.export import export_onnx
    from qwen_image_trt.core.resources import rss_bytes
    from qwen_image_trt.models.specs import TRANSFORMER
    from qwen_image_trt.models.tiny import make_real_width_checkpoint

    root = make_real_width_checkpoint(tmp_path / "rw2", 2, dtype="fp32")
    w = ckpt.weights_info(root, "transformer")
    assert w.precision == "fp32" and w.bytes > 2.8 * GB
    gc.collect()
    before = rss_bytes()
    m = export_onnx(root, tmp_path / "onnx", precision="fp32", components=("transformer",), progress=False)
    c = m.components["transformer"]
    data = tmp_path / "onnx" / c.graph.external_data
    assert data.stat().st_size > 2**31  # over protobuf's 2 GB: only external data can hold it
    assert (tmp_path / "onnx" / c.graph.file).stat().st_size < 20e6  # the proto holds no weights
    assert c.peak_rss_bytes - before <= 1.5 * w.bytes + 2 * GB, (c.peak_rss_bytes - before) / GB
    assert c.check["max_abs_err_vs_eager"] <= 1e-4 * c.check["max_abs_eager"]

    # independent of export's own check: other inputs, another shape, eager first, then ONNX Runtime
    config = ckpt.read_config(root, "transformer")
    args = TRANSFORMER.sample_inputs(config, batch=2, grid=(4, 10), text_len=23, seed=7)
    module = TRANSFORMER.build_module(root, torch.float32)
    with torch.no_grad():
        want = module(*args).float().numpy()
    del module
    gc.collect()
    sess = onnx_io.ort_session(tmp_path / "onnx" / c.graph.file)
    got = sess.run(None, {n: onnx_io.as_numpy(a) for n, a in zip(TRANSFORMER.input_names, args)})[0]
    del sess
    assert got.shape == want.shape == (2, 40, 64)
    scale = float(np.abs(want).max())
    err = float(np.abs(got - want).max())
    assert scale > 0.1 and np.isfinite(got).all()
    assert err <= 1e-4 * scale, (err, scale)


@pytest.mark.slow
def test_real_width_edit_2511_graph_over_2gb_keeps_a_dynamic_batch(tmp_path):
    """Edit-2511 at real width (2 blocks, fp32, zero_cond_t): its graph (modulate_index input, the block's chunk
    written as a slice) crosses 2 GB and runs in ONNX Runtime at batch 3, traced at 2, equal to eager."""
    from qwen_image_trt.compile.export import export_onnx
    from qwen_image_trt.models.tiny import make_real_width_checkpoint

    root = make_real_width_checkpoint(tmp_path / "rw2511", 2, dtype="fp32")
    config_file = root / "transformer" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "zero_cond_t": True}))
    m = export_onnx(root, tmp_path / "onnx", precision="fp32", components=("transformer",), progress=False)
    c = m.components["transformer"]
    assert [i.name for i in c.inputs][-1] == "modulate_index"
    assert (tmp_path / "onnx" / c.graph.external_data).stat().st_size > 2**31
    assert c.check["shape"]["batch"] == 3  # export's own ONNX Runtime run, at another batch than traced
    assert c.check["max_abs_err_vs_eager"] <= 1e-4 * c.check["max_abs_eager"]
