"""The two kinds of work list a run reads, behind one interface, so that ``pipeline.py`` never
asks which it has.

* :class:`FileSource`: image files (a folder, a path list); shards are ``--shard-size`` rows of
  the sorted list, known before the run, and rows are named by the list.
* :class:`ArchiveSource`: tars or parquet shards; each archive is one shard, read as it streams
  in, its rows named and labelled by what it holds (``data/archive_feed.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, overload

from featx.config import ExtractConfig
from featx.data.archive_feed import archive_batches
from featx.data.archives import Archive, ArchiveList
from featx.data.decode import DecodePolicy
from featx.data.loader import file_items
from featx.data.prefetch import Prefetcher
from featx.data.work import ShardPiece, WorkBatch
from featx.data.worklist import ImageList, printable
from featx.errors import ResumeMismatch
from featx.store import schema
from featx.store.assemble import ArchiveRows, RowTable, WorkListRows, archive_classes
from featx.store.shards import ShardSink, Sink
from featx.store.sink_process import apart
from featx.store.workdir import WorkDir, changed_archives

ARCHIVE_ROWS = 4096  # an archive shard's rows, guessed for chunking: img2dataset writes 10,000


@dataclass(frozen=True)
class ShardWork:
    """What the loop reads and where its rows go, for this process's unfinished shards."""

    batches: Iterable[WorkBatch]  # a list (files), or an iterator (archives, read as they go)
    sink: Sink  # in a process of its own, or (--no-write-behind) in this one
    fetcher: Prefetcher | None = None  # remote archives fetched ahead; closed after the loop

    def close(self) -> None:
        if self.fetcher is not None:
            self.fetcher.close()


@dataclass(frozen=True)
class FileSource:
    images: ImageList
    unit: str = "images"  # what resume and interrupt messages count
    resume_unit: str = "--shard-size sets the unit of resume"

    def shard_size(self, requested: int) -> int:
        return requested

    def shard_words(self, work: WorkDir) -> str:
        return f"{work.shard_size:,} images"

    def shard_name(self, shard: int) -> str:
        return f"shard {shard}"

    def count(self, work: WorkDir, shards: list[int] | range) -> int:
        """Units (images) in these shards, for messages."""
        return work.files_in(shards)

    def check_resume(self, work: WorkDir, done: list[int]) -> None:
        """Nothing beyond the fingerprint: the file list's digest is in it."""

    def progress(self, work: WorkDir, mine: range, todo: list[int]) -> tuple[int | None, int]:
        """(images in this process's shards, of them done before) for the progress bar."""
        return work.files_in(mine), work.files_in(mine) - work.files_in(todo)

    def feed(
        self,
        work: WorkDir,
        todo: list[int],
        size: int,
        policy: DecodePolicy,
        config: ExtractConfig,
        rank: int,
    ) -> ShardWork:
        """Batches never cross a shard boundary: a shard's numbers do not depend on another's.
        (``rank``, torchrun's, names an archive source's scratch folder.)"""
        batches = [
            WorkBatch(
                file_items(self.images, range(start, min(start + size, stop)), policy.views),
                ShardPiece(shard, last=start + size >= stop),
            )
            for shard in todo
            for first, stop in [work.shard_range(shard)]
            for start in range(first, stop, size)
        ]
        sink = ShardSink(work, config.dtype, config.compression)
        return ShardWork(batches, apart(sink, config.write_behind))

    def rows(self, work: WorkDir, shards: range, attrs: dict[str, Any]) -> RowTable:
        paths = [printable(path) for path in self.images.paths]
        return WorkListRows(work, paths, self.images.labels)

    def attributes(self) -> dict[str, Any]:
        return {"inputs": schema.FILE_INPUTS, "class_names": self.images.class_names}


@dataclass(frozen=True)
class ArchiveSource:
    images: ArchiveList
    resume_unit: str = "each archive is a unit of resume"

    @property
    def unit(self) -> str:
        return f"{self.images.kind} shards"

    def shard_size(self, requested: int) -> int:
        return 1  # an archive is one shard whatever it holds

    def shard_words(self, work: WorkDir) -> str:
        return f"one {self.images.kind} archive"

    def shard_name(self, shard: int) -> str:
        return self.images.archives[shard].name

    def count(self, work: WorkDir, shards: list[int] | range) -> int:
        return len(shards)

    def check_resume(self, work: WorkDir, done: list[int]) -> None:
        """A finished shard whose archive changed since (size, ETag or mtime) is refused."""
        identities = Identities(self.images.archives)
        changed = changed_archives(work, done, identities)
        if changed:
            raise ResumeMismatch(
                f"archives changed since their shards were written ({'; '.join(changed[:3])}"
                f"{'; …' if len(changed) > 3 else ''}): remove those shard files to compute "
                "them again, or pass --overwrite to start over"
            )

    def progress(self, work: WorkDir, mine: range, todo: list[int]) -> tuple[int | None, int]:
        """An archive's image count is known only from img2dataset's stats files."""
        total = self.images.expected_images(mine)
        rest = self.images.expected_images(todo)
        return total, (total - rest) if total is not None and rest is not None else 0

    def feed(
        self,
        work: WorkDir,
        todo: list[int],
        size: int,
        policy: DecodePolicy,
        config: ExtractConfig,
        rank: int,
    ) -> ShardWork:
        archives = [self.images.archives[shard] for shard in todo]
        fetcher = Prefetcher(
            [a.url for a in archives], [a.listed_size for a in archives], work.scratch(rank)
        )
        batches = archive_batches(
            self.images, todo, size, fetcher, policy.max_file_bytes, policy.views
        )
        sink = ShardSink(work, config.dtype, config.compression, ARCHIVE_ROWS)
        return ShardWork(batches, apart(sink, config.write_behind), fetcher)

    def rows(self, work: WorkDir, shards: range, attrs: dict[str, Any]) -> RowTable:
        """Class names are decided now, from every shard's labels (and recorded in ``attrs``)."""
        named = self.images.class_names
        attrs["class_names"], classes = archive_classes(work, shards, named)
        return ArchiveRows([a.name for a in self.images.archives], classes)

    def attributes(self) -> dict[str, Any]:
        return {
            "inputs": self.images.kind,
            "archives_sha256": self.images.content_digest(),
            "class_names": [],  # decided at assembly: rows()
        }


WorkSource = FileSource | ArchiveSource


class Identities(Sequence[str]):
    """Each archive's identity, asked for only when a shard needs it (written or resumed):
    an archive its listing did not describe costs a request then, not before the first image."""

    def __init__(self, archives: list[Archive]) -> None:
        self.archives = archives

    def __len__(self) -> int:
        return len(self.archives)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [archive.identity for archive in self.archives[index]]
        return self.archives[index].identity


def source_of(images: ImageList | ArchiveList) -> WorkSource:
    return ArchiveSource(images) if isinstance(images, ArchiveList) else FileSource(images)
