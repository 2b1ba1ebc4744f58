"""Quantization evidence (core/quant_evidence.py) in exact numbers: the figures on tensors whose answers are known,
the verdict at its bounds, the evidence file round trip, and block bypass on a real (tiny, random) Qwen-Image
transformer. Fast: no checkpoint, no export."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qwen_image_trt.core import quant_evidence as qe
from qwen_image_trt.core.metrics import l2, tensor_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_quantized_blocks_are_the_blocks_of_quantized_layers():
    names = ["transformer_blocks.3.attn.to_q", "transformer_blocks.10.img_mlp.net.0.proj", "proj_out",
             "transformer_blocks.3.img_mod.1", "x.transformer_blocks.5.attn.to_k", "transformer_blocks.7"]
    assert qe.quantized_blocks(names) == [3, 10]
    assert qe.quantized_blocks([]) == [] and qe.quantized_blocks(iter(["transformer_blocks.2.a"])) == [2]


def _call(hp, fq, by):
    return {"high_precision": torch.tensor(hp), "fake_quant": torch.tensor(fq), "bypassed": torch.tensor(by)}


def test_compare_figures_on_known_tensors():
    hp, fq, by = [3.0, 4.0], [3.0, 4.5], [0.0, 0.0]  # ||fq - hp|| = 0.5, ||hp - by|| = 5, ||hp|| = 5
    got = np.array([3.0, 4.25])  # halfway between the simulation and high precision
    f = qe.compare([got], [_call(hp, fq, by)])
    assert f["mismatch"] == pytest.approx(0.25 / 0.5)
    assert f["block_rel_err"] == pytest.approx(0.25 / 5)
    assert f["fake_quant_block_rel_err"] == pytest.approx(0.5 / 5)
    assert f["block_contribution"] == pytest.approx(5 / 5)
    assert f["cosine_vs_fake_quant"] == pytest.approx(tensor_metrics(torch.tensor(fq), got)["cosine"])
    assert f["cosine_vs_high_precision"] == pytest.approx(tensor_metrics(torch.tensor(hp), got)["cosine"])
    assert f["cosine_vs_high_precision"] != f["cosine_vs_fake_quant"]
    assert f["finite"] is True and f["calls"] == 1
    assert sorted(f) == ["block_contribution", "block_rel_err", "calls", "cosine_vs_fake_quant",
                         "cosine_vs_high_precision", "fake_quant_block_rel_err", "finite", "mismatch"]


def test_compare_keeps_the_worst_call():
    calls = [_call([3.0, 4.0], [3.0, 4.5], [0.0, 0.0]), _call([1.0, 0.0], [1.0, 0.1], [1.0, -2.0])]
    outputs = [torch.tensor([3.0, 4.5]), torch.tensor([0.0, 1.0])]
    f = qe.compare(outputs, calls)
    rows = [qe.compare([o], [c]) for o, c in zip(outputs, calls)]
    for key in ("mismatch", "block_rel_err", "fake_quant_block_rel_err", "block_contribution"):
        assert f[key] == max(r[key] for r in rows) and f[key] != min(r[key] for r in rows), key
    for key in ("cosine_vs_fake_quant", "cosine_vs_high_precision"):
        assert f[key] == min(r[key] for r in rows) and f[key] != max(r[key] for r in rows), key
    assert f["mismatch"] == pytest.approx(math.sqrt(1 + 0.81) / 0.1) and f["calls"] == 2
    nan = qe.compare([torch.tensor([3.0, 4.5]), torch.tensor([float("nan"), 0.0])], calls)
    assert nan["finite"] is False and qe.compare(outputs[:1], calls)["calls"] == 1


def test_compare_measures_against_the_bypassed_output():
    hp, fq, by = [0.3, 0.4], [0.3, 0.45], [0.1, 0.1]  # norms below 1: no floor but the 1e-30 guard may show
    got = torch.tensor([0.3, 0.425])
    f = qe.compare([got], [_call(hp, fq, by)])
    contribution = math.hypot(0.2, 0.3)  # ||hp - by||
    assert f["block_rel_err"] == pytest.approx(0.025 / contribution)
    assert f["fake_quant_block_rel_err"] == pytest.approx(0.05 / contribution)
    assert f["block_contribution"] == pytest.approx(contribution / 0.5)
    assert f["mismatch"] == pytest.approx(0.025 / 0.05)


def test_compare_with_zero_denominators_stays_finite():
    z = [0.0, 0.0]
    f = qe.compare([torch.tensor([0.0, 1e-20])], [_call(z, z, z)])  # nothing quantized, nothing contributed
    assert f["mismatch"] == pytest.approx(1e-20 / 1e-30) and f["block_rel_err"] == pytest.approx(1e-20 / 1e-30)
    assert f["fake_quant_block_rel_err"] == 0.0 and f["block_contribution"] == 0.0
    assert all(math.isfinite(v) for k, v in f.items() if k not in ("finite", "calls") and "cosine" not in k)


def test_compare_takes_numpy_outputs_of_any_float_type():
    call = _call([3.0, 4.0], [3.0, 4.5], [0.0, 0.0])
    assert qe.compare([np.array([3.0, 4.5], np.float16)], [call])["mismatch"] == 0.0


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_verdict_at_its_bound(precision):
    bound = qe.MISMATCH_MAX[precision]
    assert qe.MISMATCH_MAX == {"int8": 0.75, "fp8": 0.25}
    assert qe.verdict({"mismatch": bound, "finite": True}, precision) is None  # the bound itself passes
    assert qe.verdict({"mismatch": 0.0}, precision) is None  # no finiteness figure: assumed finite
    over = bound + 0.01
    assert qe.verdict({"mismatch": over, "finite": True}, precision) == (
        f"the quantized graph disagrees with ModelOpt's fake-quantized model by {over:.2f}x the quantization error "
        f"itself (allowed {bound}): a Q/DQ scale, zero point, smoothing factor or weight layout in the graph is not "
        "the one ModelOpt calibrated")
    assert qe.verdict({"mismatch": 0.0, "finite": False}, precision) == \
        "the quantized graph's output has non-finite values"
    assert qe.verdict({"mismatch": 99.0, "finite": False}, precision) == \
        "the quantized graph's output has non-finite values"
    with pytest.raises(KeyError):
        qe.verdict({"mismatch": 0.0}, "int4")


NAMES = ["hidden_states", "encoder_hidden_states"]


def _evidence(tmp_path, numbers=None, calls=2):
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(4, 3, generator=g)
    inputs = [(shared[:2], torch.randn(1, 5, generator=g) + i) for i in range(calls)]  # a view of a shared table
    outs = {k: [torch.randn(2, 2, generator=g) for _ in range(calls)] for k in ("hp", "fq", "by")}
    path = qe.save(tmp_path, inputs, outs["hp"], outs["fq"], outs["by"], NAMES, numbers=numbers)
    return path, inputs, outs


def test_evidence_round_trip(tmp_path):
    numbers = {"transformer_blocks.2.attn.to_q": {"input_scale": np.float32(0.5), "weight_scale": np.arange(3.0),
                                                  "pre_quant_scale": np.array([1.0, 2.0])},
               "transformer_blocks.2.img_mod.1": {"input_scale": 0.25, "weight_scale": np.float32(2.0),
                                                  "pre_quant_scale": None}}
    path, inputs, outs = _evidence(tmp_path, numbers, calls=11)  # more than 10 calls: "10" sorts before "2"
    assert path == tmp_path / qe.EVIDENCE_FILE and qe.EVIDENCE_FILE == "quantization_evidence.safetensors"
    calls = qe.load(path, NAMES)
    assert len(calls) == 11
    for i, c in enumerate(calls):
        assert sorted(c) == ["bypassed", "fake_quant", "high_precision", "inputs"]
        assert list(c["inputs"]) == NAMES
        for name, want in zip(NAMES, inputs[i]):
            assert torch.equal(c["inputs"][name], want)
        for key, k in (("high_precision", "hp"), ("fake_quant", "fq"), ("bypassed", "by")):
            assert torch.equal(c[key], outs[k][i])
    loaded = qe.load_numbers(path)
    assert sorted(loaded) == sorted(numbers)
    q = loaded["transformer_blocks.2.attn.to_q"]
    assert q["input_scale"].shape == () and float(q["input_scale"]) == 0.5
    np.testing.assert_array_equal(q["weight_scale"], [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(q["pre_quant_scale"], [1.0, 2.0])
    assert all(v.dtype == np.float32 for v in q.values())
    m = loaded["transformer_blocks.2.img_mod.1"]
    assert m["pre_quant_scale"] is None and m["input_scale"].shape == () and float(m["input_scale"]) == 0.25
    assert m["weight_scale"].shape == (1,) and float(m["weight_scale"][0]) == 2.0  # per tensor: one value


def test_evidence_without_numbers(tmp_path):
    path, _, _ = _evidence(tmp_path, None, calls=1)
    assert qe.load_numbers(path) == {} and len(qe.load(path, NAMES)) == 1


def test_reference_outputs_bypass_blocks_and_restore_them():
    from diffusers import QwenImageTransformer2DModel

    from qwen_image_trt.models.tiny import TRANSFORMER_CONFIG
    from qwen_image_trt.models.transformer_export import ExportableTransformer, sample_inputs

    torch.manual_seed(0)
    config = {**TRANSFORMER_CONFIG, "num_layers": 2}
    module = ExportableTransformer(QwenImageTransformer2DModel(**config).eval())
    module.skip_blocks = frozenset({7})  # whatever was set before is put back
    args = sample_inputs(config, batch=1, grid=(2, 2), text_len=4)
    full, = qe.reference_outputs(module, [args])
    assert module.skip_blocks == frozenset({7})
    one, none = (qe.reference_outputs(module, [args], skip_blocks=s)[0] for s in ([1], (0, 1)))
    assert full.dtype == torch.float32 and full.device.type == "cpu" and not full.requires_grad
    assert not torch.equal(full, one) and not torch.equal(one, none) and not torch.equal(full, none)
    module.skip_blocks = frozenset({1})
    with torch.no_grad():
        assert torch.equal(module(*args).float(), one)
    module.skip_blocks = frozenset()
    with torch.no_grad():
        assert torch.equal(module(*args).float(), full)
    both = qe.reference_outputs(module, [args, args], skip_blocks=[1])
    assert len(both) == 2 and torch.equal(both[0], one) and torch.equal(both[1], one)

    class Fails(torch.nn.Module):  # skip_blocks is restored even when a forward fails
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.skip_blocks = frozenset({3})

        def forward(self, x):
            raise RuntimeError("boom")

    bad = Fails()
    with pytest.raises(RuntimeError, match="boom"):
        qe.reference_outputs(bad, [(torch.zeros(1),)], skip_blocks=[1])
    assert bad.skip_blocks == frozenset({3})


def test_l2_and_tensor_metrics_in_exact_numbers():
    assert l2([3.0, 4.0]) == 5.0 and l2([3.0, 4.0], [0.0, 1.0]) == pytest.approx(math.sqrt(18))
    assert l2(np.array([1.0, 1.0], np.float16), [1.0, 1.0]) == 0.0
    assert isinstance(l2(torch.ones(2)), float)
    m = tensor_metrics([3.0, 4.0], [3.0, 5.0])
    assert m == {"max_abs": 1.0, "rel_l2": pytest.approx(1 / 5), "cosine": pytest.approx((9 + 20) / (5 * math.sqrt(34))),
                 "finite": True}
    m = tensor_metrics(torch.tensor([[1.0, -2.0]]), torch.tensor([[1.0, -4.5]]))  # flattened, any shape
    assert m["max_abs"] == 2.5 and m["rel_l2"] == pytest.approx(2.5 / math.sqrt(5))
    assert tensor_metrics([0.0, 0.0], [0.0, 1e-40])["rel_l2"] == pytest.approx(1e-40 / 1e-30)
    assert tensor_metrics([1.0, 2.0], [float("inf"), 2.0])["finite"] is False
    half = tensor_metrics(torch.tensor([1.0, 2.0], dtype=torch.float16), torch.tensor([1.0, 2.001]))
    assert half["max_abs"] == pytest.approx(0.001, rel=1e-3)  # compared in float64, not in the inputs' type


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reference_outputs_of_a_gpu_module_come_back_to_the_cpu():
    lin = torch.nn.Linear(3, 2)
    lin.skip_blocks = frozenset()
    want = qe.reference_outputs(lin, [(torch.ones(4, 3),)])[0]
    got = qe.reference_outputs(lin.cuda(), [(torch.ones(4, 3),)])[0]  # inputs on the CPU, module on the GPU
    assert got.device.type == "cpu" and torch.allclose(got, want, atol=1e-5)
