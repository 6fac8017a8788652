"""Finished shards → the one output file users read (temporary name, then rename)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np

from featx.errors import FeatxError, UsageError
from featx.safe_text import stored_name as printable
from featx.store import schema
from featx.store.durable import atomic_output, writing_hdf5
from featx.store.features_file import FeaturesWriter
from featx.store.workdir import WorkDir


@dataclass(frozen=True)
class Assembled:
    rows: int
    failed: int
    path: Path


class RowTable(Protocol):
    """Names and labels of the rows a shard file's ``index`` points at."""

    def of(self, shard: int, src: h5py.File) -> tuple[Sequence[str], Sequence[int]]: ...

    def bounds(self, shard: int, src: h5py.File) -> tuple[int, int]: ...


@dataclass(frozen=True)
class WorkListRows:
    """A folder's or list's rows: shard ``index`` values are rows of the whole work list."""

    work: WorkDir
    paths: list[str]  # printable
    labels: list[int]

    def of(self, shard: int, src: h5py.File) -> tuple[Sequence[str], Sequence[int]]:
        return self.paths, self.labels

    def bounds(self, shard: int, src: h5py.File) -> tuple[int, int]:
        return self.work.shard_range(shard)


@dataclass(frozen=True)
class ArchiveRows:
    """An archive's rows: each shard file holds its rows' names and raw labels; rows are named
    ``<archive>/<member>`` and labels become class indices by ``classes``."""

    archive_names: list[str]
    classes: dict[str, int]  # raw label (JSON text) → class index; others: -1

    def of(self, shard: int, src: h5py.File) -> tuple[Sequence[str], Sequence[int]]:
        prefix = printable(self.archive_names[shard]) + "/"
        names = [prefix + text(n) for n in src[schema.SHARD_NAMES][:]]  # stored printable
        labels = [self.classes.get(text(v), -1) for v in src[schema.SHARD_LABELS][:]]
        return names, labels

    def bounds(self, shard: int, src: h5py.File) -> tuple[int, int]:
        return 0, src[schema.SHARD_NAMES].shape[0]


def archive_classes(
    work: WorkDir, shards: range, named: Sequence[str] = ()
) -> tuple[list[str], dict[str, int]]:
    """Class names and the raw label → index map over the labels of every shard, decided here
    (at assembly) so that ranks need not agree in advance: integer labels (``.cls``) keep their
    number (class names ``named``, from ``--class-names``, or "0" … max), strings are numbered
    in sorted order."""
    raw: set[str] = set()
    for shard in shards:
        with h5py.File(work.shard_path(shard), "r") as f:
            raw.update(text(v) for v in f[schema.SHARD_LABELS][:])
    values = {v: json.loads(v) for v in raw if v != "null"}
    if named:
        _check_named(values, len(named))
        return list(named), {k: int(v) for k, v in values.items()}
    if values and all(isinstance(v, int) for v in values.values()):
        top = max(values.values())
        return [str(i) for i in range(top + 1)], {k: int(v) for k, v in values.items()}
    names = sorted({str(v) for v in values.values()}, key=schema.class_order)
    index = {name: i for i, name in enumerate(names)}
    return names, {k: index[str(v)] for k, v in values.items()}


def _check_named(values: dict[str, Any], count: int) -> None:
    """UsageError unless every label is a class number that ``--class-names`` names (the
    finished shards stay: the same command with a corrected file only assembles)."""
    others = [v for v in values.values() if type(v) is not int]
    if others:
        example = others[0]
        raise UsageError(
            f"--class-names names class numbers, but the archives' labels are not numbers "
            f"(e.g. {str(example)[:50]!r}); leave --class-names out"
        )
    unnamed = sorted(v for v in values.values() if not 0 <= v < count)
    if unnamed:
        raise UsageError(
            f"--class-names names classes 0 to {count - 1}, but the archives hold class "
            f"{unnamed[0]}{' and more' if len(unnamed) > 1 else ''}; add a line for each class"
        )


def assemble(
    work: WorkDir,
    shards: range,
    rows_of: RowTable,
    attrs: dict[str, Any],
    out: Path,
    row_range: tuple[int, int],
) -> Assembled:
    """Concatenate finished shards into ``out``; ``rows_of`` names and labels their rows."""
    row_shapes, dtype = _shard_layout(work, shards)
    row_count, failed_count = count_rows(work, shards)
    attrs = {
        **attrs,
        "complete": True,
        "rows_from": row_range[0],
        "rows_to": row_range[1],
        "created": work.created,
    }
    with atomic_output(out, overwrite=True) as temporary, writing_hdf5(temporary) as dst:
        writer = FeaturesWriter(dst, attrs)
        for name, row_shape in row_shapes.items():
            writer.features(name, row_count, row_shape, dtype)
        out_paths: list[str] = []
        out_labels: list[int] = []
        failed_paths: list[str] = []
        failed_errors: list[str] = []
        for shard in shards:
            with h5py.File(work.shard_path(shard), "r") as src:
                index = src[schema.SHARD_INDEX][:]
                failed_index = src[schema.SHARD_FAILED_INDEX][:]
                _check_rows(work, shard, rows_of.bounds(shard, src), index, failed_index)
                for name in row_shapes if len(index) else []:  # every image here failed
                    writer.copy(name, src[name])
                paths, labels = rows_of.of(shard, src)
                out_paths.extend(paths[i] for i in index)
                out_labels.extend(labels[i] for i in index)
                failed_paths.extend(paths[i] for i in failed_index)
                failed_errors.extend(text(e) for e in src[schema.FAILED_ERRORS][:])
        writer.finish(out_paths, out_labels, failed_paths, failed_errors)
    return Assembled(row_count, failed_count, out)


def count_rows(work: WorkDir, shards: range | list[int]) -> tuple[int, int]:
    """(good rows, failed files) in finished shards, without reading any features."""
    rows = failed = 0
    for shard in shards:
        with h5py.File(work.shard_path(shard), "r") as f:
            rows += f[schema.SHARD_INDEX].shape[0]
            failed += f[schema.SHARD_FAILED_INDEX].shape[0]
    return rows, failed


def _shard_layout(work: WorkDir, shards: range) -> tuple[dict[str, tuple[int, ...]], np.dtype]:
    """Each row dataset's name and row shape (``schema.row_datasets``), and the dtype."""
    fingerprint = work.fingerprint
    views = int((fingerprint.get("augment") or {}).get("views", 0))
    shapes: dict[str, tuple[int, ...]] = {}
    for name in schema.row_datasets(fingerprint):
        group, layer = name.split("/", 1)
        shape = tuple(fingerprint["shapes"][layer])  # a views row: K of the layer's rows
        shapes[name] = (views, *shape) if group == schema.VIEWS else shape
    for shard in shards:
        with h5py.File(work.shard_path(shard), "r") as f:
            if schema.FEATURES in f:
                shapes = {name: f[name].shape[1:] for name in shapes}
                break
    return shapes, np.dtype(fingerprint["dtype"])


def text(value: bytes | str) -> str:
    """An h5py string element as ``str`` (h5py returns bytes for variable-length strings)."""
    return value.decode() if isinstance(value, bytes) else value


def _check_rows(work: WorkDir, shard: int, bounds: tuple[int, int], *indices: np.ndarray) -> None:
    """FeatxError unless every row a shard file names lies in that shard's range."""
    start, stop = bounds
    if any(len(rows) and (rows.min() < start or rows.max() >= stop) for rows in indices):
        raise FeatxError(
            f"{work.shard_path(shard)} names rows outside its shard ({start} to {stop - 1}); "
            "remove that file and run the same command again"
        )
