"""LoRA: read through diffusers in every release format, merged at export, loaded at run time on ONNX Runtime
engines with diffusers' API, each equal to stock diffusers + PEFT running the same adapter on the same model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from qwen_image_trt.core.errors import InputError, QitrtError
from qwen_image_trt.models.lora import LoraSpec, read_adapter
from qwen_image_trt.models.tiny import make_tiny_lora

CALL = dict(prompt="a red fox in the snow", negative_prompt="blurry", true_cfg_scale=4.0, height=64, width=64,
            num_inference_steps=3, output_type="latent")
SAME = 1e-5  # fp32 engine vs eager, relative L2 of the final latents
MOVES = 1e-2  # what an adapter must change for "equal" to mean anything


def latents(pipe, seed=0):
    return pipe(**CALL, generator=torch.Generator().manual_seed(seed)).images.float()


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def loras(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("loras")
    return {fmt: make_tiny_lora(tiny_checkpoint, out / f"{fmt}.safetensors", fmt=fmt, seed=i, alpha=2 if i else None)
            for i, fmt in enumerate(("peft", "kohya", "lightning"))}


@pytest.fixture(scope="module")
def transformer_config(tiny_checkpoint):
    return json.loads((tiny_checkpoint / "transformer" / "config.json").read_text())


# -- reading -----------------------------------------------------------------------------------------------
def test_every_release_format_reads_to_the_same_update(tiny_checkpoint, transformer_config, tmp_path):
    """One adapter written as diffusers/PEFT (alpha 2, rank 4: PEFT scales by 0.5), kohya and Lightning (alpha folded
    in by diffusers' conversion) gives the same delta W per module."""
    files = {fmt: make_tiny_lora(tiny_checkpoint, tmp_path / f"{fmt}.safetensors", fmt=fmt, seed=7, alpha=2)
             for fmt in ("peft", "kohya", "lightning")}
    adapters = {fmt: read_adapter(path, transformer_config) for fmt, path in files.items()}
    peft = adapters["peft"]
    assert peft.name == "peft" and len(peft.modules) == 8 * transformer_config["num_layers"]
    assert peft.modules["transformer_blocks.0.attn.to_q"].scale == pytest.approx(0.5)  # alpha / rank from metadata
    assert adapters["kohya"].modules["transformer_blocks.0.attn.to_q"].scale == 1.0  # alpha folded into the factors
    for fmt in ("kohya", "lightning"):
        assert set(adapters[fmt].modules) == set(peft.modules)
        for module, factors in peft.modules.items():
            torch.testing.assert_close(adapters[fmt].modules[module].delta(), factors.delta(), rtol=1e-5, atol=1e-6)


def test_foreign_and_unsupported_adapters_are_refused_by_name(tiny_checkpoint, transformer_config, tmp_path):
    from safetensors.torch import save_file

    bad_shape = tmp_path / "other_model.safetensors"  # a LoRA for a wider model: in-features 96, not 64
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 96),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(96, 4)}, str(bad_shape))
    with pytest.raises(InputError, match="to_q"):
        read_adapter(bad_shape, transformer_config)

    missing = tmp_path / "deeper_model.safetensors"  # block 40 does not exist in a 6-block transformer
    save_file({"transformer.transformer_blocks.40.attn.to_q.lora_A.weight": torch.randn(4, 64),
               "transformer.transformer_blocks.40.attn.to_q.lora_B.weight": torch.randn(64, 4)}, str(missing))
    with pytest.raises(InputError, match="lora"):
        read_adapter(missing, transformer_config)

    dora = tmp_path / "dora.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 64),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(64, 4),
               "transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": torch.randn(64)}, str(dora))
    with pytest.raises(InputError, match="DoRA"):
        read_adapter(dora, transformer_config)

    not_lora = tmp_path / "weights.safetensors"
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.randn(64, 64)}, str(not_lora))
    with pytest.raises(InputError, match="lora"):
        read_adapter(not_lora, transformer_config)


def test_lora_argument_parsing(tmp_path):
    f = tmp_path / "style.safetensors"
    f.write_bytes(b"x")
    assert LoraSpec.parse(str(f)) == LoraSpec(f, 1.0)
    assert LoraSpec.parse(f"{f}:0.75") == LoraSpec(f, 0.75)
    with pytest.raises(InputError, match="lora scale"):
        LoraSpec.parse(f"{f}:11")
    with pytest.raises(InputError, match="lora="):
        LoraSpec.parse(str(tmp_path / "absent.safetensors:0.5"))


# -- run time ----------------------------------------------------------------------------------------------
def test_runtime_lora_on_onnxruntime_equals_stock_diffusers(tiny_checkpoint, tiny_engines, loras):
    """The same sequence of diffusers LoRA calls on stock diffusers (PEFT layers) and on an ONNX Runtime engine
    pipeline (initializers swapped by name) gives the same latents after every call."""
    from qwen_image_trt import load_pipeline
    from qwen_image_trt.models.pipelines import load_stock_pipeline

    stock = load_stock_pipeline(tiny_checkpoint)
    engine = load_pipeline(tiny_checkpoint, engines=tiny_engines, backend="onnxruntime")
    base = latents(stock)
    assert rel(latents(engine), base) < SAME

    def both(call):
        call(stock)
        call(engine)
        want, got = latents(stock), latents(engine)
        assert rel(got, want) < SAME
        return want

    one = both(lambda p: p.load_lora_weights(str(loras["peft"])))
    assert rel(one, base) > MOVES
    assert engine.get_active_adapters() == stock.get_active_adapters() == ["default_0"]
    two = both(lambda p: (p.load_lora_weights(str(loras["kohya"]), adapter_name="k"),
                          p.set_adapters(["default_0", "k"], [0.7, -0.4])))
    assert rel(two, one) > MOVES
    assert engine.get_list_adapters() == stock.get_list_adapters() == {"transformer": ["default_0", "k"]}
    assert rel(both(lambda p: p.disable_lora()), base) < SAME
    both(lambda p: (p.enable_lora(), p.fuse_lora(lora_scale=0.5)))
    both(lambda p: p.unfuse_lora())  # diffusers keeps the 0.5 in the active adapters' scale after unfusing
    both(lambda p: p.delete_adapters("k"))
    fused = both(lambda p: (p.fuse_lora(), p.unload_lora_weights()))  # the merge stays after unloading
    assert engine.get_list_adapters() == stock.get_list_adapters() == {}
    assert rel(fused, base) > MOVES

    # A refused load changes nothing: the state and the weights stay as they were.
    with pytest.raises(InputError):
        engine.load_lora_weights(str(tiny_checkpoint / "model_index.json"))
    assert rel(latents(engine), fused) < SAME


def test_runtime_lora_unload_gives_back_the_base_engine(tiny_checkpoint, tiny_engines, loras):
    from qwen_image_trt import load_pipeline

    engine = load_pipeline(tiny_checkpoint, engines=tiny_engines, backend="onnxruntime")
    base = latents(engine)
    engine.load_lora_weights(str(loras["lightning"]), adapter_name="lightning")
    assert rel(latents(engine), base) > MOVES
    session = engine.transformer.runner.session
    engine.set_adapters(["lightning"], [1.0])  # the state it is in: no weight changes, the session stays
    assert engine.transformer.runner.session is session
    with pytest.raises(InputError, match="adapter_name"):
        engine.load_lora_weights(str(loras["peft"]), adapter_name="lightning")  # the name is taken
    with pytest.raises(InputError, match="adapter_names"):
        engine.set_adapters(["nope"])
    engine.unload_lora_weights()
    assert engine.transformer.runner._overrides == {}
    assert rel(latents(engine), base) == 0.0


def test_torch_backend_runs_loras_through_diffusers(tiny_checkpoint, loras):
    """backend="torch" is the eager reference: its transformer is diffusers' module and LoRA calls are diffusers'."""
    from peft.tuners.lora import LoraLayer

    from qwen_image_trt import load_pipeline

    eager = load_pipeline(tiny_checkpoint, backend="torch")
    eager.load_lora_weights(str(loras["peft"]), adapter_name="style")
    assert isinstance(eager.transformer.transformer_blocks[0].attn.to_q, LoraLayer)
    assert eager.get_active_adapters() == ["style"]
    eager.unload_lora_weights()
    assert not isinstance(eager.transformer.transformer_blocks[0].attn.to_q, LoraLayer)


def test_runners_that_cannot_change_weights_say_so():
    from qwen_image_trt.runtime.backends.base import Runner

    class Fixed(Runner):
        backend = "fixed"

        def _activate_impl(self):
            pass

        def _input_metadata_impl(self):
            return {}

        def _infer_impl(self, feeds):
            return {}

    with pytest.raises(NotImplementedError, match="fixed runner 'transformer'.*--lora"):
        Fixed("transformer").set_weights({"w": None})


def test_graph_without_named_linears_is_refused(tiny_engines):
    from qwen_image_trt.runtime.graph_weights import GraphLinears

    linears = GraphLinears(tiny_engines / "transformer.onnx")
    ref = linears.locate("transformer_blocks.0.attn.to_q")
    assert ref.weight.startswith("transformer.transformer_blocks.0.attn.to_q.weight") and not ref.quantized
    assert linears.read(ref.weight).shape == (64, 64)
    with pytest.raises(QitrtError, match="no weight for transformer_blocks.9.attn.to_q"):
        linears.locate("transformer_blocks.9.attn.to_q")


# -- merged at export --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def style_engines(tiny_checkpoint, tiny_engines, loras, tmp_path_factory):
    """A copy of the fp32 export with the kohya adapter merged at 0.8 and made for lightning-4step: (folder,
    the manifest the export returned)."""
    from qwen_image_trt.compile.export import export_onnx

    out = tmp_path_factory.mktemp("style") / "engines-style"
    shutil.copytree(tiny_engines, out)
    m = export_onnx(tiny_checkpoint, out, precision="fp32", progress=False, loras=[f"{loras['kohya']}:0.8"],
                    sampling="lightning-4step")
    return out, m


def test_lora_merged_at_export_equals_stock_with_the_lora(tiny_checkpoint, tiny_engines, loras, style_engines,
                                                          tmp_path):
    """`export --lora F:0.8 --scheduler-config lightning-4step` (a few-step LoRA as it is shipped) re-exports the
    transformer only (the VAE graphs are unchanged), records the adapter and the recipe, and runs as stock diffusers
    does with that adapter at 0.8 and Lightning's scheduler; the same call again is skipped."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from qwen_image_trt.models.sampling import LIGHTNING_SCHEDULER
    from qwen_image_trt.runtime.generate import default_request

    from qwen_image_trt import load_pipeline
    from qwen_image_trt.compile.export import export_onnx
    from qwen_image_trt.models.pipelines import load_stock_pipeline

    out, m = style_engines
    spec = f"{loras['kohya']}:0.8"
    assert m.sampling["steps"] == 4 and m.sampling["scheduler"]["time_shift_type"] == "exponential"
    assert m.loras[0]["sha256"] and m.loras[0]["scale"] == 0.8 and m.loras[0]["name"] == "kohya"
    assert m.components["transformer"].source["loras"] == [{"sha256": m.loras[0]["sha256"], "scale": 0.8}]
    assert "loras" not in m.components["vae_decoder"].source
    assert m.components["vae_decoder"].graph.model_dump() == json_manifest(tiny_engines)["components"]["vae_decoder"]["graph"]
    assert m.components["transformer"].check["max_abs_err_vs_eager"] < 1e-4

    stock = load_stock_pipeline(tiny_checkpoint)
    base = latents(stock)
    stock.load_lora_weights(str(loras["kohya"]), adapter_name="style")
    stock.set_adapters(["style"], [0.8])
    with_default_scheduler = latents(stock)
    stock.scheduler = FlowMatchEulerDiscreteScheduler.from_config(LIGHTNING_SCHEDULER)  # as Lightning's README
    want = latents(stock)
    engine = load_pipeline(tiny_checkpoint, engines=out, backend="onnxruntime")
    got = latents(engine)
    assert rel(want, base) > MOVES and rel(want, with_default_scheduler) > MOVES  # both the LoRA and the schedule show
    assert rel(got, want) < SAME
    assert default_request(tiny_checkpoint, out)[2] == 4  # generate's default steps: the recipe's

    again = export_onnx(tiny_checkpoint, out, precision="fp32", progress=False, loras=[spec], sampling="lightning-4step")
    assert not again.ran

    # parity compares the merged engine with eager running the same adapter (diffusers' PEFT path), so it passes;
    # a changed adapter file is refused rather than compared with the wrong reference
    from qwen_image_trt.parity.run import ParityConfig, run_parity

    report = run_parity(ParityConfig(checkpoint=tiny_checkpoint, engines=out, out=tmp_path / "parity",
                                     sizes=[(32, 32)], batches=[1], image_size=(64, 64), progress=False))
    assert report.passed, report.summary()
    assert report.data["loras"][0]["scale"] == 0.8 and report.data["steps"] == 4  # at the recipe's step count
    moved = tmp_path / "moved.safetensors"
    shutil.move(loras["kohya"], moved)
    try:
        with pytest.raises(InputError, match="missing or changed"):
            run_parity(ParityConfig(checkpoint=tiny_checkpoint, engines=out, out=tmp_path / "p2", steps=2,
                                    progress=False))
    finally:
        shutil.move(moved, loras["kohya"])


def json_manifest(folder):
    from qwen_image_trt.core.manifest import read_manifest

    return read_manifest(folder).model_dump()


def test_quantize_refuses_a_calibration_set_recorded_without_the_graphs_lora():
    from qwen_image_trt.compile.quantize import check_same_loras

    record = {"name": "style", "sha256": "ab" * 32, "scale": 0.8, "modules": 48}
    check_same_loras([record], [record], "calib", "graphs")
    with pytest.raises(InputError, match="same --lora"):
        check_same_loras(None, [record], "calib", "graphs")
    with pytest.raises(InputError, match="same --lora"):
        check_same_loras([dict(record, scale=1.0)], [record], "calib", "graphs")


def test_an_int8_build_of_a_merged_lora_quantizes_the_merged_model(tiny_checkpoint, loras, style_engines, tmp_path):
    """Calibration records with the adapter merged, and ModelOpt calibrates the merged transformer the graph holds:
    the quantized graph then agrees with ModelOpt's fake-quantized model (it did not when ModelOpt was given the
    checkpoint's own weights: the stage's self-check stopped the build)."""
    pytest.importorskip("modelopt", reason="quantization needs nvidia-modelopt")
    from qwen_image_trt.calibration.capture import calibrate
    from qwen_image_trt.compile.quantize import quantize_onnx

    out, exported = style_engines
    calib = tmp_path / "calib"
    cm = calibrate(tiny_checkpoint, calib, num_prompts=2, steps=2, progress=False, loras=[f"{loras['kohya']}:0.8"])
    assert cm.source["loras"][0]["sha256"] == exported.loras[0]["sha256"]
    m = quantize_onnx(tiny_checkpoint, calib, tmp_path / "int8", "int8", graphs=out, progress=False)
    assert m.loras == exported.loras and m.sampling == exported.sampling
    check = m.components["transformer"].check
    assert check["mismatch"] < 0.75, check  # the stage's own gate, passed with room


# -- command line ------------------------------------------------------------------------------------------
def test_generate_with_a_lora_on_engines_from_the_cli(tiny_checkpoint, tiny_engines, loras, tmp_path):
    def qitrt(*args):
        return subprocess.run([sys.executable, "-m", "qwen_image_trt.cli", *map(str, args)], capture_output=True,
                              text=True, timeout=300)

    made = qitrt("tiny-lora", tiny_checkpoint, tmp_path / "cli.safetensors", "--format", "lightning", "--rank", 2)
    assert made.returncode == 0, made.stderr
    bad_rank = qitrt("tiny-lora", tiny_checkpoint, tmp_path / "x.safetensors", "--rank", 99)
    assert bad_rank.returncode == 2 and "rank=99" in bad_rank.stderr and "Traceback" not in bad_rank.stderr
    png = tmp_path / "fox.png"
    r = qitrt("generate", tiny_checkpoint, "--engines", tiny_engines, "--prompt", "a red fox", "--steps", 2,
              "--lora", f"{tmp_path / 'cli.safetensors'}:0.5", "--out", png)
    assert r.returncode == 0, r.stderr
    assert png.stat().st_size > 0
    bad = qitrt("generate", tiny_checkpoint, "--engines", tiny_engines, "--prompt", "a red fox",
                "--lora", tmp_path / "absent.safetensors", "--out", tmp_path / "x.png")
    assert bad.returncode != 0 and "lora=" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "x.png").exists()


def test_sampling_recipes_are_checked_by_name(tmp_path):
    from qwen_image_trt.models.sampling import load_recipe

    assert load_recipe("lightning-8step").steps == 8
    with pytest.raises(InputError, match="steps=4 .*8: the step count lightning-8step is made for"):
        load_recipe("lightning-8step", steps=4)
    with pytest.raises(InputError, match="scheduler_config"):
        load_recipe("lightning-2step")
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"scheduler": {"base_shfit": 1.1}, "num_inference_steps": 6}))
    with pytest.raises(InputError, match="base_shfit"):
        load_recipe(typo)
    bare = tmp_path / "scheduler_config.json"
    bare.write_text(json.dumps({"shift": 3.0, "_class_name": "FlowMatchEulerDiscreteScheduler"}))
    with pytest.raises(InputError, match="--steps N"):
        load_recipe(bare)
    recipe = load_recipe(bare, steps=6)
    assert recipe.steps == 6 and recipe.scheduler == {"shift": 3.0}


def test_a_server_on_few_step_engines_defaults_to_their_steps(tiny_checkpoint, tiny_engines, tmp_path):
    from qwen_image_trt.models.sampling import load_recipe
    from qwen_image_trt.serve.app import create_app
    from qwen_image_trt.serve.config import ServerConfig

    engines = tmp_path / "engines"
    shutil.copytree(tiny_engines, engines)
    manifest = json.loads((engines / "manifest.json").read_text())
    manifest["sampling"] = load_recipe("lightning-8step").record()
    (engines / "manifest.json").write_text(json.dumps(manifest))
    cfg = ServerConfig(checkpoint=str(tiny_checkpoint), engines=str(engines))
    create_app(cfg)
    assert cfg.default_steps == 8
    chosen = ServerConfig(checkpoint=str(tiny_checkpoint), engines=str(engines), default_steps=6)
    create_app(chosen)
    assert chosen.default_steps == 6  # what the operator said wins
    plain = ServerConfig(checkpoint=str(tiny_checkpoint), engines=str(tiny_engines))
    create_app(plain)
    assert plain.default_steps == 20


def test_bf16_graphs_take_run_time_loras_by_name(tiny_engines_bf16, transformer_config, loras):
    """The real model's precision: bf16 weights are merged in fp32 and rounded once to bf16, and reach ONNX Runtime
    as bf16 initializers (its CPU provider has no bf16 kernels to run them: the TensorRT refit takes the same)."""
    from qwen_image_trt.runtime.backends.onnxruntime_runner import OnnxRuntimeRunner
    from qwen_image_trt.runtime.graph_weights import GraphLinears

    linears = GraphLinears(tiny_engines_bf16 / "transformer.onnx")
    ref = linears.locate("transformer_blocks.1.attn.to_k")
    base = linears.read(ref.weight)
    assert base.dtype.name == "bfloat16"
    delta = read_adapter(loras["peft"], transformer_config).modules["transformer_blocks.1.attn.to_k"].delta().numpy()
    merged = linears.merged(ref, delta)[ref.weight]
    assert merged.dtype.name == "bfloat16" and merged.shape == base.shape
    want = base.astype("float32") + (delta.T if ref.transposed else delta)
    assert abs(merged.astype("float32") - want).max() <= abs(want).max() * 2 ** -7  # one bf16 rounding
    runner = OnnxRuntimeRunner("transformer", tiny_engines_bf16 / "transformer.onnx")
    runner.set_weights({ref.weight: merged})
    assert runner._overrides[ref.weight].data_type() == "tensor(bfloat16)"
