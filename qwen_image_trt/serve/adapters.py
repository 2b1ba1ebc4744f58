"""Per-request LoRA adapters: the catalog the server offers (`--lora-dir`) and each worker's loaded set.

The parent process checks a request's adapters (names, scales, and once per file version whether the file is a
LoRA for this transformer) before it queues the request; requests batch only with requests of the same adapter
set (it is part of the batch key). A worker loads an adapter the first time a batch needs it, keeps it loaded
while its factors fit the worker's byte budget (least recently used out first), and switches between sets with
`set_adapters`: an initializer swap (ONNX Runtime) or PEFT's scaling (torch), never a rebuild.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

from qwen_image_trt.core.errors import InputError
from qwen_image_trt.models.lora import ADAPTER_NAME

log = logging.getLogger(__name__)

MAX_SCALE = 10.0


class UnknownAdapter(Exception):
    """A request named an adapter the server does not have (404)."""

    def __init__(self, name: str, available: list[str]):
        self.name, self.available = name, available
        super().__init__(f"no LoRA adapter named {name!r} on this server (it has: {', '.join(available) or 'none'})")


def parse_lora_field(value, max_adapters: int) -> tuple[tuple[str, float], ...]:
    """The request's `lora` ("name", "name:scale", or a list of those) -> ((name, scale), ...) sorted by name, so
    the same set written in another order batches together."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    if len(items) > max_adapters:
        raise InputError("lora", items, f"at most {max_adapters} adapters per request")
    out: dict[str, float] = {}
    for item in items:
        name, _, scale_text = item.strip().partition(":")
        if not ADAPTER_NAME.match(name):
            raise InputError("lora", item, "'name' or 'name:scale' with an adapter name from GET /v1/models")
        try:
            scale = float(scale_text) if scale_text else 1.0
        except ValueError:
            raise InputError("lora", item, "'name:scale' with a number for scale, e.g. style:0.8") from None
        if not -MAX_SCALE <= scale <= MAX_SCALE:
            raise InputError("lora", item, f"a scale in [-{MAX_SCALE:g}, {MAX_SCALE:g}]")
        if name in out:
            raise InputError("lora", item, "each adapter once per request")
        out[name] = scale
    return tuple(sorted(out.items()))


class AdapterCatalog:
    """The adapters in `--lora-dir`: one per `NAME.safetensors`. The folder is read again when a request names an
    adapter it has not seen, so a file dropped in is served without a restart."""

    def __init__(self, folder, transformer_config: dict):
        self.folder = Path(folder) if folder else None
        self.config = transformer_config
        self._checked: dict[str, tuple[tuple, str | None]] = {}  # name -> (file version, error or None)
        # Checks run in worker threads; one at a time: a file is read once, and diffusers' lazy imports are not
        # safe to race from two threads.
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        if self.folder is None or not self.folder.is_dir():
            return []
        return sorted(p.stem for p in self.folder.glob("*.safetensors") if ADAPTER_NAME.match(p.stem))

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.safetensors"

    def check(self, loras) -> None:
        """Each (name, scale) names a LoRA here that fits this transformer. Blocking (reads files): call it off the
        event loop. Raises UnknownAdapter (404) or InputError (400: a LoRA for another model)."""
        with self._lock:
            self._check(loras)

    def _check(self, loras) -> None:
        for name, _scale in loras:
            path = self.path(name) if self.folder is not None else None
            if path is None or not path.is_file():
                raise UnknownAdapter(name, self.names())
            stat = path.stat()
            version = (stat.st_size, stat.st_mtime_ns)
            seen = self._checked.get(name)
            if seen is None or seen[0] != version:
                seen = self._checked[name] = (version, self._problem(path))
            if seen[1]:
                raise InputError("lora", name, seen[1])

    def _problem(self, path: Path) -> str | None:
        from qwen_image_trt.models.lora import read_adapter

        try:
            read_adapter(path, self.config, name=path.stem)
        except InputError as e:
            return e.allowed
        return None


class WorkerAdapters:
    """One worker's loaded adapters, bounded by the bytes of their factors; least recently used unloaded first."""

    def __init__(self, folder, max_bytes: int):
        self.folder = Path(folder) if folder else None
        self.max_bytes = int(max_bytes)
        self.loaded: OrderedDict[str, int] = OrderedDict()  # name -> bytes
        self.switches = 0
        self._current: tuple = ()

    def activate(self, pipe, loras) -> None:
        """Make exactly `loras` ((name, scale), ...) active on `pipe` (no adapters: the base model)."""
        loras = tuple(loras)
        if loras == self._current:
            return
        for name, _ in loras:
            if name in self.loaded:
                self.loaded.move_to_end(name)
                continue
            path = self.folder / f"{name}.safetensors"
            pipe.load_lora_weights(str(path), adapter_name=name)
            self.loaded[name] = os.path.getsize(path)
            self._evict(pipe, keep={n for n, _ in loras})
        if loras:
            pipe.enable_lora()
            pipe.set_adapters([n for n, _ in loras], [s for _, s in loras])
        elif self.loaded:
            pipe.disable_lora()
        self._current = loras
        self.switches += 1

    def _evict(self, pipe, keep: set) -> None:
        while sum(self.loaded.values()) > self.max_bytes:
            victim = next((n for n in self.loaded if n not in keep), None)
            if victim is None:
                return  # the set this batch needs is over the budget by itself: keep it, evict later
            pipe.delete_adapters(victim)
            self.loaded.pop(victim)
            log.info("lora: %s unloaded (worker adapter budget %d bytes)", victim, self.max_bytes)


__all__ = ["AdapterCatalog", "WorkerAdapters", "UnknownAdapter", "parse_lora_field"]
