"""qwen_image_trt: export, quantize, check and serve Qwen-Image with ONNX Runtime and TensorRT."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load_pipeline", "__version__"]


def load_pipeline(*args, **kwargs):
    """Return a ready diffusers pipeline; see :func:`qwen_image_trt.runtime.pipeline.load_pipeline`."""
    from qwen_image_trt.runtime.pipeline import load_pipeline as _load

    return _load(*args, **kwargs)
