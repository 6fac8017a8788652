"""Resizing one uint8 image (or a batch of one size) to a given size, the one way every view is
made: the clean view's resize before its centre crop (decode.py) and each augmented view's
(views.py)."""

from __future__ import annotations

from typing import Any

import torch

_UINT8_MODES = ("bilinear", "bicubic")  # torch's native uint8 antialiased kernels


def resize_to(
    image: torch.Tensor, size: tuple[int, int], transform: dict[str, Any]
) -> torch.Tensor:
    """Resize to (height, width) with the transform's interpolation: uint8 in and out on the CPU
    (``decode.RESIZE``), torchvision v2's float resize rounded back to uint8 elsewhere."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    mode = InterpolationMode(transform["interpolation"])
    antialias = transform.get("antialias", True)
    if image.device.type == "cpu" and mode.value in _UINT8_MODES and image.dtype == torch.uint8:
        return _uint8_resize(image, size, mode.value, antialias)
    return F.resize(image, list(size), interpolation=mode, antialias=antialias)


def _uint8_resize(
    image: torch.Tensor, size: tuple[int, int], mode: str, antialias: bool
) -> torch.Tensor:
    """torch's native uint8 antialiased kernel on one image or a batch of them."""
    batch = image if image.ndim == 4 else image.unsqueeze(0)
    if image.ndim == 3 and batch.is_contiguous(memory_format=torch.channels_last):
        # decode_jpeg's HWC memory: restrided so interpolate keeps it and skips a repack, as
        # torchvision v2 does (pytorch/pytorch#68430)
        batch = image.as_strided((1, *image.shape), (image.numel(), *image.stride()))
    resized = torch.nn.functional.interpolate(
        batch, size=size, mode=mode, align_corners=False, antialias=antialias
    )
    return resized if image.ndim == 4 else resized[0]
