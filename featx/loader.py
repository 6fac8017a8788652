"""The loading stage: batches of decoded uint8 images, in order, surviving decoder crashes.

DataLoader workers decode (images.py); this module hands their batches to the loop in
pipeline.py, and merges ``--decode gpu`` files decoded on the device into the batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from featx import runtime
from featx.config import ExtractConfig
from featx.images import (
    DecodePolicy,
    DecoderCrashed,
    ImageDataset,
    collate,
    decode_on_device,
    describe_error,
)

PREFETCH = 4  # batches each DataLoader worker decodes ahead


def decoded_batches(
    dataset: ImageDataset, batches: list[list[int]], config: ExtractConfig, device: torch.device
) -> Iterator[dict[str, Any]]:
    """The batches, decoded, in order. A decoder that kills its worker process (a segfault in a
    C library, the OOM killer) must not end the run: the batches that worker may have held are
    decoded again one image per child process, so the culprit is found and recorded in failed/,
    and a fresh DataLoader takes the rest."""
    done = 0
    while done < len(batches):
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batches[done:],
            collate_fn=collate,
            num_workers=config.num_workers,
            pin_memory=device.type == "cuda",
            worker_init_fn=runtime.worker_init,
            prefetch_factor=PREFETCH if config.num_workers else None,
        )
        try:
            with runtime.loader_iterator(loader) as iterator:
                for batch in iterator:
                    yield batch
                    done += 1
            return
        except RuntimeError as error:
            if not runtime.is_worker_death(error):
                raise
        for batch in batches[done : done + config.num_workers * PREFETCH]:
            yield collate([_decode_alone(dataset, index) for index in batch])
            done += 1


def _decode_alone(dataset: ImageDataset, index: int) -> tuple[int, Any, str]:
    """One image decoded in a process of its own: if that process dies, the image is the culprit."""
    try:
        return runtime.call_in_child(dataset.__getitem__, index)
    except runtime.ProcessDied as died:
        return index, None, describe_error(DecoderCrashed(f"the process decoding this file {died}"))


def on_device(
    batch: dict[str, Any], policy: DecodePolicy, device: torch.device
) -> torch.Tensor | None:
    """The batch's images on ``device`` in index order: CPU-decoded ones plus, with
    ``--decode gpu``, the JPEGs nvJPEG decodes now (failures join ``batch["failures"]``)."""
    images = batch["images"]
    if not batch["encoded"]:
        return images
    indices, decoded, failures = decode_on_device(batch["encoded"], policy, device)
    batch["failures"].extend(failures)
    parts = [
        t
        for t in (images.to(device) if images is not None else None, decoded)
        if t is not None and len(t)
    ]
    images = torch.cat(parts) if parts else None
    order = sorted(
        range(len(batch["indices"]) + len(indices)),
        key=(batch["indices"] + indices).__getitem__,
    )
    batch["indices"] = sorted(batch["indices"] + indices)
    images = images[order] if images is not None else None
    batch["encoded"] = []
    return images
