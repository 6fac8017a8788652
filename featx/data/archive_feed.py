"""Archives → batches for the decode workers, one archive (one shard) after another.

The main process reads each archive in member order (a local file, or a scratch copy that
``prefetch.Prefetcher`` fetched while the previous archive decoded) and cuts its samples into
batches of ``(row, payload)`` items: a local tar's are byte ranges of the file (the main process
reads only its headers and labels), a local shard folder's its files, a parquet shard's cells
(the main process reads only the small columns), a fetched copy's alike (it is removed once its
last batch is decoded).
DataLoader workers read and decode them, so a decoder that crashes still costs one image
(``loader.decoded_batches``). Each batch carries a :class:`ShardPiece`:
which shard its rows belong to, their names and labels, the samples that failed before decoding,
and whether it ends the shard (then the shard is published) or the archive broke (then it is
not).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from featx.data.archives import Archive, ArchiveList, Sample
from featx.data.folder_samples import folder_samples
from featx.data.parquet_samples import parquet_samples
from featx.data.prefetch import Fetched, Prefetcher
from featx.data.tar_samples import BrokenArchive, tar_samples
from featx.data.views import ViewPolicy, view_key
from featx.data.work import ShardPiece, WorkBatch, WorkItem
from featx.errors import FeatxError
from featx.safe_text import stored_name


def archive_batches(
    archives: ArchiveList,
    shards: list[int],
    batch_size: int,
    fetcher: Prefetcher,
    max_bytes: int,
    views: ViewPolicy | None = None,
) -> Iterator[WorkBatch]:
    """Batches of the archives of ``shards`` in order, never mixing two archives in a batch;
    with ``views``, each item keyed by its output name ``<archive>/<member>``."""
    for fetched in fetcher:
        shard = shards[fetched.index]
        archive = archives.archives[shard]
        keys = Keys(views.seed, stored_name(archive.name) + "/") if views else None
        if fetched.path is None:
            yield _broken(shard, fetched.error)
            continue
        pending: list[Sample] = []
        row = 0  # rows of this shard given out so far
        samples = 0  # samples (not member-level failures), for the stats file's count
        scratch = fetched.path if fetched.copy else ""  # removed once its last batch is decoded
        try:
            for sample in _samples(archive, fetched, archives.label_from, max_bytes):
                samples += not sample.uncounted
                pending.append(sample)
                if len(pending) == batch_size:
                    yield _spec(shard, row, pending, keys, last=False)
                    row += len(pending)
                    pending = []
        except BrokenArchive as error:
            yield _broken(shard, str(error), scratch)
            continue
        finally:
            fetcher.hand_over(fetched)
        try:
            expected = archive.counted()
        except FeatxError as error:  # a stats file that cannot be fetched or read
            yield _broken(shard, str(error), scratch)
            continue
        if expected is not None and samples != expected:
            broken = (
                f"holds {samples} samples, its stats file says {expected} (img2dataset's successes)"
            )
            yield _broken(shard, broken, scratch)
            continue
        yield _spec(shard, row, pending, keys, True, archive.identity, scratch)


def _samples(
    archive: Archive, fetched: Fetched, label_from: str, max_bytes: int
) -> Iterator[Sample]:
    """A tar is indexed here, a shard folder listed and a parquet shard's small columns read;
    their images are read by the workers (byte ranges of the tar, whole files of the folder,
    parquet cells), from a fetched copy too: it stays until its last batch is decoded."""
    read = {"tar": tar_samples, "parquet": parquet_samples}.get(archive.kind, folder_samples)
    return read(str(fetched.path), label_from, max_bytes)


def _broken(shard: int, why: str, scratch: str = "") -> WorkBatch:
    return WorkBatch([], ShardPiece(shard, last=True, broken=why, scratch=scratch))


@dataclass(frozen=True)
class Keys:
    """The view keys of one archive's samples: of ``<archive>/<member>``, the output's name."""

    seed: int
    prefix: str

    def __call__(self, name: str) -> int:
        return view_key(self.seed, self.prefix + name)


def _spec(
    shard: int,
    first: int,
    samples: list[Sample],
    keys: Keys | None,
    last: bool,
    made_from: str = "",
    scratch: str = "",
) -> WorkBatch:
    names = tuple(stored_name(s.name) for s in samples)
    items = [
        WorkItem(first + i, s.image, keys(names[i]) if keys else 0)
        for i, s in enumerate(samples)
        if s.image is not None
    ]
    piece = ShardPiece(
        shard,
        names=names,
        labels=tuple(json.dumps(s.label) for s in samples),
        failures=tuple((first + i, s.error) for i, s in enumerate(samples) if s.image is None),
        last=last,
        made_from=made_from,
        scratch=scratch,
    )
    return WorkBatch(items, piece)
