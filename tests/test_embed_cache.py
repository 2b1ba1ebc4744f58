"""Prompt-embedding cache (runtime.embed_cache): the text encoder runs once per distinct prompt; results unchanged."""

from __future__ import annotations

import pytest
import torch

from qwen_image_trt.core.errors import InputError
from qwen_image_trt.runtime.embed_cache import EmbeddingCache, cache_prompt_embeddings


@pytest.fixture()
def cached_pipe(tiny_checkpoint):
    from qwen_image_trt import load_pipeline

    return load_pipeline(tiny_checkpoint, backend="torch", embedding_cache_bytes=1 << 20)


def encoder_calls(pipe) -> list:
    calls = []
    forward = pipe.text_encoder.forward

    def counted(*a, **kw):
        calls.append(kw["input_ids"].shape[0])
        return forward(*a, **kw)

    pipe.text_encoder.forward = counted
    return calls


def run(pipe, prompt, negative="blurry"):
    return pipe(prompt=prompt, negative_prompt=negative, true_cfg_scale=4.0, height=64, width=64,
                num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def test_repeated_prompts_skip_the_encoder_and_images_are_unchanged(cached_pipe, eager_pipe):
    calls = encoder_calls(cached_pipe)
    first = run(cached_pipe, "a red fox")
    assert len(calls) == 2  # prompt and negative, each encoded once
    second = run(cached_pipe, "a red fox")
    assert len(calls) == 2 and cached_pipe.embedding_cache.stats.hits == 2
    assert (first == second).all() and (first == run(eager_pipe, "a red fox")).all()  # bit for bit
    run(cached_pipe, ["a blue fox", "a red fox"], negative=["blurry", "blurry"])
    assert calls[-1] == 1  # only the new prompt went to the encoder


def test_a_mixed_batch_equals_the_stock_encoding(cached_pipe, eager_pipe):
    prompts = ["a cat", "a much longer prompt about a cat on a window sill", "a cat"]
    cached_pipe.encode_prompt(prompts[:1], device="cpu")  # one of them already cached
    got, got_mask = cached_pipe._get_qwen_prompt_embeds(prompts, device="cpu")
    want, want_mask = eager_pipe._get_qwen_prompt_embeds(prompts, device="cpu")
    assert torch.equal(got_mask, want_mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # batched vs alone: float rounding only


def test_lru_bounded_by_bytes_with_pinned_negatives():
    cache = EmbeddingCache(max_bytes=3 * 400)  # three 100-float embeddings
    value = torch.zeros(100)
    for p in ("", "a", "b", "c"):
        cache.put(("id", p), value.clone())
    assert cache.bytes <= 1200 and len(cache) == 3
    assert cache.get(("id", "")) is not None  # pinned: the default negative prompt is never evicted
    assert cache.get(("id", "a")) is None and cache.stats.evictions == 1  # the least recently used went
    cache.put(("id", "huge"), torch.zeros(10_000))  # larger than the whole cache: not kept, nothing evicted
    assert len(cache) == 3 and cache.stats.evictions == 1


def test_another_encoder_never_hits_and_bad_sizes_are_refused(cached_pipe):
    cache = cached_pipe.embedding_cache
    cached_pipe.encode_prompt(["a dog"], device="cpu")
    misses = cache.stats.misses
    cached_pipe.encoder_identity = "another-encoder"
    cache_prompt_embeddings(cached_pipe, cache)  # re-wrapped: keys now carry the other identity
    cached_pipe.encode_prompt(["a dog"], device="cpu")
    assert cache.stats.misses == misses + 1
    with pytest.raises(InputError, match="embedding_cache_bytes"):
        EmbeddingCache(-1)


def test_edit_pipelines_are_left_uncached(tiny_edit_2511):
    from qwen_image_trt import load_pipeline

    checkpoint, _ = tiny_edit_2511
    pipe = load_pipeline(checkpoint, backend="torch", embedding_cache_bytes=1 << 20)
    assert "_get_qwen_prompt_embeds" not in vars(pipe)  # its embeddings depend on the input images
