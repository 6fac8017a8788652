"""Shards: the unit of work, of resume and of distribution.

Why shards: a single growing HDF5 file whose writer is killed is unreadable, and a disk-full
error can corrupt every committed row. So the work list is cut into fixed-size shards
(``shard_size`` images each, independent of batch size and process count); each shard is
written to a temporary name, fsynced and atomically renamed into ``OUT.featx/``. A shard file
that exists is complete. A resume does only the missing shards. The shard numbering depends only
on the sorted work list, so one process, a torchrun job or N ``--shard K/N`` parts produce the
same rows.

Layout of the work directory ``OUT.featx/``::

    run.json              fingerprint (what is computed) + created time + shard count
    shard-000007.h5       index [n] int64 (rows of the work list), features/<layer>, failed/*
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from featx.data.work import ShardPiece
from featx.errors import FeatxError, ResumeMismatch, UsageError
from featx.store import schema
from featx.store.durable import DiskFile, atomic_output, publish, temporary_name, write_error

STRING = h5py.string_dtype("utf-8")
CHUNK_BYTES = 1 << 20  # ~1 MB row chunks: fast appends, cheap partial reads


@dataclass
class ShardRows:
    """One batch's results on their way to a shard: rows of the work list and their features,
    plus the files of the batch that failed and why."""

    indices: list[int]
    features: dict[str, np.ndarray]
    failures: list[tuple[int, str]] = field(default_factory=list)

    @property
    def files(self) -> list[int]:
        return self.indices + [index for index, _ in self.failures]


def shard_ranges(total: int, shard_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + shard_size, total)) for start in range(0, total, shard_size)]


@dataclass
class WorkDir:
    """The shards of one extraction into ``out``; see the module docstring."""

    out: Path
    fingerprint: dict[str, Any]
    shard_size: int
    total: int
    created: str

    @property
    def path(self) -> Path:
        return work_dir_of(self.out)

    @property
    def shard_count(self) -> int:
        return len(shard_ranges(self.total, self.shard_size))

    def shard_path(self, shard: int) -> Path:
        return self.path / f"shard-{shard:06d}.h5"

    def is_done(self, shard: int) -> bool:
        return self.shard_path(shard).is_file()

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.total)

    def files_in(self, shards: list[int] | range) -> int:
        return sum(len(range(*self.shard_range(shard))) for shard in shards)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def scratch(self) -> Path:
        """This process's private folder for fetched archives, emptied of what a killed run
        left: one per host and rank, so torchrun ranks never share one."""
        import socket

        rank = os.environ.get("RANK", "0")
        path = self.path / f"fetch-{socket.gethostname()}-{rank}"
        if os.path.lexists(path):
            if os.path.islink(path) or not os.path.isdir(path):
                os.unlink(path)
            else:
                shutil.rmtree(path)
        os.mkdir(path, 0o700)
        return path

    def write_error(self, error: OSError) -> FeatxError:
        return write_error(error, self.out, self.path)


def changed_archives(work: WorkDir, shards: list[int], identities: list[str]) -> list[str]:
    """``shard file: made from X, now Y`` for each finished shard whose archive changed since."""
    changed = []
    for shard in shards:
        with h5py.File(work.shard_path(shard), "r") as f:
            made_from = f.attrs.get(schema.SHARD_ARCHIVE, "")
        made_from = made_from.decode() if isinstance(made_from, bytes) else str(made_from)
        if made_from != identities[shard]:
            changed.append(
                f"{work.shard_path(shard).name} was made from {made_from!r}, now "
                f"{identities[shard]!r}"
            )
    return changed


def work_dir_of(out: Path) -> Path:
    return out.with_name(out.name + ".featx")


def open_work_dir(
    out: Path, fingerprint: dict[str, Any], shard_size: int, total: int, overwrite: bool
) -> WorkDir:
    """Start or resume the shards for ``out``; a resume must match the fingerprint exactly.

    The folder is created private (0700). One that is a link, belongs to another user or is
    writable by others is refused (another user could have planted its shards); malformed
    content in it (``run.json``, stray shard files) is refused too, and ``--overwrite``
    discards it.
    """
    path = work_dir_of(out)
    problem = _untrusted(path)
    if problem and overwrite and "owned by" not in problem:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)  # a link: the link only, never what it points at
        problem = ""
    if problem:
        raise UsageError(
            f"{out}: the work folder {path} {problem}; featx will not trust or write it: "
            "remove it (or ask its owner to) or choose another -o"
        )
    if os.path.lexists(path):
        try:
            meta = _read_meta(path)
        except ValueError as error:
            if not overwrite:
                raise UsageError(
                    f"{out}: the work folder {path} is not a run of featx ({error}); pass "
                    "--overwrite to discard it"
                ) from None
            shutil.rmtree(path)
            return open_work_dir(out, fingerprint, shard_size, total, overwrite=False)
        changes = schema.differences(meta["fingerprint"], fingerprint)
        if meta.get("shard_size") != shard_size:
            changes.append(f"shard_size: {meta.get('shard_size')} → {shard_size}")
        if changes and overwrite:  # --overwrite discards a run of other settings only
            shutil.rmtree(path)
            return open_work_dir(out, fingerprint, shard_size, total, overwrite=False)
        if changes:
            raise ResumeMismatch(
                f"{out}: an unfinished run with other settings is in {path} "
                f"({'; '.join(changes)}); run it with its own settings to finish it, "
                f"or pass --overwrite to discard it"
            )
        return WorkDir(out, fingerprint, shard_size, total, meta["created"])
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # whatever the umask
    except FileExistsError:  # a torchrun rank or a racing run made it first: check it again
        return open_work_dir(out, fingerprint, shard_size, total, overwrite=False)
    created = datetime.now(UTC).isoformat(timespec="seconds")
    meta = {
        "fingerprint": fingerprint,
        "shard_size": shard_size,
        "total": total,
        "created": created,
        "schema": schema.SCHEMA_VERSION,
    }
    meta_path = path / RUN_JSON
    try:
        with atomic_output(meta_path, overwrite=True) as temporary:
            temporary.write_text(json.dumps(meta, indent=1))
    except OSError as error:
        raise FeatxError(f"cannot write {meta_path}: {error.strerror}") from None
    return open_work_dir(out, fingerprint, shard_size, total, overwrite=False)


RUN_JSON = "run.json"
MAX_RUN_JSON_BYTES = 16 << 20  # a fingerprint holds a digest, not the file list
_SHARD_NAME = re.compile(r"shard-(\d{6,})\.h5")


def _untrusted(path: Path) -> str:
    """Why the work folder at ``path`` cannot be trusted, or "" (also when there is none)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return ""
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link"
    if info.st_uid != os.geteuid():
        return f"is owned by another user (uid {info.st_uid})"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a folder"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "is writable by other users"
    return ""


def _read_meta(path: Path) -> dict[str, Any]:
    """``run.json`` of the work folder, checked; ValueError saying what is wrong with it or
    with the shard files beside it."""
    names = os.listdir(path)
    if RUN_JSON not in names:
        raise ValueError(f"no {RUN_JSON}")
    try:
        fd = os.open(path / RUN_JSON, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        raise ValueError(f"{RUN_JSON}: {error.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise ValueError(f"{RUN_JSON} is not a plain file of this user")
        if info.st_size > MAX_RUN_JSON_BYTES:
            raise ValueError(f"{RUN_JSON} is {info.st_size} bytes")
        with open(fd, "rb", closefd=False) as handle:
            meta = json.loads(handle.read(MAX_RUN_JSON_BYTES + 1))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError(f"{RUN_JSON} is not JSON") from None
    finally:
        os.close(fd)
    if not (
        isinstance(meta, dict)
        and isinstance(meta.get("fingerprint"), dict)
        and isinstance(meta.get("created"), str)
        and type(meta.get("shard_size")) is int
        and type(meta.get("total")) is int
        and meta["shard_size"] >= 1
        and meta["total"] >= 0
    ):
        raise ValueError(f"{RUN_JSON} lacks the fingerprint, created time, total or shard size")
    shard_count = len(shard_ranges(meta["total"], meta["shard_size"]))
    for name in names:
        match = _SHARD_NAME.fullmatch(name)
        if name.startswith("shard-") and (not match or int(match.group(1)) >= shard_count):
            raise ValueError(f"{name} is not one of its {shard_count} shards")
    return meta


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
        if self.rows == 0:
            self._create_datasets(batch.features)
        stop = self.rows + len(batch.indices)
        index = self.file[schema.SHARD_INDEX]
        index.resize((stop,))
        index[self.rows : stop] = np.asarray(batch.indices, dtype=np.int64)
        for layer, values in batch.features.items():
            dataset = self.file[f"{schema.FEATURES}/{layer}"]
            dataset.resize((stop, *dataset.shape[1:]))
            dataset[self.rows : stop] = values.astype(self.dtype, copy=False)
        self.rows = stop
        self.disk.check()

    def _create_datasets(self, features: dict[str, np.ndarray]) -> None:
        self.file.create_dataset(
            schema.SHARD_INDEX,
            shape=(0,),
            maxshape=(None,),
            dtype=np.int64,
            chunks=(min(4096, self.capacity),),
        )
        for layer, values in features.items():
            self.file.create_dataset(
                f"{schema.FEATURES}/{layer}",
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
    which and why: the run fails, and a resume reads it again). Shards whose rows are named by
    themselves (archives: ``identities`` given) also record the rows' names and raw labels and
    what the archive was, checked on resume."""

    ARCHIVE_ROWS = 4096  # chunking guess: img2dataset writes 10,000 samples per tar

    def __init__(
        self,
        work: WorkDir,
        dtype: str,
        compression: str = "none",
        identities: list[str] | None = None,
    ) -> None:
        self.work = work
        self.dtype = dtype
        self.compression = compression
        self.identities = identities  # by shard: each archive's URL, size and version
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
            capacity = self.ARCHIVE_ROWS if self.identities is not None else None
            writer = ShardWriter(self.work, shard, self.dtype, self.compression, capacity)
            self.open[shard] = _OpenShard(writer)
        held = self.open[shard]
        held.writer.append(
            ShardRows(rows.indices, rows.features, rows.failures + list(piece.failures))
        )
        held.names.extend(piece.names)
        held.labels.extend(piece.labels)
        if piece.last:
            self.open.pop(shard)
            if self.identities is None:
                held.writer.finish()
            else:
                held.writer.finish(
                    {schema.SHARD_NAMES: held.names, schema.SHARD_LABELS: held.labels},
                    {schema.SHARD_ARCHIVE: self.identities[shard]},
                )

    def discard(self) -> None:
        for held in self.open.values():
            held.writer.discard()
        self.open.clear()


@dataclass
class _OpenShard:
    writer: ShardWriter
    names: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
