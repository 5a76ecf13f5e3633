"""Small greyscale copies of image-like inputs, for the report's gallery."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["thumbnail_images", "thumbnail_shape"]

_THUMB_SIDE = 28


def thumbnail_shape(x: Tensor | None) -> tuple[int, int] | None:
    if x is None or not x.is_floating_point():
        return None
    if x.dim() == 2:
        side = math.isqrt(x.shape[1])
        if side * side != x.shape[1] or side < 4:
            return None
        h = w = side
    elif x.dim() in (3, 4):
        h, w = x.shape[-2], x.shape[-1]
    else:
        return None
    return (min(h, _THUMB_SIDE), min(w, _THUMB_SIDE))


def thumbnail_images(x: Tensor, shape: tuple[int, int]) -> Tensor:
    """uint8 greyscale images [N, *shape], computed on x's device (the recorder copies them)."""
    x = x.detach().float()
    if x.dim() == 2:
        side = math.isqrt(x.shape[1])
        x = x.reshape(-1, 1, side, side)
    elif x.dim() == 3:
        x = x[:, None]
    x = F.adaptive_avg_pool2d(x.mean(1, keepdim=True), shape)[:, 0]
    flat = x.reshape(x.shape[0], -1)
    low = flat.min(1, keepdim=True).values
    span = (flat.max(1, keepdim=True).values - low).clamp_min(1e-12)
    scaled = ((flat - low) / span * 255).round().clamp(0, 255)
    return scaled.reshape(x.shape).to(torch.uint8)
