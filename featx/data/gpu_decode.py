"""``--decode gpu``: baseline JPEGs travel encoded to the device and nvJPEG decodes them there.

Workers pick the files nvJPEG can take (:func:`gpu_decodable`); the main process decodes them in
one batched call and merges them with the CPU-decoded rest of the batch (:func:`on_device`).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from featx.data.batch import Batch
from featx.data.decode import (
    DecodePolicy,
    decode_bytes,
    describe_error,
    open_checked,
    read_file,
    resize_crop,
)


def gpu_decodable(path: str, policy: DecodePolicy) -> torch.Tensor | None:
    """The file's bytes when nvJPEG can decode it (baseline RGB/gray JPEG), else None.

    Progressive and CMYK JPEGs and every other format fall back to the CPU decoder per image.
    """
    data = read_file(path, policy.max_file_bytes)
    header = open_checked(data, policy)
    if header.format != "JPEG" or header.mode not in ("RGB", "L"):
        return None
    if header.info.get("progressive") or header.info.get("progression"):
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_on_device(
    encoded: list[tuple[int, torch.Tensor]], policy: DecodePolicy, device: Any
) -> tuple[list[int], torch.Tensor, list[tuple[int, str]]]:
    """Batched nvJPEG decode + resize/crop on the device; a file nvJPEG rejects is retried on
    the CPU, and one that fails there too is reported, not fatal."""
    from torchvision.io import ImageReadMode, decode_jpeg

    indices, images, failures = [], [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            decoded = decode_jpeg(
                [data for _, data in encoded],
                mode=ImageReadMode.RGB,
                device=device,
                apply_exif_orientation=True,
            )
        except RuntimeError:  # one bad file fails the batched call: go one by one
            decoded = [None] * len(encoded)
    for (index, data), image in zip(encoded, decoded, strict=True):
        try:
            if image is None:
                image = decode_bytes(bytes(data.numpy()), policy).to(device)
            images.append(resize_crop(image, policy.transform))
            indices.append(index)
        except Exception as error:  # reported per file, as the CPU path does
            failures.append((index, describe_error(error)))
    stacked = torch.stack(images) if images else torch.empty(0, 3, 0, 0, dtype=torch.uint8)
    return indices, stacked, failures


def on_device(batch: Batch, policy: DecodePolicy, device: torch.device) -> Batch:
    """The batch with every image on ``device`` in index order: CPU-decoded ones plus the JPEGs
    nvJPEG decodes now (its failures join the batch's)."""
    if not batch.encoded:
        return batch
    indices, decoded, failures = decode_on_device(batch.encoded, policy, device)
    parts = [
        t
        for t in (batch.images.to(device) if batch.images is not None else None, decoded)
        if t is not None and len(t)
    ]
    images = torch.cat(parts) if parts else None
    every = batch.indices + indices
    order = sorted(range(len(every)), key=every.__getitem__)
    return Batch(
        indices=sorted(every),
        images=images[order] if images is not None else None,
        failures=batch.failures + failures,
    )
