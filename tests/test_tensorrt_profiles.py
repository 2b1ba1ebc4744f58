"""Optimization profiles and manifest limits: pure arithmetic over image sizes, real numbers."""

from __future__ import annotations

import pytest

from qwen_image_trt.compile import profiles as P
from qwen_image_trt.core.errors import InputError
from qwen_image_trt.runtime.limits import Limits, check_request


def test_parse_sizes():
    assert P.parse_sizes("1024x1024,1664x928") == [(1024, 1024), (1664, 928)]
    assert P.parse_sizes(" 1328X1328 , 1328x1328") == [(1328, 1328)]  # case, spaces, duplicates
    assert P.parse_sizes([(64, 32), "96x64"]) == [(64, 32), (96, 64)]


@pytest.mark.parametrize("bad", ["1000x1024", "1024", "1024x", "axb", "", "0x16", "1024x8192", "16x16x16", [], [(16, 17)]])
def test_parse_sizes_rejects(bad):
    with pytest.raises(InputError) as e:
        P.parse_sizes(bad)
    assert e.value.field == "sizes" and "multiple of 16" in e.value.allowed


def test_image_tokens_real_sizes():
    assert P.image_tokens(1024, 1024) == 4096
    assert P.image_tokens(1664, 928) == 6032  # 104 x 58
    assert P.image_tokens(1328, 1328) == 6889  # 83 x 83


def test_transformer_profile_cfg_doubles_batch():
    prof = P.transformer_profile("1024x1024,1664x928", max_batch=2, text_len_range=(1, 512))
    assert prof["hidden_states"] == ((1, 4096, 64), (2, 4096, 64), (4, 6032, 64))
    assert prof["encoder_hidden_states"] == ((1, 32, 3584), (2, 128, 3584), (4, 512, 3584))
    assert prof["encoder_hidden_states_mask"] == ((1, 32), (2, 128), (4, 512))
    assert prof["timestep"] == ((1,), (2,), (4,))
    assert prof["img_rope_cos"] == ((4096, 64), (4096, 64), (6032, 64))  # head_dim 128 / 2
    assert prof["txt_rope_sin"] == ((32, 64), (128, 64), (512, 64))
    assert set(prof) == {"hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep",
                         "img_rope_cos", "img_rope_sin", "txt_rope_cos", "txt_rope_sin"}


def test_transformer_profile_options():
    tiny = {"in_channels": 64, "joint_attention_dim": 64, "attention_head_dim": 32}
    prof = P.transformer_profile([(64, 64), (128, 96)], 3, text_len_range=(40, 300), opt_batch=2, cfg=False,
                                 config=tiny)
    assert prof["hidden_states"] == ((1, 16, 64), (2, 16, 64), (3, 48, 64))
    # text rounded up to the runtime's 32-token buckets: 40 -> 64, 300 -> 320; opt 128
    assert prof["encoder_hidden_states"] == ((1, 64, 64), (2, 128, 64), (3, 320, 64))
    assert prof["txt_rope_cos"][0] == (64, 16)
    small = P.transformer_profile("64x64", 1, text_len_range=(1, 20), text_bucket=16, config=tiny)
    assert small["encoder_hidden_states_mask"] == ((1, 16), (2, 32), (2, 32))  # opt clipped to max


@pytest.mark.parametrize("kw", [dict(max_batch=0), dict(max_batch=2, opt_batch=3), dict(max_batch=1, text_len_range=(10, 5)),
                                dict(max_batch=1, text_bucket=0)])
def test_transformer_profile_rejects(kw):
    with pytest.raises(InputError):
        P.transformer_profile("64x64", **kw)


def test_vae_profiles():
    dec = P.vae_decoder_profile("1024x1024,1664x928", max_batch=2)
    assert dec == {"latents": ((1, 16, 1, 116, 128), (1, 16, 1, 128, 128), (2, 16, 1, 128, 208))}
    enc = P.vae_encoder_profile("1664x928,928x1664", max_batch=1)
    assert enc == {"images": ((1, 3, 1, 928, 928), (1, 3, 1, 928, 1664), (1, 3, 1, 1664, 1664))}
    assert P.component_profile("vae_decoder", "64x32", 1, config={"z_dim": 16})["latents"][2] == (1, 16, 1, 4, 8)


def test_limits_from_sizes_feed_runtime_limits():
    limits = P.limits_from_sizes("1024x1024,1664x928", max_batch=2)
    assert limits == {"height": [928, 1024], "width": [1024, 1664], "batch": [1, 2], "image_tokens": [4096, 6032]}
    lim = Limits.from_json(limits)
    check_request("a cat", 1024, 1024, 20, lim, batch=2)
    with pytest.raises(InputError) as e:
        check_request("a cat", 1328, 1328, 20, lim)
    assert e.value.field == "height"
    with pytest.raises(InputError):
        check_request("a cat", 1024, 1024, 20, lim, batch=3)


def test_profile_json_round_trip_and_checks():
    prof = P.vae_decoder_profile("64x64", 2)
    assert P.profile_from_json(P.profile_to_json(prof)) == prof
    assert P.normalize_profile(P.profile_to_json(prof)) == prof
    with pytest.raises(InputError):
        P.normalize_profile({"x": ((2,), (1,), (3,))})  # min > opt
    P.check_shape_in_profile("latents", (2, 16, 1, 8, 8), prof)
    with pytest.raises(InputError) as e:
        P.check_shape_in_profile("latents", (3, 16, 1, 8, 8), prof)
    assert "qitrt build" in e.value.allowed



# Transformer inputs whose last dim is a static width (channels, text width, head_dim / 2) in the ONNX graph.
STATIC_LAST = {"hidden_states", "encoder_hidden_states", "img_rope_cos", "img_rope_sin", "txt_rope_cos", "txt_rope_sin"}


def test_transformer_profile_becomes_one_min_opt_max_per_dynamic_input():
    """What the builder hands TensorRT for the transformer: one optimization profile, one set_shape per input
    (recorded on stand-ins; no TensorRT here)."""
    import types

    from qwen_image_trt.compile.tensorrt_engine import configure_builder
    from qwen_image_trt.core.tensorrt import builder_settings

    tiny = {"in_channels": 64, "joint_attention_dim": 64, "attention_head_dim": 32}
    prof = P.transformer_profile("64x64,128x96", 2, text_len_range=(1, 64), config=tiny)

    def net_shape(name, mn):  # as the parsed network reports it: -1 for dynamic dims
        return tuple(d if name in STATIC_LAST and i == len(mn) - 1 else -1 for i, d in enumerate(mn))
    net_inputs = [types.SimpleNamespace(name=n, shape=net_shape(n, mn)) for n, (mn, _, _) in prof.items()]
    calls = []

    class Rec:
        def __init__(self, name):
            object.__setattr__(self, "name", name)

        def __getattr__(self, attr):
            return lambda *a, **k: calls.append((f"{self.name}.{attr}", a)) or Rec(attr)

        def __setattr__(self, attr, value):
            calls.append((f"{self.name}.{attr}=", value))

    network = types.SimpleNamespace(num_inputs=len(net_inputs), get_input=lambda i: net_inputs[i])
    trt = types.SimpleNamespace(BuilderFlag=types.SimpleNamespace(TF32="TF32"))
    _, resolved = configure_builder(trt, Rec("builder"), network, prof, builder_settings("bf16"))
    shapes = {a[0]: a[1:] for n, a in calls if n == "create_optimization_profile.set_shape"}
    assert shapes == prof == resolved and len(shapes) == 8
    assert [n for n, _ in calls].count("builder.create_optimization_profile") == 1
