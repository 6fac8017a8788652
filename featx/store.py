"""Shards, fingerprint, lock, resume, assembly, merge, and the reader users import.

Why shards: a single growing HDF5 file whose writer is killed is unreadable, and a disk-full
error can corrupt every committed row. So the work list is cut into fixed-size shards
(``shard_size`` images each, independent of batch size and process count); each shard is
written to a temporary name, fsynced and atomically renamed into ``OUT.featx/``. A shard file
that exists is complete. A resume does only the missing shards, and the final file is assembled
from them, again through a temporary name and a rename. The shard numbering depends only on the
sorted work list, so one process, a torchrun job or N ``--shard K/N`` parts produce the same rows.

Layout of the work directory ``OUT.featx/``::

    run.json              fingerprint (what is computed) + created time + shard count
    shard-000007.h5       index [n] int64 (rows of the work list), features/<layer>, failed/*
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from featx.errors import FeatxError, OutputLocked, ResumeMismatch, UsageError

SCHEMA_VERSION = 1
STRING = h5py.string_dtype("utf-8")
CHUNK_BYTES = 1 << 20  # ~1 MB row chunks: fast appends, cheap partial reads


# --- fingerprint ------------------------------------------------------------------------------


def list_digest(paths: list[str], labels: list[int]) -> str:
    """sha256 over the exact work list (bytes of each path and its label)."""
    digest = hashlib.sha256()
    for path, label in zip(paths, labels, strict=True):
        digest.update(os.fsencode(path))
        digest.update(b"\0%d\n" % label)
    return digest.hexdigest()


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def shard_ranges(total: int, shard_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + shard_size, total)) for start in range(0, total, shard_size)]


def part_shards(shard_count: int, part: int, parts: int) -> range:
    """Part ``part`` of ``parts`` takes a contiguous block of shards, so parts concatenate."""
    return range(shard_count * part // parts, shard_count * (part + 1) // parts)


# --- durable files ----------------------------------------------------------------------------


def fsync_path(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(temporary: Path, final: Path) -> None:
    """Make ``temporary`` appear at ``final`` all at once, surviving a crash right after."""
    fsync_path(temporary)
    os.replace(temporary, final)
    fsync_path(final.parent)


def temporary_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")


class DiskFile:
    """The file h5py writes through (its ``fileobj`` driver), keeping a failed write to itself.

    HDF5 that sees a write fail (disk full, quota, ``ulimit -f``) cannot close its file any more
    and crashes the interpreter at exit. So the first write error is kept here and later writes
    are dropped: HDF5 closes cleanly, :meth:`check` raises the kept error, the file is deleted.
    """

    def __init__(self, path: Path) -> None:
        self.raw = open(path, "w+b", buffering=0)  # closed by close()
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        while len(view) and self.error is None:
            try:
                view = view[self.raw.write(view) :]  # raw writes may be partial
            except OSError as error:
                self.error = error
        return size

    def readinto(self, buffer: Any) -> int:
        return self.raw.readinto(buffer)

    def read(self, size: int = -1) -> bytes:
        return self.raw.read(size)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def truncate(self, size: int | None = None) -> int:
        try:
            return self.raw.truncate(size)
        except OSError as error:
            self.error = self.error or error
            return self.raw.tell()

    def flush(self) -> None:
        pass  # unbuffered

    def close(self) -> None:
        self.raw.close()

    def check(self) -> None:
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def writing_hdf5(path: Path) -> Iterator[h5py.File]:
    """``h5py.File(path, "w")`` through a :class:`DiskFile`: a failed write is raised as the
    OSError it was once HDF5 has closed cleanly."""
    disk = DiskFile(path)
    try:
        with h5py.File(disk, "w", track_order=True) as f:
            yield f
    finally:
        disk.close()
    disk.check()


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Refuse a second writer of the same output, whatever HDF5's own locking is set to.

    The lock file is featx's own (``.OUT.lock``); the kernel drops the flock when the
    holder dies, so a killed run never leaves a stale lock behind.
    """
    lock_path = out.with_name(f".{out.name}.lock")
    fd = _locked(lock_path, out)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"featx pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
        lock_path.unlink(missing_ok=True)  # tidy after success; a killed run leaves it, harmless
    finally:
        os.close(fd)


def _locked(lock_path: Path, out: Path) -> int:
    """An fd holding the flock on the file now at ``lock_path``."""
    while True:
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as error:
            raise UsageError(
                f"output {out}: cannot create files there ({error.strerror})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputLocked(
                f"output {out} is being written by {holder}; wait for it or choose another -o"
            ) from None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(lock_path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder finished and removed it just now: lock the one there now


# --- one run's work directory -----------------------------------------------------------------


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

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def work_dir_of(out: Path) -> Path:
    return out.with_name(out.name + ".featx")


def open_work_dir(
    out: Path, fingerprint: dict[str, Any], shard_size: int, total: int, overwrite: bool
) -> WorkDir:
    """Start or resume the shards for ``out``; a resume must match the fingerprint exactly."""
    path = work_dir_of(out)
    meta_path = path / "run.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        changes = fingerprint_diff(meta["fingerprint"], fingerprint)
        if meta.get("shard_size") != shard_size:
            changes.append(f"shard_size: {meta.get('shard_size')} → {shard_size}")
        if changes and overwrite:  # --overwrite discards a run of other settings only
            shutil.rmtree(path)
            return open_work_dir(out, fingerprint, shard_size, total, overwrite=False)
        if changes:
            raise ResumeMismatch(
                f"{out}: an unfinished run with other settings is in {path} "
                f"({'; '.join(changes)[:400]}); run it with its own settings to finish it, "
                f"or pass --overwrite to discard it"
            )
        return WorkDir(out, fingerprint, shard_size, total, meta["created"])
    path.mkdir(parents=True, exist_ok=True)
    created = datetime.now(UTC).isoformat(timespec="seconds")
    meta = {
        "fingerprint": fingerprint,
        "shard_size": shard_size,
        "total": total,
        "created": created,
        "schema": SCHEMA_VERSION,
    }
    temporary = temporary_name(meta_path)
    try:
        temporary.write_text(json.dumps(meta, indent=1))
        publish(temporary, meta_path)
    except OSError as error:
        raise FeatxError(f"cannot write {meta_path}: {error.strerror}") from None
    return open_work_dir(out, fingerprint, shard_size, total, overwrite=False)


class ShardWriter:
    """Append batches to one shard's temporary file; ``finish`` publishes it atomically."""

    def __init__(self, work: WorkDir, shard: int, dtype: str, compression: str = "none") -> None:
        self.compression = None if compression == "none" else compression
        self.final = work.shard_path(shard)
        self.temporary = temporary_name(self.final)
        self.capacity = len(range(*work.shard_range(shard)))  # no chunk bigger than the shard
        self.dtype = np.dtype(dtype)
        self.disk = DiskFile(self.temporary)
        self.file = h5py.File(self.disk, "w", track_order=True)
        self.file.attrs["shard"] = shard
        self.rows = 0
        self.failed_index: list[int] = []
        self.failed_errors: list[str] = []

    def append(
        self, indices: list[int], features: dict[str, np.ndarray], failures: list[tuple[int, str]]
    ) -> None:
        for index, error in failures:
            self.failed_index.append(index)
            self.failed_errors.append(error)
        if not indices:
            return
        count = len(indices)
        if self.rows == 0:
            self.file.create_dataset(
                "index",
                shape=(0,),
                maxshape=(None,),
                dtype=np.int64,
                chunks=(min(4096, self.capacity),),
            )
            for layer, values in features.items():
                self.file.create_dataset(
                    f"features/{layer}",
                    shape=(0, *values.shape[1:]),
                    maxshape=(None, *values.shape[1:]),
                    dtype=self.dtype,
                    chunks=row_chunks(values.shape[1:], self.dtype, self.capacity),
                    compression=self.compression,
                )
        stop = self.rows + count
        self.file["index"].resize((stop,))
        self.file["index"][self.rows : stop] = np.asarray(indices, dtype=np.int64)
        for layer, values in features.items():
            dataset = self.file[f"features/{layer}"]
            dataset.resize((stop, *dataset.shape[1:]))
            dataset[self.rows : stop] = values.astype(self.dtype, copy=False)
        self.rows = stop
        self.disk.check()

    def finish(self) -> None:
        order = np.argsort(np.asarray(self.failed_index, dtype=np.int64), kind="stable")
        self.file.create_dataset(
            "failed/index", data=np.asarray(self.failed_index, np.int64)[order]
        )
        self.file.create_dataset(
            "failed/errors",
            data=np.asarray(self.failed_errors, dtype=object)[order]
            if self.failed_errors
            else np.zeros(0, dtype=object),
            dtype=STRING,
        )
        if self.rows == 0:
            self.file.create_dataset("index", data=np.zeros(0, np.int64))
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


# --- assembly ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Assembled:
    rows: int
    failed: int
    path: Path


def assemble(
    work: WorkDir,
    shards: range,
    paths: list[str],
    labels: list[int],
    attrs: dict[str, Any],
    out: Path,
    row_range: tuple[int, int],
) -> Assembled:
    """Concatenate finished shards into ``out`` (temporary name, then rename).

    ``paths``/``labels`` are the whole work list; shard ``index`` rows point into it.
    """
    from featx.images import printable

    layers, row_shapes, dtype = _shard_layout(work, shards)
    row_count, failed_count = count_rows(work, shards)
    temporary = temporary_name(out)
    try:
        with writing_hdf5(temporary) as dst:
            outputs = {
                layer: dst.create_dataset(
                    f"features/{layer}",
                    shape=(row_count, *row_shapes[layer]),
                    dtype=dtype,
                    chunks=row_chunks(row_shapes[layer], dtype, row_count) if row_count else None,
                    compression=None if attrs.get("compression", "none") == "none" else "lzf",
                )
                for layer in layers
            }
            out_paths: list[str] = []
            out_labels: list[int] = []
            failed_paths: list[str] = []
            failed_errors: list[str] = []
            row = 0
            for shard in shards:
                with h5py.File(work.shard_path(shard), "r") as src:
                    index = src["index"][:]
                    for layer in layers if len(index) else []:  # every image here failed
                        copy_rows(src[f"features/{layer}"], outputs[layer], row)
                    out_paths.extend(printable(paths[i]) for i in index)
                    out_labels.extend(labels[i] for i in index)
                    failed_paths.extend(printable(paths[i]) for i in src["failed/index"][:])
                    failed_errors.extend(
                        e.decode() if isinstance(e, bytes) else e for e in src["failed/errors"][:]
                    )
                    row += len(index)
            dst.create_dataset("paths", data=np.asarray(out_paths, dtype=object), dtype=STRING)
            dst.create_dataset("labels", data=np.asarray(out_labels, dtype=np.int64))
            dst.create_dataset(
                "failed/paths", data=np.asarray(failed_paths, dtype=object), dtype=STRING
            )
            dst.create_dataset(
                "failed/errors", data=np.asarray(failed_errors, dtype=object), dtype=STRING
            )
            write_attrs(
                dst,
                {
                    **attrs,
                    "complete": True,
                    "rows_from": row_range[0],
                    "rows_to": row_range[1],
                    "created": work.created,
                },
            )
        publish(temporary, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    return Assembled(row_count, failed_count, out)


def count_rows(work: WorkDir, shards: range) -> tuple[int, int]:
    """(good rows, failed files) in finished shards, without reading any features."""
    rows = failed = 0
    for shard in shards:
        with h5py.File(work.shard_path(shard), "r") as f:
            rows += f["index"].shape[0]
            failed += f["failed/index"].shape[0]
    return rows, failed


def _shard_layout(work: WorkDir, shards: range) -> tuple[list[str], dict[str, tuple], np.dtype]:
    layers: list[str] = list(work.fingerprint["layers"])
    shapes: dict[str, tuple] = {}
    dtype = np.dtype(work.fingerprint["dtype"])
    for shard in shards:
        with h5py.File(work.shard_path(shard), "r") as f:
            if "features" in f:
                shapes = {layer: f[f"features/{layer}"].shape[1:] for layer in layers}
                break
    if not shapes:  # every image failed: keep the layout from the fingerprint
        shapes = {layer: tuple(work.fingerprint["shapes"][layer]) for layer in layers}
    return layers, shapes, dtype


def copy_rows(src: h5py.Dataset, dst: h5py.Dataset, offset: int, step: int = 1024) -> None:
    for start in range(0, src.shape[0], step):
        block = src[start : start + step]
        dst[offset + start : offset + start + len(block)] = block


def write_attrs(f: h5py.File, attrs: dict[str, Any]) -> None:
    """Root attributes: scalars as they are, lists and dicts as JSON text."""
    for key, value in attrs.items():
        if isinstance(value, (list, dict, tuple)):
            f.attrs[key] = json.dumps(value)
        elif value is None:
            f.attrs[key] = "null"
        elif isinstance(value, str):
            f.attrs[key] = str(value)  # str subclasses (torch.__version__) confuse h5py
        else:
            f.attrs[key] = value


def check_writable(out: Path) -> None:
    """Fail before any work when the output's folder is missing or read-only."""
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"output {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"output {out}: folder {parent} is not writable")
    if out.is_dir():
        raise UsageError(f"output {out} is a directory")


def write_error(error: OSError, work: WorkDir) -> FeatxError:
    """One line for a failed write, saying that finished shards are kept for a resume."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return FeatxError(
            f"cannot write {work.out}: {error.strerror} (disk full, quota or file-size limit); "
            f"finished shards are kept in {work.path}: free some space and run the same "
            "command again to resume"
        )
    return FeatxError(
        f"cannot write {work.out}: {error.strerror or error}; finished shards are kept in "
        f"{work.path}: fix the cause and run the same command again to resume"
    )


class ShardSink:
    """Routes batches to per-shard files; a shard is published when its last batch arrives."""

    def __init__(self, work: WorkDir, dtype: str, compression: str = "none") -> None:
        self.work = work
        self.dtype = dtype
        self.compression = compression
        self.open: dict[int, ShardWriter] = {}
        self.busy_s = 0.0  # time spent writing: `featx bench` reports its share of the run

    def handle(self, item: tuple[dict[str, Any], dict[str, Any]]) -> None:
        started = time.perf_counter()
        try:
            self._write(item)
        finally:
            self.busy_s += time.perf_counter() - started

    def _write(self, item: tuple[dict[str, Any], dict[str, Any]]) -> None:
        batch, features = item
        every = batch["indices"] + [index for index, _ in batch["failures"]]
        shard = min(every) // self.work.shard_size
        try:
            writer = self.open.get(shard) or self.open.setdefault(
                shard, ShardWriter(self.work, shard, self.dtype, self.compression)
            )
            writer.append(batch["indices"], features, batch["failures"])
            if max(every) == self.work.shard_range(shard)[1] - 1:
                writer.finish()
                del self.open[shard]
        except OSError as error:
            self.discard()
            raise write_error(error, self.work) from None

    def discard(self) -> None:
        for writer in self.open.values():
            writer.discard()
        self.open.clear()
