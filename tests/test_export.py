"""Export: the wrapper equals the stock module; graphs are valid, dynamic, resumable and described by a manifest."""

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from qwen_image_trt.compile.export import export_onnx
from qwen_image_trt.core.errors import InputError
from qwen_image_trt.models.checkpoint import checkpoint_identity, load_transformer, load_vae
from qwen_image_trt.models.specs import SPECS, VaeDecoderExport, VaeEncoderExport
from qwen_image_trt.models.transformer_export import ExportableTransformer, sample_inputs


@pytest.mark.parametrize("batch, grid, text_len", [(1, (4, 4), 5), (2, (6, 10), 12), (3, (8, 6), 33)])
def test_wrapper_equals_stock_transformer(tiny_checkpoint, batch, grid, text_len):
    stock = load_transformer(tiny_checkpoint)
    wrapper = ExportableTransformer(copy.deepcopy(stock)).eval()
    args = sample_inputs(stock.config, batch=batch, grid=grid, text_len=text_len)
    with torch.no_grad():
        want = stock(hidden_states=args[0], encoder_hidden_states=args[1], encoder_hidden_states_mask=args[2],
                     timestep=args[3], img_shapes=[[(1, *grid)]] * batch, return_dict=False)[0]
        got = wrapper(*args)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-6


def test_vae_wrappers_equal_stock_vae(tiny_checkpoint):
    vae = load_vae(tiny_checkpoint)
    z = torch.randn(2, 16, 1, 6, 4, generator=torch.Generator().manual_seed(0))
    x = torch.rand(1, 3, 1, 48, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want_img = vae.decode(z, return_dict=False)[0]
        want_params = vae.encode(x).latent_dist.parameters
        got_img = VaeDecoderExport(copy.deepcopy(vae))(z)
        got_params = VaeEncoderExport(vae)(x)
    assert (got_img - want_img).abs().max().item() <= 1e-5
    assert (got_params - want_params).abs().max().item() <= 1e-5


def test_export_manifest_and_graphs(tiny_checkpoint, tiny_engines):
    from qwen_image_trt.core.files import file_sha256
    from qwen_image_trt.core.manifest import read_manifest

    m = read_manifest(tiny_engines)
    assert m.checkpoint.identity == checkpoint_identity(tiny_checkpoint)
    assert m.precision == "fp32" and m.opset >= 17 and "dynamo=True" in m.exporter  # auto: the tiny model is fp32
    assert m.checkpoint.transformer_config["num_layers"] == 6
    assert {"torch", "onnx", "onnxruntime", "diffusers"} <= set(m.versions)
    for name in ("transformer", "vae_decoder", "vae_encoder"):
        entry = m.components[name]
        path = entry.graph.path(tiny_engines)
        onnx.checker.check_model(str(path))
        assert [i.name for i in entry.inputs] == SPECS[name].input_names
        assert entry.check["max_abs_err_vs_eager"] < 1e-4 and entry.peak_rss_bytes > 0
        # Weights always stream to one data file whose hash was taken while it was written.
        data = entry.graph.data_path(tiny_engines)
        assert data.name == f"{name}.onnx.data" and file_sha256(data) == entry.graph.external_data_sha256
        assert entry.graph.bytes == path.stat().st_size + data.stat().st_size
    tx = {i.name: i.shape for i in m.components["transformer"].inputs}
    assert tx["hidden_states"][:2] == ["batch", "image_tokens"]
    assert tx["encoder_hidden_states"][:2] == ["batch", "text_tokens"]
    assert m.components["vae_decoder"].inputs[0].shape == ["batch", 16, 1, "latent_height", "latent_width"]
    out = m.components["vae_decoder"].outputs[0].shape
    assert out[:3] == ["batch", 3, 1] and all("latent" in str(d) for d in out[3:])


def test_linear_weights_are_named_after_their_modules(tiny_engines):
    """Folded Linear weights carry their module's name, so quantization and LoRA find them by name."""
    from qwen_image_trt.compile.onnx_io import linear_weights, load_structure

    model = load_structure(tiny_engines / "transformer.onnx")
    found = linear_weights(model)
    names = {m.removeprefix("transformer.") for m in found}
    assert "transformer_blocks.0.attn.to_q" in names and "transformer_blocks.5.img_mlp.net.2" in names
    for module, lw in found.items():
        assert lw.weight.name in (f"{module}.weight.T", f"{module}.weight")
        shape = tuple(lw.weight.const_value.shape)
        assert shape[0] >= 1 and len(shape) == 2


@pytest.mark.parametrize("batch, grid, text_len", [(1, (2, 2), 1), (2, (4, 8), 32), (4, (16, 16), 64),
                                                   (1, (8, 4), 100)])
def test_transformer_graph_runs_at_other_shapes(tiny_checkpoint, tiny_engines, batch, grid, text_len):
    sess = ort.InferenceSession(str(tiny_engines / "transformer.onnx"), providers=["CPUExecutionProvider"])
    module = ExportableTransformer(load_transformer(tiny_checkpoint)).eval()
    args = sample_inputs(module.transformer.config, batch=batch, grid=grid, text_len=text_len, seed=3)
    got = sess.run(None, {n: a.numpy() for n, a in zip(SPECS["transformer"].input_names, args)})[0]
    with torch.no_grad():
        want = module(*args).numpy()
    assert got.shape == (batch, grid[0] * grid[1], 64)
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize("batch, height, width", [(1, 16, 16), (3, 64, 96), (1, 128, 32)])
def test_vae_decoder_graph_dynamic(tiny_checkpoint, tiny_engines, batch, height, width):
    sess = ort.InferenceSession(str(tiny_engines / "vae_decoder.onnx"), providers=["CPUExecutionProvider"])
    z = np.random.default_rng(0).standard_normal((batch, 16, 1, height // 8, width // 8)).astype(np.float32)
    (img,) = sess.run(None, {"latents": z})
    with torch.no_grad():
        want = load_vae(tiny_checkpoint).decode(torch.from_numpy(z), return_dict=False)[0].numpy()
    assert img.shape == want.shape == (batch, 3, 1, height, width)
    assert np.abs(img - want).max() < 1e-4


def test_export_skips_unchanged_and_redoes_forced(tiny_checkpoint, tmp_path):
    out = tmp_path / "eng"
    first = export_onnx(tiny_checkpoint, out, components=["vae_decoder"], progress=False)
    stamp = (out / "vae_decoder.onnx").stat().st_mtime_ns
    again = export_onnx(tiny_checkpoint, out, components=["vae_decoder"], progress=False)
    assert not again.ran and (out / "vae_decoder.onnx").stat().st_mtime_ns == stamp
    assert again.components["vae_decoder"].graph == first.components["vae_decoder"].graph
    (out / "vae_decoder.onnx.data").write_bytes(b"truncated")  # a damaged data file is never trusted
    redone = export_onnx(tiny_checkpoint, out, components=["vae_decoder"], progress=False)
    assert redone.ran and redone.components["vae_decoder"].graph == first.components["vae_decoder"].graph
    forced = export_onnx(tiny_checkpoint, out, components=["vae_decoder"], force=True, progress=False)
    assert forced.ran and (out / "vae_decoder.onnx").stat().st_mtime_ns != stamp


def test_export_fp16_carries_precision_in_graph(tiny_checkpoint, tmp_path):
    m = export_onnx(tiny_checkpoint, tmp_path / "fp16", precision="fp16", components=["transformer"], progress=False)
    graph = onnx.load(str(tmp_path / "fp16" / "transformer.onnx"))
    dtypes = {i.data_type for i in graph.graph.initializer if len(i.dims) == 2 and ".weight" in i.name}
    assert dtypes == {onnx.TensorProto.FLOAT16}  # weights in half, I/O stays float32
    assert m.components["transformer"].inputs[0].dtype == "float32"
    assert m.components["transformer"].check["max_abs_err_vs_eager"] < 0.05


@pytest.mark.parametrize("kwargs, field", [(dict(precision="int4"), "precision"),
                                           (dict(components=["unet"]), "components")])
def test_export_bad_input(tiny_checkpoint, tmp_path, kwargs, field):
    with pytest.raises(InputError, match=field):
        export_onnx(tiny_checkpoint, tmp_path / "x", progress=False, **kwargs)
    assert not (tmp_path / "x").exists()  # refused before any work


def test_export_to_an_unwritable_place_is_one_clear_error(tiny_checkpoint, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(InputError, match="out=.*a folder this user can create and write"):
        export_onnx(tiny_checkpoint, blocker / "eng", progress=False)


def test_export_bf16_transformer_keeps_vae_fp32(tiny_engines_bf16):
    from qwen_image_trt.core.manifest import read_manifest

    m = read_manifest(tiny_engines_bf16)
    tx, vae = m.components["transformer"], m.components["vae_decoder"]
    graph = onnx.load(str(tiny_engines_bf16 / "transformer.onnx"), load_external_data=False)
    weights = {i.data_type for i in graph.graph.initializer if len(i.dims) == 2 and ".weight" in i.name}
    assert weights == {onnx.TensorProto.BFLOAT16}
    assert tx.precision == "bf16" and vae.precision == "fp32"
    # ONNX Runtime's CPU provider cannot run bf16 MatMul: the manifest says so rather than claiming a run.
    assert tx.check["max_abs_err_vs_eager"] is None and "bf16" in tx.check["skipped"]
    assert vae.check["max_abs_err_vs_eager"] < 1e-4


def test_auto_precision_is_the_checkpoints_own(tiny_checkpoint, tmp_path):
    """A real Qwen-Image checkpoint is bf16 and exports in bf16 by default; the tiny one is fp32."""
    import shutil

    from safetensors.torch import load_file, save_file

    from qwen_image_trt.compile.export import resolve_precision

    assert resolve_precision(tiny_checkpoint, "auto") == "fp32"
    copy_ = tmp_path / "bf16-ckpt"
    shutil.copytree(tiny_checkpoint, copy_)
    f = next((copy_ / "transformer").glob("*.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()}, str(f))
    assert resolve_precision(copy_, "auto") == "bf16"


def test_a_full_disk_leaves_no_graph_a_later_run_would_trust(tiny_checkpoint, tmp_path):
    """A file-size limit (RLIMIT_FSIZE) makes the data file's writes fail, as a full disk would: the export
    stops with a clear error, and neither a graph nor a partial file is left in place."""
    import subprocess
    import sys
    import textwrap

    out = tmp_path / "eng"
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
        from qwen_image_trt.cli import main
        sys.exit(main(["export", {str(tiny_checkpoint)!r}, "--out", {str(out)!r}, "--components", "vae_decoder"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: " in proc.stderr and "nothing half-written was kept" in proc.stderr
    assert "Traceback" not in proc.stderr
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert "vae_decoder.onnx" not in left and not [n for n in left if n.endswith(".partial")], left


def test_the_skipped_rewrite_is_the_only_change_to_the_exporters_optimizer():
    """`without_rewrites` drops exactly the named onnxscript rules for the duration of an export, then restores them
    (the optimizer of every other caller in the process is untouched)."""
    from onnxscript import rewriter

    from qwen_image_trt.compile.onnx_io import SKIPPED_REWRITES, without_rewrites

    before = rewriter._DEFAULT_REWRITE_RULES
    names = [getattr(r, "name", None) for r in before]
    assert set(SKIPPED_REWRITES) <= set(names)  # an onnxscript without the rule would make this a no-op: say so
    with without_rewrites():
        inside = [getattr(r, "name", None) for r in rewriter._DEFAULT_REWRITE_RULES]
    assert inside == [n for n in names if n not in SKIPPED_REWRITES]
    assert rewriter._DEFAULT_REWRITE_RULES is before


@pytest.mark.slow  # two transformer traces (~75 s)
def test_the_transformer_graph_is_the_same_without_the_skipped_rewrite(tiny_checkpoint):
    import collections

    from qwen_image_trt.compile import onnx_io
    from qwen_image_trt.models.checkpoint import read_config
    from qwen_image_trt.models.specs import spec_for

    config = read_config(tiny_checkpoint, "transformer")
    spec = spec_for("transformer", config)
    module = spec.build_module(tiny_checkpoint, torch.float32)
    ops = [collections.Counter(n.op_type for n in onnx_io.trace(module, spec.sample_inputs(config), spec, 19,
                                                                skip_rewrites=skip).graph.all_nodes())
           for skip in ((), onnx_io.SKIPPED_REWRITES)]
    assert ops[0] == ops[1]
