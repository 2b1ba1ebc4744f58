"""One runner interface for every backend (after Polygraphy's BaseRunner).

A runner owns one compiled graph. `activate()` loads it (lazily: constructing a runner is cheap),
`infer(feeds)` takes and returns torch tensors by name, `deactivate()` frees it. Subclasses fill in
the `_impl` methods; the base class checks state and input names, so each backend stays short.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Runner(ABC):
    backend = "base"

    def __init__(self, name: str, device: str | torch.device = "cpu"):
        self.name = name
        self.device = torch.device(device)
        self.is_active = False
        self._input_names: list[str] | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def activate(self) -> "Runner":
        if not self.is_active:
            self._activate_impl()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate_impl()
            self.is_active = False
            self._input_names = None

    def __enter__(self):
        return self.activate()

    def __exit__(self, *exc):
        self.deactivate()

    # -- inference -----------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        if self._input_names is None:  # asked on every infer: computed once per activation
            self._input_names = list(self.input_metadata())
        return self._input_names

    def input_metadata(self) -> dict[str, tuple[str, list]]:
        """{input name: (dtype name, shape with symbolic dims as strings)}."""
        self.activate()
        return self._input_metadata_impl()

    def infer(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run once. Feeds and results are torch tensors on `self.device`."""
        self.activate()
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise KeyError(f"{self.backend} runner {self.name!r}: missing input(s) {missing}; got {sorted(feeds)}")
        return self._infer_impl(feeds)

    # -- weights -------------------------------------------------------------------------------
    @property
    def weights_source(self):
        """The graph file whose initializer names `set_weights` takes (LoRA reads base values from it)."""
        raise NotImplementedError(f"{self.backend} runner {self.name!r}: its weights cannot be changed at run time")

    def set_weights(self, values: dict) -> None:
        """Replace named weights: {initializer name: numpy array, or None for the graph's own value}."""
        raise NotImplementedError(f"{self.backend} runner {self.name!r}: its weights cannot be changed at run time "
                                  "(merge a LoRA at build with --lora)")

    @abstractmethod
    def _activate_impl(self) -> None: ...

    def _deactivate_impl(self) -> None:
        pass

    @abstractmethod
    def _input_metadata_impl(self) -> dict[str, tuple[str, list]]: ...

    @abstractmethod
    def _infer_impl(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r}, device={self.device})"
