"""What the main process hands out, the same for every source (no torch here: the work list is
built before torch is imported).

A source is a list of shards; the main process cuts each shard into :class:`WorkBatch` es: the
samples' rows and where their bytes are (:data:`Payload`) for the decode workers, and a
:class:`ShardPiece` for the sink, which stays in the main process. The workers hand back a
``data.batch.Batch`` of decoded images, and the loader joins it to its piece again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class FileRange(NamedTuple):
    """A whole file (``length`` -1: an image in a folder, or a URL) or ``length`` bytes at
    ``offset`` of a local file (a member of a tar). Small: it is what a worker is sent, so the
    main process never reads or pickles image bytes."""

    path: str
    offset: int = 0
    length: int = -1


class ParquetCell(NamedTuple):
    """Row ``row`` of row group ``group`` in the image column ``column`` of a local parquet
    file: a worker reads that row group's column (once for every row of it sent to it) and
    takes the cell. Small, as :class:`FileRange` is."""

    path: str
    group: int
    row: int
    column: str


# A file or byte range, a parquet cell, or the bytes themselves (the cells of a parquet shard
# without a status column, or with row groups too big to hand to every worker).
Payload = FileRange | ParquetCell | bytes


class WorkItem(NamedTuple):
    """One sample for a worker: its row (the work list's, or the archive's), where its bytes
    are, and with ``--augment`` its views' key (``data.views.view_key`` of its name)."""

    row: int
    payload: Payload
    view_key: int = 0


@dataclass(frozen=True)
class ShardPiece:
    """What the sink needs besides the features of one batch: which shard its rows belong to,
    the rows' names and raw labels where the shard names them itself (archives; a folder's rows
    are named by the work list), the samples that failed before decoding, and whether the batch
    ends the shard (publish it) or the shard broke (discard it)."""

    shard: int
    names: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()  # each row's label as JSON ("null": none)
    failures: tuple[tuple[int, str], ...] = ()
    last: bool = False
    broken: str = ""
    made_from: str = (
        ""  # with ``last``, an archive's identity (name, size, version): resume checks it
    )
    # With ``last``, a fetched copy of a remote archive whose byte ranges the shard's batches
    # read: the loader removes it once this batch is decoded (data.loader.Replay).
    scratch: str = ""


UNPLACED = ShardPiece(-1)  # a batch not yet joined to its piece (inside a worker)


@dataclass(frozen=True)
class WorkBatch:
    """One batch of one shard: the items the workers decode, and its piece for the sink."""

    items: list[WorkItem]
    piece: ShardPiece

    @property
    def samples(self) -> int:
        """Samples it accounts for: the ones to decode and the ones that failed already."""
        return len(self.items) + len(self.piece.failures)
