"""A parquet cell read where it is decoded: in a decode worker. The main process reads a local
parquet shard's small columns (key, status, label) and hands each image out as a
:class:`~featx.data.work.ParquetCell`; a worker reads that row group's image column, which the
main process has bounded from the footer (:data:`WORKER_ROW_GROUP_BYTES`), keeps the last one
it read (a batch's rows are consecutive: most share a row group), and takes the cell out of
it without expanding the column (it is read dictionary-encoded).
"""

from __future__ import annotations

import os
import stat
from typing import Any

from featx.data.work import ParquetCell

# A row group's image column that a worker may read and keep (uncompressed, from the footer);
# bigger ones are read once, in the main process. img2dataset writes 100 rows per row group.
WORKER_ROW_GROUP_BYTES = 64 << 20

_kept: tuple[tuple[str, int, str], Any] | None = None  # this process's last row group column


class NoImage(ValueError):
    """A parquet row without image bytes (its cell is null)."""


def read_cell(cell: ParquetCell, max_bytes: int) -> bytes:
    """The image bytes of ``cell``, refused over ``max_bytes`` before they are copied out."""
    import pyarrow.compute as pc

    column = _row_group_column(cell)
    if cell.row >= len(column):
        raise OSError("the parquet file changed since it was listed")
    index = column.indices[cell.row].as_py()
    if index is None:
        raise NoImage("the row's image cell is empty")
    size = pc.binary_length(column.dictionary[index : index + 1])[0].as_py()
    if size > max_bytes:
        raise ValueError(f"file of {size} bytes, over the --max-file-bytes limit of {max_bytes}")
    data: bytes = column.dictionary[index].as_py()
    return data


def _row_group_column(cell: ParquetCell) -> Any:
    global _kept
    key = (cell.path, cell.group, cell.column)
    if _kept is not None and _kept[0] == key:
        return _kept[1]
    _kept = None  # the last one is dropped before the next is read: one at a time
    import pyarrow.parquet as pq

    # The path is the real one the main process listed: a link put there since is refused.
    fd = os.open(cell.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    with open(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError("the parquet file is no longer a regular file")
        table = pq.ParquetFile(handle, read_dictionary=[cell.column])
        if cell.group >= table.num_row_groups:
            raise OSError("the parquet file changed since it was listed")
        group = table.metadata.row_group(cell.group)
        if image_bytes(group, cell.column) > WORKER_ROW_GROUP_BYTES:
            raise OSError("the parquet file changed since it was listed")
        rows = table.read_row_group(cell.group, columns=[cell.column])
    column = rows.column(cell.column).combine_chunks()
    _kept = (key, column)
    return column


def image_bytes(group: Any, column: str) -> int:
    """The uncompressed bytes of ``column`` in a row group, from the footer."""
    chunks = (group.column(j) for j in range(group.num_columns))
    return sum(c.total_uncompressed_size for c in chunks if c.path_in_schema == column)
