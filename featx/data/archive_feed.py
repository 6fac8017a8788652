"""Archives → batches for the decode workers, one archive (one shard) after another.

The main process reads each archive in member order (a local file, or a scratch copy that
``remote.Prefetcher`` fetched while the previous archive decoded) and cuts its samples into
batches of ``(row, bytes)`` items; DataLoader workers decode them, so a decoder that crashes
still costs one image (``loader.decoded_batches``). Each batch carries a :class:`ShardPiece`:
which shard its rows belong to, their names and labels, the samples that failed before decoding,
and whether it ends the shard (then the shard is published) or the archive broke (then it is
not).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from featx.data.archives import FOLDER_KIND, ArchiveList, Sample
from featx.data.decode import DecodePolicy, decode_bytes, describe_error, resize_crop
from featx.data.folder_samples import folder_samples
from featx.data.gpu_decode import prepare_bytes
from featx.data.parquet_samples import parquet_samples
from featx.data.remote import Prefetcher
from featx.data.tar_samples import BrokenArchive, tar_samples
from featx.errors import FeatxError
from featx.safe_text import stored_name

# An archive's kind → the reader of its samples (each yields the same ``Sample`` objects).
READERS = {"tar": tar_samples, "parquet": parquet_samples, FOLDER_KIND: folder_samples}


@dataclass(frozen=True)
class ShardPiece:
    """What the writer needs besides the features of one batch of an archive's rows."""

    shard: int
    names: list[str] = field(default_factory=list)  # rows first, first + 1, … (failed ones too)
    labels: list[str] = field(default_factory=list)  # each row's label as JSON ("null": none)
    failures: list[tuple[int, str]] = field(default_factory=list)  # rows failed before decoding
    last: bool = False  # the archive was read to its end: publish the shard
    broken: str = ""  # the archive could not be read whole: discard the shard


class BatchSpec(list[tuple[int, bytes]]):
    """A batch's items for the workers, ``(row, image bytes)``, with its :class:`ShardPiece`
    (which stays in the main process: ``loader.decoded_batches`` attaches it to the batch)."""

    def __init__(self, items: list[tuple[int, bytes]], tag: ShardPiece) -> None:
        super().__init__(items)
        self.tag = tag

    def __reduce__(self) -> Any:  # to a worker: the items only
        return list, (list(self),)


class EncodedDataset(torch.utils.data.Dataset[tuple[int, torch.Tensor | None, str]]):
    """``(row, bytes)`` → ``(row, uint8 image or None, error)``, as ``loader.ImageDataset``
    does for files."""

    def __init__(self, policy: DecodePolicy) -> None:
        self.policy = policy

    def __getitem__(self, item: Any) -> tuple[int, torch.Tensor | None, str]:
        row, data = item
        try:
            if self.policy.mode == "gpu":
                return row, prepare_bytes(data, self.policy), ""
            return row, resize_crop(decode_bytes(data, self.policy), self.policy.transform), ""
        except Exception as error:  # every decoder failure is data about that image
            return row, None, describe_error(error)

    @staticmethod
    def row_of(item: Any) -> int:
        return int(item[0])


def archive_batches(
    archives: ArchiveList,
    shards: list[int],
    batch_size: int,
    fetcher: Prefetcher,
    max_bytes: int,
) -> Iterator[BatchSpec]:
    """Batches of the archives of ``shards`` in order, never mixing two archives in a batch."""
    for fetched in fetcher:
        shard = shards[fetched.index]
        archive = archives.archives[shard]
        if fetched.path is None:
            yield BatchSpec([], ShardPiece(shard, last=True, broken=fetched.error))
            continue
        read = READERS[archive.kind]
        pending: list[Sample] = []
        row = 0  # rows of this shard given out so far
        samples = 0  # samples (not member-level failures), for the stats file's count
        try:
            for sample in read(fetched.path, archives.label_from, max_bytes):
                samples += not sample.uncounted
                pending.append(sample)
                if len(pending) == batch_size:
                    yield _spec(shard, row, pending, last=False)
                    row += len(pending)
                    pending = []
        except BrokenArchive as error:
            yield BatchSpec([], ShardPiece(shard, last=True, broken=str(error)))
            continue
        finally:
            fetcher.release(fetched)
        try:
            expected = archive.counted()
        except FeatxError as error:  # a stats file that cannot be fetched or read
            yield BatchSpec([], ShardPiece(shard, last=True, broken=str(error)))
            continue
        if expected is not None and samples != expected:
            broken = (
                f"holds {samples} samples, its stats file says {expected} (img2dataset's successes)"
            )
            yield BatchSpec([], ShardPiece(shard, last=True, broken=broken))
            continue
        yield _spec(shard, row, pending, last=True)


def _spec(shard: int, first: int, samples: list[Sample], last: bool) -> BatchSpec:
    items = [(first + i, s.image) for i, s in enumerate(samples) if s.image is not None]
    piece = ShardPiece(
        shard,
        names=[stored_name(s.name) for s in samples],
        labels=[json.dumps(s.label) for s in samples],
        failures=[(first + i, s.error) for i, s in enumerate(samples) if s.image is None],
        last=last,
    )
    return BatchSpec(items, piece)
