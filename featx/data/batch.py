"""What the loading stage hands the loop: one batch of decoded images and the files that failed."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Batch:
    """Rows ``indices`` of the work list as uint8 ``images [n, 3, crop, crop]`` (None when every
    file failed), the files that could not be decoded and why, and, with ``--decode gpu``,
    baseline JPEGs still encoded (``uint8 [bytes]``) for the device to decode."""

    indices: list[int]
    images: torch.Tensor | None
    failures: list[tuple[int, str]] = field(default_factory=list)
    encoded: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    @property
    def files(self) -> int:
        return len(self.indices) + len(self.failures) + len(self.encoded)
