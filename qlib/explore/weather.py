"""Synthetic weather corruption of image tensors with albumentations, seeded and reproducible.

``corrupt(X, condition, severity, seed=0)`` with ``X`` ``[N, C, H, W]`` float32 in [0, 1]
(C = 1 or 3) returns a corrupted copy of the same shape. Grayscale images are replicated to
RGB for the transform (rain, fog and snow are colour effects) and averaged back.
Severity 1..5 follows the ImageNet-C convention: 1 light, 5 heavy.

Albumentations draws rain drops, fog patches and snow flakes with sizes in pixels meant for
photographs; on a 28 x 28 image its fog did not even grow with severity (severity 1 was the
heaviest). Images smaller than ``WORKING_SIZE`` are therefore corrupted at that size and resized
back (bilinear both ways), which makes every condition's damage grow with severity (tested).
Brightness is a per-pixel shift and needs no resizing.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CONDITIONS",
    "SEVERITIES",
    "corrupt",
    "transform",
]


CONDITIONS = ("rain", "fog", "snow", "brightness")
SEVERITIES = (1, 2, 3, 4, 5)
WORKING_SIZE = 112


def transform(condition: str, severity: int):
    """The albumentations transform (applied with probability 1) for one condition and severity."""
    import albumentations as A  # imported lazily: it pulls in OpenCV

    if condition not in CONDITIONS:
        raise ValueError(f"unknown weather condition {condition!r}; expected one of {CONDITIONS}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    s = severity
    if condition == "rain":
        kind = ("drizzle", "drizzle", "heavy", "heavy", "torrential")[s - 1]
        return A.RandomRain(
            rain_type=kind, brightness_coefficient=1.0 - 0.1 * s, blur_value=3, drop_width=1, p=1.0
        )
    if condition == "fog":
        lo = 0.15 * s
        return A.RandomFog(
            fog_coef_range=(lo, min(1.0, lo + 0.05)), alpha_coef=0.08 + 0.02 * s, p=1.0
        )
    if condition == "snow":
        lo = 0.1 * s
        return A.RandomSnow(
            snow_point_range=(lo, lo + 0.05), brightness_coeff=2.5, method="texture", p=1.0
        )
    # brightness: a fixed shift per severity, no contrast change (as ImageNet-C's brightness)
    shift = 0.1 * s
    return A.RandomBrightnessContrast(
        brightness_limit=(shift, shift), contrast_limit=(0.0, 0.0), p=1.0
    )


def corrupt(X: Tensor, condition: str, severity: int, *, seed: int = 0) -> Tensor:
    """Corrupt every image of ``X`` ``[N, C, H, W]``; the same seed gives the same output."""
    import albumentations as A

    if X.ndim != 4 or X.shape[1] not in (1, 3):
        raise ValueError(f"expected X [N, 1 or 3, H, W], got {tuple(X.shape)}")
    steps = [transform(condition, severity)]
    h, w = X.shape[2:]
    if condition != "brightness" and min(h, w) < WORKING_SIZE:
        up = WORKING_SIZE / min(h, w)
        steps = [A.Resize(round(h * up), round(w * up)), *steps, A.Resize(h, w)]
    pipeline = A.Compose(steps, seed=seed)
    imgs = (X.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    gray = imgs.shape[-1] == 1
    out = np.empty(imgs.shape, dtype=np.float32)
    for i, img in enumerate(imgs):
        rgb = np.repeat(img, 3, axis=-1) if gray else img
        res = pipeline(image=np.ascontiguousarray(rgb))["image"].astype(np.float32) / 255.0
        out[i] = res.mean(axis=-1, keepdims=True) if gray else res
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
