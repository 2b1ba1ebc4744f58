"""Dynamic batcher: a bounded priority queue that hands out groups of requests able to share one forward.

A batch holds requests with one key (size, steps, CFG on/off) and goes when its images reach the group's maximum
or its oldest request has waited `max_delay_s` (Triton's max_queue_delay, Ray Serve's batch_wait_timeout). The
most urgent request (lowest priority value, then oldest) picks which group goes first; the batch is then filled
with that group's requests in the same order. Pure asyncio, no model: unit-tested on its own.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    def __init__(self, size: int):
        self.size = size
        super().__init__(f"the queue holds {size} requests, its limit")


@dataclass(eq=False)
class Item:
    """A queued request as the batcher sees it; `payload` is the engine's own object."""

    key: Any
    images: int
    priority: int = 1
    payload: Any = None
    arrival: float = field(default_factory=time.monotonic)
    seq: int = 0

    def order(self) -> tuple:
        return (self.priority, self.arrival, self.seq)


class Batcher:
    def __init__(self, max_images: Callable[[Any], int], max_delay_s: float, max_queue_size: int):
        self.max_images, self.max_delay_s, self.max_queue_size = max_images, max_delay_s, max_queue_size
        self._items: list[Item] = []
        self._changed = asyncio.Event()
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._items)

    def submit(self, item: Item, force: bool = False) -> None:
        """Queue `item`; QueueFull when the queue is at its limit (`force` skips the check: re-queued work)."""
        if not force and len(self._items) >= self.max_queue_size:
            raise QueueFull(len(self._items))
        item.seq = next(self._seq)
        self._items.append(item)
        self._changed.set()

    def remove(self, item: Item) -> bool:
        try:
            self._items.remove(item)
            return True
        except ValueError:
            return False

    def take_where(self, keep_out: Callable[[Item], bool]) -> list[Item]:
        """Remove and return the queued items `keep_out` picks (a drain holds back async jobs)."""
        taken = [it for it in self._items if keep_out(it)]
        self._items = [it for it in self._items if not keep_out(it)]
        return taken

    def drain(self) -> list[Item]:
        """Remove and return everything queued (shutdown, or no worker left)."""
        items, self._items = self._items, []
        return items

    def position(self, item: Item) -> int | None:
        """0-based place in dispatch order among all queued requests; None when not queued."""
        if item not in self._items:
            return None
        return sum(other.order() < item.order() for other in self._items)

    def ready_batch(self, now: float | None = None) -> tuple[list[Item] | None, float | None]:
        """(batch to send now, None) or (None, seconds until the next batch could be due; None when empty)."""
        now = time.monotonic() if now is None else now
        groups: dict[Any, list[Item]] = {}
        for it in sorted(self._items, key=Item.order):
            groups.setdefault(it.key, []).append(it)
        wait = None
        for key, members in sorted(groups.items(), key=lambda kv: kv[1][0].order()):
            cap = max(1, self.max_images(key))
            due = min(m.arrival for m in members) + self.max_delay_s
            if sum(m.images for m in members) >= cap or due <= now:
                return self._take(members, cap), None
            wait = due - now if wait is None else min(wait, due - now)
        return None, wait

    def _take(self, members: list[Item], cap: int) -> list[Item]:
        batch, used = [], 0
        for m in members:
            if used + m.images <= cap or not batch:
                batch.append(m)
                used += m.images
        for m in batch:
            self._items.remove(m)
        return batch

    async def next_batch(self) -> list[Item]:
        """Wait until a batch is due and return it (never empty)."""
        while True:
            batch, wait = self.ready_batch()
            if batch:
                return batch
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), wait)
            except asyncio.TimeoutError:
                pass
