"""A features file as plain numpy files or one Parquet table, for tools that expect those
(thingsvision's ``.npy``, clip-retrieval's Parquet metadata). Rows stay in the file's order and
are copied in blocks, so a file larger than memory exports too.

``npy``: a folder with ``<layer>.npy`` per layer, ``paths.npy`` and ``class_names.npy`` (unicode
arrays: ``np.load`` needs no pickle) and ``labels.npy`` (int64, -1 unlabelled).
``parquet``: one table with ``path``, ``label``, ``class_name`` and one column per layer (a
fixed-size list of the row's flattened features); the file's attributes ride along as the
schema's ``featx`` metadata (JSON). Parquet needs pyarrow: ``pip install 'featx[parquet]'``.

A file extracted with ``--augment K`` keeps its grouping: rows stay images, and each image's K
augmented views ride along in its row, as ``views/<layer>.npy`` ``[n, K, ...]`` (row i's views
of ``paths.npy``'s row i) or a Parquet column ``views/<layer>`` (a fixed-size list of K views,
each a fixed-size list of its flattened features). A file without views exports as before.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featx.errors import UsageError
from featx.store.durable import atomic_output, check_writable, refuse_existing
from featx.store.reader import FeatureFile

FORMATS = ("npy", "parquet")
BLOCK_ROWS = 4096


@dataclass(frozen=True)
class ExportResult:
    """What ``export`` wrote; ``featx export --json`` prints it."""

    output: str
    format: str
    rows: int
    layers: list[str]
    files: list[str]
    views_per_image: int = 1  # 1 + K with --augment K: each row's K views written beside it

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_output(features: str | os.PathLike[str], fmt: str) -> Path:
    """``feats.h5`` → ``feats.parquet`` or the folder ``feats_npy``."""
    base = Path(features).with_suffix("")
    return base.with_name(base.name + "_npy") if fmt == "npy" else base.with_suffix(".parquet")


def export(
    features: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    fmt: str = "npy",
    layers: list[str] | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write the features (every layer, or ``layers``), paths, labels and class names of a
    featx file as ``fmt`` (``npy`` or ``parquet``) at ``out`` [``default_output``].

    Example: ``export("feats.h5", fmt="parquet").output == "feats.parquet"``
    """
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    target = Path(out) if out is not None else default_output(features, fmt)
    # The folder of an npy export may exist (--overwrite): then files are checked inside it.
    check_writable(target / "labels.npy" if target.is_dir() and fmt == "npy" else target)
    refuse_existing(target, overwrite)
    with FeatureFile(features) as data:
        chosen = [data.layer(name) for name in layers] if layers else data.layers
        if fmt == "npy":
            files = _write_npy(data, chosen, target, overwrite)
        else:
            files = [str(target)]
            with atomic_output(target, overwrite) as temporary:
                _write_parquet(data, chosen, temporary)
        return ExportResult(str(target), fmt, len(data), chosen, files, 1 + data.augmented_views)


def _blocks(rows: int) -> Iterator[slice]:
    for start in range(0, rows, BLOCK_ROWS):
        yield slice(start, min(start + BLOCK_ROWS, rows))


def _write_npy(data: FeatureFile, layers: list[str], folder: Path, overwrite: bool) -> list[str]:
    folder.mkdir(exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "paths": np.array(data.paths, dtype=str),
        "labels": data.labels.astype(np.int64),
        "class_names": np.array(data.class_names, dtype=str),
    }
    written = []
    for name, array in arrays.items():
        path = folder / f"{name}.npy"
        with atomic_output(path, overwrite) as temporary:
            with open(temporary, "wb") as handle:
                np.save(handle, array, allow_pickle=False)
        written.append(str(path))
    for layer in layers:
        name = f"{layer.replace(os.sep, '_')}.npy"
        written.append(_write_array(data.features(layer), folder / name, overwrite))
        views = data.views(layer)
        if views is not None:
            (folder / "views").mkdir(exist_ok=True)
            written.append(_write_array(views, folder / "views" / name, overwrite))
    return written


def _write_array(source: Any, path: Path, overwrite: bool) -> str:
    """One dataset as one ``.npy`` file, copied in blocks of rows."""
    with atomic_output(path, overwrite) as temporary:
        if len(source) == 0:
            with open(temporary, "wb") as handle:
                np.save(handle, np.zeros(source.shape, source.dtype), allow_pickle=False)
        else:
            target = np.lib.format.open_memmap(
                temporary, mode="w+", dtype=source.dtype, shape=source.shape
            )
            for rows in _blocks(len(source)):
                target[rows] = source[rows]
            target.flush()
            del target
    return str(path)


def _write_parquet(data: FeatureFile, layers: list[str], path: Path) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError("--format parquet needs pyarrow: pip install 'featx[parquet]'") from None
    names = data.class_names
    widths = {layer: int(np.prod(data.features(layer).shape[1:])) for layer in layers}
    fields = [
        pa.field("path", pa.string()),
        pa.field("label", pa.int64()),
        pa.field("class_name", pa.string()),
    ]
    views = data.augmented_views
    view_sets = {name: v for name in layers if (v := data.views(name)) is not None}
    for layer in layers:
        kind = pa.from_numpy_dtype(data.features(layer).dtype)
        fields.append(pa.field(layer, pa.list_(kind, widths[layer])))
    for layer in view_sets:
        kind = pa.from_numpy_dtype(data.features(layer).dtype)
        fields.append(pa.field(f"views/{layer}", pa.list_(pa.list_(kind, widths[layer]), views)))
    metadata = {"featx": json.dumps({**data.attrs, "layers": layers}, default=str)}
    schema = pa.schema(fields, metadata=metadata)
    labels = data.labels
    with pq.ParquetWriter(str(path), schema) as writer:
        for rows in _blocks(len(data)):
            block_labels = labels[rows]
            columns: list[Any] = [
                pa.array(data.paths_between(rows.start, rows.stop), pa.string()),
                pa.array(block_labels, pa.int64()),
                pa.array([names[i] if i >= 0 else None for i in block_labels], pa.string()),
            ]
            for layer in layers:
                values = data.features(layer)[rows].reshape(len(block_labels), -1)
                columns.append(
                    pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), widths[layer])
                )
            for layer, dataset in view_sets.items():
                values = dataset[rows].reshape(len(block_labels) * views, -1)
                each = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), widths[layer])
                columns.append(pa.FixedSizeListArray.from_arrays(each, views))
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))
        if len(data) == 0:
            writer.write_table(schema.empty_table())
