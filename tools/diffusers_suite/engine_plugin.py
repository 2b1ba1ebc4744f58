"""pytest plugin (`-p engine_plugin`) that runs diffusers' own tests/pipelines/qwenimage/ on engine drop-ins.

Loaded into a pytest run over an extracted diffusers `tests/` tree (run.py sets it up). It changes nothing in
diffusers' test code; it only:
  - redirects the one hub repo the tests load to a local stand-in (hub_stand_in.py);
  - in mode "engine" (QITRT_SUITE_MODE, the default), wraps every test class's `get_dummy_components` so the
    pipeline under test gets EngineTransformer / EngineVAE on ONNX Runtime in place of the eager modules
    (engine_swap.py), and adds one test per pipeline class, `test_qitrt_engine_matches_eager`, comparing the engine
    pipeline's output with the eager pipeline's on the same dummy components and inputs (the check the
    hard-coded-slice tests would make, had the stand-in tokenizer not changed their expected numbers);
  - in mode "stock", swaps nothing: the baseline that tells which outcomes come from the environment (stand-in
    tokenizer, CPU only) and which from the engines;
  - marks the tests listed in expectations.py (xfail with the exception they must raise, or skip), each with its
    reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import engine_swap
import expectations
import hub_stand_in
import pytest

MODE = os.environ.get("QITRT_SUITE_MODE", "engine")
PARITY_TEST = "test_qitrt_engine_matches_eager"
PARITY_ATOL = 1e-4  # diffusers' own tolerance for outputs that must not change (save/load, batch vs single)


def pytest_configure(config):
    if MODE not in ("engine", "stock"):
        raise pytest.UsageError(f"QITRT_SUITE_MODE={MODE!r}: engine or stock")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    folder = engine_swap.cache_root() / f"hub-stand-in-v{hub_stand_in.VERSION}"
    hub_stand_in.install(hub_stand_in.write_stand_in(folder))
    config.addinivalue_line("markers", "qitrt: added by qwen_image_trt's engine plugin")


def _is_pipeline_test_class(obj) -> bool:
    return isinstance(obj, type) and obj.__name__.startswith("Test") and hasattr(obj, "get_dummy_components")


def _parity_test(self, record_property):
    """Engine pipeline vs the stock eager pipeline: same dummy components (seeded), same inputs, fresh generator."""
    stock = self.get_pipeline(**self._qitrt_stock_components())
    engine = self.get_pipeline()
    assert type(engine.transformer).__name__ == "EngineTransformer", "the engine swap did not happen"
    want, got = self.run_pipe(stock), self.run_pipe(engine)
    assert got.shape == want.shape
    diff = float((got.float() - want.float()).abs().max())
    record_property("max_abs_diff", diff)
    assert diff <= PARITY_ATOL, f"engine pipeline differs from the eager one by {diff:.3g} (> {PARITY_ATOL})"


def pytest_pycollect_makeitem(collector, name, obj):
    """Patch each test class once, before pytest collects its methods; collection itself proceeds as usual."""
    if MODE != "engine" or not _is_pipeline_test_class(obj) or "_qitrt_stock_components" in obj.__dict__:
        return
    stock = obj.get_dummy_components

    def get_dummy_components(self, *args, **kwargs):
        return engine_swap.swap(stock(self, *args, **kwargs))

    obj._qitrt_stock_components = stock
    obj.get_dummy_components = get_dummy_components
    if any(c.__name__ == "PipelineTesterMixin" for c in obj.__mro__):
        setattr(obj, PARITY_TEST, pytest.mark.qitrt(_parity_test))


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = Path(str(item.fspath)).name
        cls = item.cls.__name__ if item.cls else ""
        test = getattr(item, "originalname", None) or item.name
        expect = expectations.lookup(MODE, module, cls, test)
        if expect is None:
            continue
        if expect.kind == "skip":
            item.add_marker(pytest.mark.skip(reason=expect.reason))
        else:
            item.add_marker(pytest.mark.xfail(reason=expect.reason, raises=expect.raises, strict=True))
