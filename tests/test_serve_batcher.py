"""Dynamic batcher on its own: grouping, size and delay triggers, priorities, queue limit, re-queueing."""

from __future__ import annotations

import asyncio
import time

import pytest

from qwen_image_trt.core.errors import InputError
from qwen_image_trt.runtime.limits import Limits
from qwen_image_trt.serve.batcher import Batcher, Item, QueueFull
from qwen_image_trt.serve.config import ServerConfig
from qwen_image_trt.serve.protocol import ImageRequest, check_params

A, B = (64, 64, 2, False), (64, 64, 2, True)


def batcher(max_images=4, delay=0.05, size=8):
    return Batcher(lambda key: max_images, delay, size)


def test_full_group_goes_at_once_and_groups_stay_apart():
    b = batcher()
    items = [Item(A if i % 2 else B, 1) for i in range(8)]
    for it in items:
        b.submit(it)
    first, _ = b.ready_batch()
    assert [it.key for it in first] == [B] * 4  # the oldest request (B) picks the group
    second, _ = b.ready_batch()
    assert [it.key for it in second] == [A] * 4
    assert len(b) == 0


def test_partial_group_waits_for_the_delay_then_goes():
    b = batcher(delay=0.05)
    b.submit(Item(A, 1))
    b.submit(Item(A, 2))
    batch, wait = b.ready_batch()
    assert batch is None and 0 < wait <= 0.05
    batch, _ = b.ready_batch(now=time.monotonic() + 0.06)
    assert [it.images for it in batch] == [1, 2]


def test_images_not_requests_fill_a_batch():
    b = batcher(max_images=4, delay=10)
    for n in (3, 2, 1):
        b.submit(Item(A, n))
    batch, _ = b.ready_batch()
    assert [it.images for it in batch] == [3, 1]  # 3 + 2 would overflow; the 1 fits
    assert len(b) == 1


def test_priority_orders_dispatch_and_positions():
    b = batcher(max_images=1, delay=0)
    low, high = Item(A, 1, priority=2), Item(B, 1, priority=0)
    b.submit(low)
    b.submit(high)
    assert b.position(high) == 0 and b.position(low) == 1
    assert b.ready_batch()[0] == [high]
    assert b.ready_batch()[0] == [low]
    assert b.position(low) is None


def test_queue_limit_and_forced_requeue():
    b = batcher(size=2)
    b.submit(Item(A, 1))
    b.submit(Item(A, 1))
    with pytest.raises(QueueFull):
        b.submit(Item(A, 1))
    old = Item(A, 1, arrival=time.monotonic() - 100)
    b.submit(old, force=True)  # re-queued work keeps its place and is never refused
    assert b.position(old) == 0 and len(b) == 3
    assert b.remove(old) and not b.remove(old)


def test_next_batch_wakes_on_submit_and_on_delay():
    async def main():
        # A delay far above scheduling noise, so the bounds hold on a loaded 2-core CI machine.
        b = batcher(max_images=2, delay=0.5)
        task = asyncio.create_task(b.next_batch())
        await asyncio.sleep(0.01)
        assert not task.done()  # never returns an empty batch
        b.submit(Item(A, 1))
        t0 = time.monotonic()
        batch = await asyncio.wait_for(task, 5)
        assert len(batch) == 1 and 0.4 < time.monotonic() - t0 < 5  # a lone request waits out the delay
        b.submit(Item(A, 1))
        b.submit(Item(A, 1))
        t0 = time.monotonic()
        assert len(await b.next_batch()) == 2 and time.monotonic() - t0 < 0.3  # a full batch goes at once

    asyncio.run(main())


def test_check_params_names_field_and_allowed_values():
    cfg = ServerConfig(checkpoint="x", max_n=4, max_steps=50, default_size="64x64")

    def check(**kw):
        return check_params(ImageRequest(prompt="a cat", **kw), cfg, Limits(height=(16, 256), width=(16, 256)),
                            lambda cfg_on: 8)

    p = check(size="64x32", n=2, seed=5, negative_prompt=" ", num_inference_steps=3)
    assert (p.width, p.height, p.n, p.seed, p.cfg) == (64, 32, 2, 5, True)
    # size, steps, CFG, member, strength, image group, adapter set, step-cache threshold, ControlNet scale
    assert p.key == (64, 32, 3, True, "text-to-image", None, "", (), None, None)
    assert check(size="64x32", step_cache=0.2).key[-2] == 0.2  # another threshold: another batch group
    for kw, field in [({"size": "64"}, "size"), ({"size": "65x64"}, "size"), ({"size": "512x64"}, "size"),
                      ({"n": 0}, "n"), ({"n": 5}, "n"), ({"num_inference_steps": 51}, "num_inference_steps"),
                      ({"priority": 3}, "priority"), ({"timeout": 0.0}, "timeout"), ({"seed": -1}, "seed")]:
        with pytest.raises(InputError) as e:
            check(**kw)
        assert e.value.field == field and e.value.allowed


def test_engine_profile_limits_requests_and_batches():
    from qwen_image_trt.serve.engine import Engine

    # an engine profile for 1..2 images per call and at most 64 image tokens (e.g. 128x128)
    limits = Limits(height=(16, 256), width=(16, 256), batch=(1, 2), image_tokens=(1, 64))
    cfg = ServerConfig(checkpoint="x", engines="e")
    assert Engine(cfg, limits).max_images(True) == 2  # the profile counts images: not halved again for CFG
    assert Engine(cfg, Limits()).max_images(True) == 8  # no profile in the folder: the default
    assert Engine(ServerConfig(checkpoint="x", max_batch_size=16), limits).max_images(False) == 2
    with pytest.raises(InputError) as e:  # each side in range, but more tokens than the profile holds
        check_params(ImageRequest(prompt="a cat", size="256x128"), cfg, limits, lambda cfg_on: 2)
    assert e.value.field == "size" and "[1, 64]" in e.value.allowed


def test_take_where_removes_only_what_it_picks():
    b = Batcher(lambda key: 4, 0.01, 10)
    items = [Item("k", 1, payload={"job": i % 2 == 0}) for i in range(5)]
    for it in items:
        b.submit(it)
    taken = b.take_where(lambda it: it.payload["job"])
    assert taken == [items[0], items[2], items[4]] and len(b) == 2
    assert b.position(items[1]) == 0 and b.position(items[0]) is None


def test_edit_requests_group_by_the_sizes_their_condition_images_resize_to():
    """Edit requests co-batch when the pipelines resize their condition images to the same sizes (equal grids and
    image tokens): grouping by aspect ratio, not by bytes or by size as sent."""
    import io

    from PIL import Image

    from qwen_image_trt.serve.protocol import condition_layout

    def png(w, h):
        buf = io.BytesIO()
        Image.new("RGB", (w, h)).save(buf, format="PNG")
        return buf.getvalue()

    two = condition_layout([png(80, 48), png(64, 96)])
    assert two == "1312x800,832x1248"  # diffusers' calculate_dimensions at 1024^2
    assert condition_layout([png(160, 96), png(640, 960)]) == two  # same aspect ratios: same group
    assert condition_layout([png(64, 96), png(80, 48)]) != two  # the order is the layout
    assert condition_layout([png(80, 48)]) != two
