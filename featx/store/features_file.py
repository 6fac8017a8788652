"""The one writer of the features file users read (layout in ``store.schema``).

Assembly (shards → the output) and merge (``--shard K/N`` parts → one file) both write through
:class:`FeaturesWriter`, so the datasets, their chunking and compression, and every root
attribute are the same whichever made the file; the compression the ``compression`` attribute
names is the compression the datasets have.
"""

from __future__ import annotations

from typing import Any

import h5py
import numpy as np

from featx.store import schema
from featx.store.shards import STRING, row_chunks


class FeaturesWriter:
    """Fills an open, empty HDF5 file: each row dataset, ``features/<layer>`` and with
    ``--augment`` ``views/<layer>`` (created with :meth:`features`, filled in pieces with
    :meth:`copy`, or mapped with :meth:`view`), then the rows' names and labels, the failed
    files and the root attributes ``attrs`` (:meth:`finish`).

    Example::

        writer = FeaturesWriter(dst, {**fingerprint, "compression": "lzf"})
        writer.features("features/layer4", rows=10, row_shape=(512,), dtype=np.dtype("float32"))
        writer.copy("features/layer4", shard["features/layer4"])
        writer.finish(paths, labels, failed_paths, failed_errors)
    """

    def __init__(self, dst: h5py.File, attrs: dict[str, Any]) -> None:
        self.dst = dst
        self.attrs = attrs
        compression = attrs.get("compression", "none")
        self.compression = None if compression == "none" else str(compression)
        self.filled: dict[str, int] = {}  # rows written so far, by dataset

    def features(
        self, name: str, rows: int, row_shape: tuple[int, ...], dtype: np.dtype
    ) -> h5py.Dataset:
        """Row dataset ``name`` for ``rows`` rows, in chunks of whole rows, compressed as the
        ``compression`` attribute says."""
        self.filled[name] = 0
        return self.dst.create_dataset(
            name,
            shape=(rows, *row_shape),
            dtype=dtype,
            chunks=row_chunks(row_shape, dtype, rows) if rows else None,
            compression=self.compression,
        )

    def copy(self, name: str, src: h5py.Dataset, step: int = 1024) -> None:
        """Append the rows of ``src`` to row dataset ``name``, ``step`` rows at a time."""
        offset = self.filled[name]
        copy_rows(src, self.dst[name], offset, step)
        self.filled[name] = offset + src.shape[0]

    def view(self, name: str, layout: h5py.VirtualLayout) -> None:
        """Row dataset ``name`` as a virtual dataset: rows stay in the files ``layout`` maps
        (and keep the compression they have there)."""
        self.dst.create_virtual_dataset(name, layout, fillvalue=0)

    def finish(
        self,
        paths: list[str] | np.ndarray,
        labels: list[int] | np.ndarray,
        failed_paths: list[str] | np.ndarray,
        failed_errors: list[str] | np.ndarray,
    ) -> None:
        """The rows' names and class indices, the files that failed and why, and the root
        attributes."""
        write_strings(self.dst, schema.PATHS, paths)
        self.dst.create_dataset(schema.LABELS, data=np.asarray(labels, dtype=np.int64))
        write_strings(self.dst, schema.FAILED_PATHS, failed_paths)
        write_strings(self.dst, schema.FAILED_ERRORS, failed_errors)
        write_attrs(self.dst, self.attrs)


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
