"""Every diffusers QwenImage test that does not pass as is, and why. Filled from actual runs (docs/diffusers-tests.md).

`xfail` entries are strict and name the exception the test must fail with: the test still runs, so a reason that
stops being true (the test passes, or fails another way) fails the suite and this list must be updated.
`skip` entries are for tests that cannot run at all here.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch


@dataclass(frozen=True)
class Expect:
    pattern: str  # "module.py::Class::test", fnmatch wildcards allowed
    kind: str  # "xfail" or "skip"
    reason: str
    raises: type | tuple | None = None
    modes: tuple = ("engine",)


# The edit pipelines resize the condition image to ~1 megapixel before VAE-encoding it, whatever the dummy inputs'
# size. With the dummy VAE (x4: 1024 x 1024 px -> 256 x 256 latent tokens = 65,536) the exported encoder's mid-block
# attention (MatMul-Softmax-MatMul: ONNX Runtime's CPU provider has no fused kernel for it) holds two 65,536^2 fp32
# matrices, ~34 GB: measured 0.25 GB peak at 256^2 px and 2.4 GB at 512^2 px, quadratic. More than this machine's
# 23 GB (a first run was OOM-killed), so every edit test that runs the pipeline is skipped; eager torch uses a
# memory-efficient SDPA kernel. The real Qwen-Image VAE (x8) at 1 MP has 16,384 tokens, ~2 GB.
EDIT_MEMORY = ("the edit pipeline VAE-encodes its condition image at ~1 MP: with the dummy x4 VAE, 65,536 latent "
               "tokens, and the exported encoder's mid-block attention materializes two 65,536^2 fp32 matrices in "
               "ONNX Runtime on CPU (~34 GB; 2.4 GB measured at 512^2 px), beyond this 23 GB machine")
EDIT_PIPELINE_CALLS = ("test_inference*", "test_save_load_local", "test_output", "test_dict_tuple_outputs_equivalent",
                       "test_num_images_per_prompt", "test_cfg", "test_callback_*", "test_vae_tiling",
                       "test_encode_prompt_works_in_isolation", "test_true_cfg_without_negative_prompt_embeds_mask",
                       "test_qitrt_engine_matches_eager")

EXPECTED: list[Expect] = [
    *(Expect(f"test_qwenimage_edit*.py::*::{t}", "skip", EDIT_MEMORY) for t in EDIT_PIPELINE_CALLS),
    Expect("*::test_vae_tiling", "xfail",
           "EngineVAE decodes whole frames: enable_tiling is refused by name (runtime/vae.py); tiled decoding "
           "needs the eager VAE (load_pipeline(backend='torch'))", NotImplementedError),
    Expect("*::test_serialization_with_variants", "xfail",
           "a saved drop-in is config.json plus the engine record, no weight files (the engine folder holds the "
           "weights, runtime/saved.py): there is no *.fp16.* file for the variant check to find", AssertionError),
]


def lookup(mode: str, module: str, cls: str, test: str) -> Expect | None:
    key = f"{module}::{cls}::{test}"
    for expect in EXPECTED:
        if mode in expect.modes and fnmatch(key, expect.pattern):
            return expect
    return None
