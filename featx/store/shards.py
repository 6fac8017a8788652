"""A shard file: the unit of work, of resume and of distribution (the folder they live in is
``store.workdir``).

Why shards: a single growing HDF5 file whose writer is killed is unreadable, and a disk-full
error can corrupt every committed row. So each shard is written to a temporary name, fsynced and
atomically renamed into ``OUT.featx/``: a shard file that exists is complete. Its layout::

    shard-000007.h5       index [n] int64 (rows of the work list), features/<layer>, failed/*
                          with --augment K also views/<layer> [n, K, ...]
                          archive shards also: names, raw_labels, the `archive` attribute
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from typing import Protocol

import h5py
import numpy as np

from featx.data.work import ShardPiece
from featx.store import schema
from featx.store.durable import DiskFile, publish, temporary_name
from featx.store.workdir import WorkDir

STRING = h5py.string_dtype("utf-8")
CHUNK_BYTES = 1 << 20  # ~1 MB row chunks: fast appends, cheap partial reads


@dataclass
class ShardRows:
    """One batch's results on their way to a shard: rows of the work list and their features,
    plus the files of the batch that failed and why."""

    indices: list[int]
    features: dict[str, np.ndarray]
    failures: list[tuple[int, str]] = field(default_factory=list)
    views: dict[str, np.ndarray] = field(default_factory=dict)  # --augment K: [n, K, ...]

    @property
    def files(self) -> list[int]:
        return self.indices + [index for index, _ in self.failures]

    def datasets(self) -> dict[str, np.ndarray]:
        """Every array by its dataset's name in the shard: ``features/<layer>``, ``views/...``."""
        return {
            **{f"{schema.FEATURES}/{layer}": values for layer, values in self.features.items()},
            **{f"{schema.VIEWS}/{layer}": values for layer, values in self.views.items()},
        }


class ShardWriter:
    """Append batches to one shard's temporary file; ``finish`` publishes it atomically."""

    def __init__(
        self,
        work: WorkDir,
        shard: int,
        dtype: str,
        compression: str = "none",
        capacity: int | None = None,
    ) -> None:
        self.compression = None if compression == "none" else compression
        self.final = work.shard_path(shard)
        self.temporary = temporary_name(self.final)
        # No chunk bigger than the shard (an archive's row count is known only at its end).
        self.capacity = capacity or len(range(*work.shard_range(shard)))
        self.dtype = np.dtype(dtype)
        self.disk = DiskFile(self.temporary)
        self.file = h5py.File(self.disk, "w", track_order=True)
        self.file.attrs["shard"] = shard
        self.rows = 0
        self.failed_index: list[int] = []
        self.failed_errors: list[str] = []

    def append(self, batch: ShardRows) -> None:
        for index, error in batch.failures:
            self.failed_index.append(index)
            self.failed_errors.append(error)
        if not batch.indices:
            return
        datasets = batch.datasets()
        if self.rows == 0:
            self._create_datasets(datasets)
        stop = self.rows + len(batch.indices)
        index = self.file[schema.SHARD_INDEX]
        index.resize((stop,))
        index[self.rows : stop] = np.asarray(batch.indices, dtype=np.int64)
        for name, values in datasets.items():
            dataset = self.file[name]
            dataset.resize((stop, *dataset.shape[1:]))
            dataset[self.rows : stop] = values.astype(self.dtype, copy=False)
        self.rows = stop
        self.disk.check()

    def _create_datasets(self, datasets: dict[str, np.ndarray]) -> None:
        self.file.create_dataset(
            schema.SHARD_INDEX,
            shape=(0,),
            maxshape=(None,),
            dtype=np.int64,
            chunks=(min(4096, self.capacity),),
        )
        for name, values in datasets.items():
            self.file.create_dataset(
                name,
                shape=(0, *values.shape[1:]),
                maxshape=(None, *values.shape[1:]),
                dtype=self.dtype,
                chunks=row_chunks(values.shape[1:], self.dtype, self.capacity),
                compression=self.compression,
            )

    def finish(
        self, strings: dict[str, list[str]] | None = None, attrs: dict[str, str] | None = None
    ) -> None:
        """Publish the shard, with ``strings`` as extra string datasets and ``attrs`` (an
        archive's row names, and what the archive was)."""
        for key, value in (attrs or {}).items():
            self.file.attrs[key] = value
        for name, values in (strings or {}).items():
            self.file.create_dataset(
                name, data=np.asarray(values, dtype=object).reshape(-1), dtype=STRING
            )
        order = np.argsort(np.asarray(self.failed_index, dtype=np.int64), kind="stable")
        self.file.create_dataset(
            schema.SHARD_FAILED_INDEX, data=np.asarray(self.failed_index, np.int64)[order]
        )
        errors = np.asarray(self.failed_errors, dtype=object)[order]
        self.file.create_dataset(
            schema.FAILED_ERRORS,
            data=errors if self.failed_errors else np.zeros(0, dtype=object),
            dtype=STRING,
        )
        if self.rows == 0:
            self.file.create_dataset(schema.SHARD_INDEX, data=np.zeros(0, np.int64))
        self.file.close()
        self.disk.close()
        self.disk.check()
        publish(self.temporary, self.final)

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self.file.close()
        self.disk.close()
        with contextlib.suppress(FileNotFoundError):
            self.temporary.unlink()


def row_chunks(row_shape: tuple[int, ...], dtype: np.dtype, rows: int = 4096) -> tuple[int, ...]:
    """Chunks of whole rows, about CHUNK_BYTES each (never more rows than the dataset has)."""
    row_bytes = max(1, int(np.prod(row_shape)) * np.dtype(dtype).itemsize)
    return (max(1, min(rows, 4096, CHUNK_BYTES // row_bytes)), *row_shape)


class ShardSink:
    """Routes each batch's rows to its shard's file (``piece.shard``) and publishes the shard
    when its last batch arrives (``piece.last``); a broken shard is discarded (``broken`` says
    which and why: the run fails, and a resume reads it again). A shard whose last piece says
    what it was made from (an archive: ``piece.made_from``, checked on resume) also records
    its rows' names and raw labels, which its pieces carry. ``capacity`` guesses the rows of a
    shard whose size the work folder does not know (chunking only)."""

    def __init__(
        self,
        work: WorkDir,
        dtype: str,
        compression: str = "none",
        capacity: int | None = None,
    ) -> None:
        self.work = work
        self.dtype = dtype
        self.compression = compression
        self.capacity = capacity
        self.open: dict[int, _OpenShard] = {}
        self.broken: dict[int, str] = {}
        self.busy_s = 0.0  # time spent writing: `featx bench` reports its share of the run

    def write(self, rows: ShardRows, piece: ShardPiece) -> None:
        started = time.perf_counter()
        try:
            self._write(rows, piece)
        except OSError as error:
            self.discard()
            raise self.work.write_error(error) from None
        finally:
            self.busy_s += time.perf_counter() - started

    def _write(self, rows: ShardRows, piece: ShardPiece) -> None:
        shard = piece.shard
        if piece.broken:
            if shard in self.open:
                self.open.pop(shard).writer.discard()
            self.broken[shard] = piece.broken
            return
        if shard not in self.open:
            writer = ShardWriter(self.work, shard, self.dtype, self.compression, self.capacity)
            self.open[shard] = _OpenShard(writer)
        held = self.open[shard]
        held.writer.append(replace(rows, failures=rows.failures + list(piece.failures)))
        held.names.extend(piece.names)
        held.labels.extend(piece.labels)
        if piece.last:  # published, then forgotten: a failed publish is discarded whole
            if piece.made_from:
                held.writer.finish(
                    {schema.SHARD_NAMES: held.names, schema.SHARD_LABELS: held.labels},
                    {schema.SHARD_ARCHIVE: piece.made_from},
                )
            else:
                held.writer.finish()
            del self.open[shard]

    def discard(self) -> None:
        for held in self.open.values():
            held.writer.discard()
        self.open.clear()

    def close(self) -> None:
        """Nothing to wait for: each shard was published when its last batch arrived."""


class Sink(Protocol):
    """Where a run's rows go: a :class:`ShardSink`, or one in its own process
    (``store.sink_process``)."""

    busy_s: float
    broken: dict[int, str]

    def write(self, rows: ShardRows, piece: ShardPiece) -> None: ...

    def discard(self) -> None: ...

    def close(self) -> None: ...


@dataclass
class _OpenShard:
    writer: ShardWriter
    names: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
