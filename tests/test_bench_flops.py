"""FLOP/byte model (hand-computed numbers, the real module's parameters and torch's FLOP counter) and the peak table."""

from __future__ import annotations

import pytest

from qwen_image_trt.bench import devices
from qwen_image_trt.models import flops

# dim 4 (1 head x 4), 1 layer, 8 latent channels in, text width 6, 8 features out (2x2 patches x 2 channels)
HAND = dict(num_attention_heads=1, attention_head_dim=4, num_layers=1, in_channels=8, out_channels=2,
            joint_attention_dim=6, patch_size=2)
REAL = dict(num_attention_heads=24, attention_head_dim=128, num_layers=60, in_channels=64, out_channels=16,
            joint_attention_dim=3584, patch_size=2)


def test_hand_computed_forward():
    # 2 image tokens, 3 text tokens, batch 1. Multiply-adds of the linear layers:
    #   img_in 2*8*4=64, txt_in 3*6*4=72, timestep MLP 256*4 + 4*4 = 1040,
    #   block: modulation 2*4*24=192, image qkvo 4*2*16=128, text qkvo 4*3*16=192,
    #          image MLP 2*(4*16+16*4)=256, text MLP 3*128=384 -> 1152,
    #   norm_out 4*8=32, proj_out 2*4*8=64  => 2424 MACs = 4848 FLOP
    # attention: 4 * N^2 * D = 4 * 25 * 4 = 400
    c = flops.forward_cost(HAND, image_tokens=2, text_tokens=3, batch=1, precision="fp32")
    assert c.linear_flops == 4848
    assert c.attention_flops == 400
    assert c.flops == 5248
    # params: embedders 36+28+6+1028+20=1118, block 240+160+16+296=712, head 40+40=80
    assert c.params == 1910
    assert c.weight_bytes == 1910 * 4
    assert flops.forward_cost(HAND, 2, 3, batch=3).flops == 3 * 5248  # everything scales with the batch


def test_cfg_doubles_the_forward():
    one = flops.per_step(REAL, 1024, 1024, text_tokens=64, batch=1, cfg=False)
    two = flops.per_step(REAL, 1024, 1024, text_tokens=64, batch=1, cfg=True)
    assert two.batch == 2 and two.flops == pytest.approx(2 * one.flops)
    assert two.weight_bytes == one.weight_bytes  # weights are read once per forward whatever the batch


def test_real_model_matches_the_notes():
    assert flops.image_tokens_for(1024, 1024) == 4096
    c = flops.forward_cost(REAL, 4096, 64, batch=1, precision="bf16")
    assert 6.5e13 < c.flops < 7.5e13  # NOTES: ~7e13 FLOP per forward at 1024x1024
    assert c.linear_flops / (4096 + 64) == pytest.approx(13.6e9, rel=0.01)  # ~13.6 GFLOP per token
    assert 20.0e9 < c.params < 21.0e9  # "20B MMDiT"
    assert c.weight_bytes == pytest.approx(2 * c.params)
    assert c.intensity > 500  # compute-bound on every GPU in the table
    h100 = devices.PEAKS["H100 SXM"]
    floor = 2 * c.floor_seconds(h100.peak_flops("bf16"), h100.bytes_per_s)  # one step with CFG
    assert 0.1 < floor < 0.2  # NOTES: ~0.18 s/step at ~790 TFLOP/s (this uses the 989 TFLOP/s datasheet peak)
    assert flops.forward_cost(REAL, 4096, 64, precision="fp8").weight_bytes == pytest.approx(c.params)


def test_model_agrees_with_the_real_module_and_torch_flop_counter(tiny_checkpoint):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from qwen_image_trt.models import checkpoint as ckpt

    config = ckpt.read_config(tiny_checkpoint, "transformer")
    model = ckpt.load_transformer(tiny_checkpoint)
    assert flops.param_count(flops.TransformerShape.from_config(config)) == sum(p.numel() for p in model.parameters())
    b, grid, text = 2, (1, 4, 4), 7
    x, e = torch.randn(b, 16, config["in_channels"]), torch.randn(b, text, config["joint_attention_dim"])
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(hidden_states=x, encoder_hidden_states=e, encoder_hidden_states_mask=None,
              timestep=torch.full((b,), 0.5), img_shapes=[[grid]] * b, return_dict=False)
    assert counter.get_total_flops() == flops.forward_cost(config, 16, text, b).flops


def test_bad_precision():
    with pytest.raises(ValueError, match="precision"):
        flops.forward_cost(HAND, 2, 3, precision="fp4")


@pytest.mark.parametrize("name,key", [("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"),
                                      ("NVIDIA H100 NVL", "H100 NVL"), ("NVIDIA H200", "H200"),
                                      ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB"),
                                      ("NVIDIA A100 80GB PCIe", "A100 PCIe 80GB"),
                                      ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
                                      ("NVIDIA L40S", "L40S"), ("NVIDIA GeForce RTX 4090", "RTX 4090")])
def test_gpu_names(name, key):
    assert devices.lookup_peak(name) is devices.PEAKS[key]


def test_peak_table_and_cpu():
    for peak in devices.PEAKS.values():
        assert peak.peak_flops("bf16") > 1e14 and peak.bytes_per_s > 5e11
        assert peak.peak_flops("fp16") == peak.peak_flops("bf16")
        assert peak.peak_flops("int8") >= peak.peak_flops("bf16")
    assert devices.lookup_peak("Tesla T4") is None
    peak, note = devices.peak_for("cpu")
    assert peak is None and note == "no peak known: CPU"
    assert devices.roofline_fraction(1e9, None, "fp32", "cpu") == "n/a (CPU)"
    assert devices.roofline_fraction(494.7e12, devices.PEAKS["H100 SXM"], "bf16", "cuda") == pytest.approx(0.5)
    assert devices.roofline_fraction(1e12, devices.PEAKS["A100 40GB"], "fp8", "cuda").startswith("n/a")
    info = devices.machine_info("cpu")
    assert info["peak"] is None and info["versions"]["torch"]
