"""Finished shards → the one output file users read (temporary name, then rename)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from featx.errors import FeatxError
from featx.store import schema
from featx.store.durable import atomic_output, writing_hdf5
from featx.store.shards import STRING, WorkDir, row_chunks


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
    """Concatenate finished shards into ``out``.

    ``paths`` (printable) and ``labels`` are the whole work list; shard ``index`` rows point
    into it.
    """
    layers, row_shapes, dtype = _shard_layout(work, shards)
    row_count, failed_count = count_rows(work, shards)
    compression = None if attrs.get("compression", "none") == "none" else "lzf"
    with atomic_output(out, overwrite=True) as temporary, writing_hdf5(temporary) as dst:
        outputs = {
            layer: dst.create_dataset(
                f"{schema.FEATURES}/{layer}",
                shape=(row_count, *row_shapes[layer]),
                dtype=dtype,
                chunks=row_chunks(row_shapes[layer], dtype, row_count) if row_count else None,
                compression=compression,
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
                index = src[schema.SHARD_INDEX][:]
                failed_index = src[schema.SHARD_FAILED_INDEX][:]
                _check_rows(work, shard, index, failed_index)
                for layer in layers if len(index) else []:  # every image here failed
                    copy_rows(src[f"{schema.FEATURES}/{layer}"], outputs[layer], row)
                out_paths.extend(paths[i] for i in index)
                out_labels.extend(labels[i] for i in index)
                failed_paths.extend(paths[i] for i in failed_index)
                failed_errors.extend(text(e) for e in src[schema.FAILED_ERRORS][:])
                row += len(index)
        write_strings(dst, schema.PATHS, out_paths)
        dst.create_dataset(schema.LABELS, data=np.asarray(out_labels, dtype=np.int64))
        write_strings(dst, schema.FAILED_PATHS, failed_paths)
        write_strings(dst, schema.FAILED_ERRORS, failed_errors)
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
    return Assembled(row_count, failed_count, out)


def count_rows(work: WorkDir, shards: range | list[int]) -> tuple[int, int]:
    """(good rows, failed files) in finished shards, without reading any features."""
    rows = failed = 0
    for shard in shards:
        with h5py.File(work.shard_path(shard), "r") as f:
            rows += f[schema.SHARD_INDEX].shape[0]
            failed += f[schema.SHARD_FAILED_INDEX].shape[0]
    return rows, failed


def _shard_layout(
    work: WorkDir, shards: range
) -> tuple[list[str], dict[str, tuple[int, ...]], np.dtype]:
    layers: list[str] = list(work.fingerprint["layers"])
    shapes: dict[str, tuple[int, ...]] = {}
    dtype = np.dtype(work.fingerprint["dtype"])
    for shard in shards:
        with h5py.File(work.shard_path(shard), "r") as f:
            if schema.FEATURES in f:
                shapes = {layer: f[f"{schema.FEATURES}/{layer}"].shape[1:] for layer in layers}
                break
    if not shapes:  # every image failed: keep the layout from the fingerprint
        shapes = {layer: tuple(work.fingerprint["shapes"][layer]) for layer in layers}
    return layers, shapes, dtype


def copy_rows(src: h5py.Dataset, dst: h5py.Dataset, offset: int, step: int = 1024) -> None:
    for start in range(0, src.shape[0], step):
        block = src[start : start + step]
        dst[offset + start : offset + start + len(block)] = block


def write_strings(f: h5py.File, name: str, values: list[str] | np.ndarray) -> None:
    f.create_dataset(name, data=np.asarray(values, dtype=object), dtype=STRING)


def write_attrs(f: h5py.File, attrs: dict[str, Any]) -> None:
    """Root attributes: scalars as they are, lists and dicts as JSON text."""
    for key, value in attrs.items():
        f.attrs[key] = schema.encode_attr(value)


def text(value: bytes | str) -> str:
    """An h5py string element as ``str`` (h5py returns bytes for variable-length strings)."""
    return value.decode() if isinstance(value, bytes) else value


def _check_rows(work: WorkDir, shard: int, *indices: np.ndarray) -> None:
    """FeatxError unless every row a shard file names lies in that shard's range."""
    start, stop = work.shard_range(shard)
    if any(len(rows) and (rows.min() < start or rows.max() >= stop) for rows in indices):
        raise FeatxError(
            f"{work.shard_path(shard)} names rows outside its shard ({start} to {stop - 1}); "
            "remove that file and run the same command again"
        )
