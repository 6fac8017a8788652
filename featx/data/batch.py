"""What the loading stage hands the loop: one batch of decoded images (:class:`Batch`), joined
again to the :class:`~featx.data.work.ShardPiece` of the work batch it was made from."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from featx.data.batch_slots import Slot
from featx.data.work import UNPLACED, ShardPiece


@dataclass(frozen=True)
class Encoded:
    """A batch's still-encoded JPEGs (``--decode gpu``) packed into one uint8 tensor: file ``k``
    is ``data[offsets[k]:offsets[k + 1]]``, row ``indices[k]`` of the work list.

    One tensor per batch, not one per file: a tensor leaving a DataLoader worker costs a file
    descriptor, and one per JPEG ran workers out of them (EMFILE) at batch 1024.
    """

    indices: list[int]
    data: torch.Tensor
    offsets: list[int]

    @staticmethod
    def pack(files: list[tuple[int, torch.Tensor]]) -> Encoded | None:
        if not files:
            return None
        offsets = [0]
        for _, data in files:
            offsets.append(offsets[-1] + len(data))
        return Encoded([index for index, _ in files], torch.cat([d for _, d in files]), offsets)

    def files(self) -> list[torch.Tensor]:
        """Each file's bytes: views into ``data``, no copy."""
        return [self.data[a:b] for a, b in zip(self.offsets, self.offsets[1:], strict=False)]


@dataclass(frozen=True)
class Batch:
    """Rows ``indices`` as uint8 ``images [n * views, 3, crop, crop]`` (channels-last memory;
    None when every sample failed), the samples that could not be decoded and why, with
    ``--decode gpu`` baseline JPEGs still encoded for the device to decode, the shard piece
    they belong to, and the worker's shared-memory slot that holds the images
    (batch_slots.py)."""

    indices: list[int]
    images: torch.Tensor | None
    failures: list[tuple[int, str]] = field(default_factory=list)
    encoded: Encoded | None = None
    piece: ShardPiece = UNPLACED
    slot: Slot | None = None
    views: int = 1  # crops per image in ``images`` (--augment K: 1 + K, each image's together)

    @property
    def files(self) -> int:
        """Samples decoded (or not) in this batch, not counting the piece's earlier failures."""
        encoded = len(self.encoded.indices) if self.encoded is not None else 0
        return len(self.indices) + len(self.failures) + encoded

    @property
    def samples(self) -> int:
        """Every sample the batch accounts for, the piece's pre-decode failures included."""
        return self.files + len(self.piece.failures)

    def pin_memory(self) -> Batch:
        """The DataLoader's ``pin_memory=True`` calls this: page-locked images copy to the
        device asynchronously (from pageable memory ``non_blocking`` silently blocks)."""
        images = self.images.pin_memory() if self.images is not None else None
        encoded = self.encoded
        if encoded is not None:
            encoded = replace(encoded, data=encoded.data.pin_memory())
        return replace(self, images=images, encoded=encoded)
