"""Error metrics between a reference and a candidate: tensors (per forward, per step) and images."""

from __future__ import annotations

import math

import numpy as np

from qwen_image_trt.core.errors import InputError

from qwen_image_trt.core.metrics import tensor_metrics  # noqa: F401 - parity's tensor metric is the core one

PSNR_CAP_DB = 200.0  # identical images: a finite number keeps report.json strict JSON


def psnr(ref: np.ndarray, got: np.ndarray) -> float:
    """Peak signal-to-noise ratio of uint8 images, in dB (PSNR_CAP_DB when identical)."""
    mse = np.mean((ref.astype(np.float64) - got.astype(np.float64)) ** 2)
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * math.log10(255.0**2 / mse))


def ssim(ref: np.ndarray, got: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    side = min(ref.shape[:2])
    if side < 3:
        raise InputError("image size", list(ref.shape[:2]), "at least 3x3 pixels for SSIM")
    win = 7 if side >= 7 else (side - 1) // 2 * 2 + 1  # odd, and no larger than the image
    return float(structural_similarity(ref, got, channel_axis=-1, data_range=255, win_size=win))


def diff_image(ref: np.ndarray, got: np.ndarray, gain: float = 8.0) -> np.ndarray:
    """|ref - got| amplified so that small differences are visible; uint8 HxWx3."""
    d = np.abs(ref.astype(np.int16) - got.astype(np.int16)).astype(np.float32) * gain
    return np.clip(d, 0, 255).astype(np.uint8)
