"""The torch fast path (runtime.torch_fast): compile with bucketed text checked against eager on this CPU; FP8 and
CUDA graphs refused by name where the device cannot run them (their GPU run is benchmarks/gpu_check.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen_image_trt.core.errors import InputError
from qwen_image_trt.runtime.torch_fast import TorchOptions, check_torch_options, fp8_linear_names


def image(pipe, prompt: str) -> np.ndarray:
    return pipe(prompt=prompt, negative_prompt="blurry", true_cfg_scale=4.0, height=64, width=64,
                num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def _compiled(checkpoint, backend: str):
    from qwen_image_trt import load_pipeline

    return load_pipeline(checkpoint, backend="torch", torch_options={"compile": True, "compile_backend": backend})


def test_compiled_pipeline_equals_eager_and_compiles_once_per_text_bucket(tiny_checkpoint, eager_pipe):
    # aot_eager: dynamo's capture, the bucketing and recompile guards as in production, without inductor's C++
    # build (minutes on 2 cores; the inductor run is the slow test below and the GPU check).
    fast = _compiled(tiny_checkpoint, "aot_eager")
    short, longer = "a fox", "a red fox sitting in the snow at night"  # both under one 32-token bucket
    for prompt in (short, longer):
        np.testing.assert_allclose(image(fast, prompt), image(eager_pipe, prompt), atol=1e-5)
    assert fast.transformer.compiled_graphs == 1  # a second prompt length reused the first graph
    image(fast, "word " * 40)  # past the bucket: one more graph, and only one
    assert fast.transformer.compiled_graphs == 2


@pytest.mark.slow
def test_inductor_compile_equals_eager(tiny_checkpoint, eager_pipe):
    fast = _compiled(tiny_checkpoint, "inductor")
    np.testing.assert_allclose(image(fast, "a fox"), image(eager_pipe, "a fox"), atol=1e-5)
    assert fast.transformer.compiled_graphs == 1


def test_step_cache_wraps_a_compiled_forward_and_restores_it(tiny_checkpoint):
    fast = _compiled(tiny_checkpoint, "aot_eager")
    compiled = vars(fast.transformer)["forward"]
    fast(prompt="a fox", negative_prompt="blurry", height=64, width=64, num_inference_steps=6,
         generator=torch.Generator().manual_seed(0), step_cache=0.5)
    assert fast.step_cache_stats.skipped > 0
    assert vars(fast.transformer)["forward"] is compiled


@pytest.mark.parametrize("options,device,field,needs", [
    ({"fp8": True}, "cpu", "fp8", "compute capability >= 8.9"),
    ({"cuda_graphs": True}, "cpu", "cuda_graphs", "a CUDA device"),
    ({"text_bucket": 0}, "cpu", "text_bucket", ">= 1"),
])
def test_what_the_device_cannot_run_is_refused_by_name(options, device, field, needs):
    with pytest.raises(InputError) as e:
        check_torch_options(TorchOptions.parse(options), device)
    assert e.value.field == field and needs in str(e.value)


def test_fp8_needs_an_fp8_gpu_and_torchao():
    with pytest.raises(InputError, match="8.0"):  # an A100: no FP8 tensor cores
        check_torch_options(TorchOptions(fp8=True), "cuda:0", capability=(8, 0))
    try:
        import torchao  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match="torchao"):  # an H100 without torchao installed
            check_torch_options(TorchOptions(fp8=True), "cuda:0", capability=(9, 0))


def test_options_parse_and_refuse_unknown_keys_and_engine_backends(tiny_checkpoint, tiny_engines):
    from qwen_image_trt import load_pipeline

    assert TorchOptions.parse("compile, cuda-graphs") == TorchOptions(compile=True, cuda_graphs=True)
    with pytest.raises(InputError, match="torch_options"):
        TorchOptions.parse({"compiel": True})
    with pytest.raises(InputError, match="backend torch"):
        load_pipeline(tiny_checkpoint, tiny_engines, backend="onnxruntime", torch_options="compile")


def test_fp8_converts_the_linears_the_fp8_build_quantizes(eager_pipe):
    from qwen_image_trt.compile.recipe import default_recipe, is_excluded

    transformer = eager_pipe.transformer
    blocks = len(transformer.transformer_blocks)
    names = fp8_linear_names(transformer)
    recipe = default_recipe("fp8", blocks)
    assert names and all(not is_excluded(n, recipe) for n in names)
    assert all(n.startswith("transformer_blocks.") and 2 <= int(n.split(".")[1]) < blocks - 2 for n in names)
    assert any(n.endswith("img_mlp.net.2") for n in names) and not any(n.startswith("img_in") for n in names)
    quantized = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and not is_excluded(n, recipe)]
    assert names == quantized  # the runtime's restated exclusions are the build recipe's


def test_server_refuses_a_fast_path_its_devices_cannot_run(tiny_checkpoint):
    from qwen_image_trt.serve.config import ServerConfig

    with pytest.raises(InputError) as e:
        ServerConfig(checkpoint=str(tiny_checkpoint), torch_fast="fp8")
    assert e.value.field == "fp8"
    assert ServerConfig(checkpoint=str(tiny_checkpoint), torch_fast="compile").torch_options().compile
