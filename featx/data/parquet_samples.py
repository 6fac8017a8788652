"""An img2dataset parquet shard → its samples: image bytes in a column (``jpg``, ``png``,
``webp`` or ``image``), ``None`` where the download failed (a failure here, with img2dataset's
own status and error message), rows named by the ``key`` column.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterator
from typing import Any, BinaryIO

from featx.data import remote
from featx.data.archives import ArchiveList, Sample
from featx.data.filesystem import filesystem_of
from featx.data.parquet_cells import WORKER_ROW_GROUP_BYTES, image_bytes
from featx.data.remote import local_path
from featx.data.tar_samples import BrokenArchive, json_field
from featx.data.work import ParquetCell
from featx.errors import UsageError
from featx.limits import MAX_CLASSES
from featx.safe_text import public_url, shortlist

IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image")
MAX_ROW_GROUP_BYTES = 1 << 30  # read at once: a row group's columns, and its images copied out


def parquet_module() -> Any:
    """``pyarrow.parquet``, or the one line that says how to install it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError("parquet shards need pyarrow: pip install 'featx[parquet]'") from None
    return pq


def check_parquet_shards(archives: ArchiveList) -> None:
    """Refuse, before any model loads, parquet shards that cannot give images: pyarrow
    missing, or a shard whose schema (its footer, read alone) has no image column
    (img2dataset's ``files`` and ``webdataset`` formats write metadata-only parquet files).
    Every local shard is checked; of remote ones the first only (a listing of a million shards
    must not start a million requests), by two range requests; a server that answers none
    (some plain HTTP servers) leaves that check to when the shard is fetched."""
    if archives.kind != "parquet":
        return
    pq = parquet_module()
    remote_checked = False
    for archive in archives.archives:
        if filesystem_of(archive.url).remote:
            if remote_checked:
                continue
            remote_checked = True
            names = _remote_column_names(pq, archive.url)
        else:
            names = _local_column_names(pq, archive.url)
        if names is not None:
            _check_columns(public_url(archive.url), names, archives.label_from)


def _check_columns(url: str, names: list[str], label_from: str) -> None:
    if not any(column in names for column in IMAGE_COLUMNS):
        raise UsageError(
            f"{url}: a parquet file without an image column (looked for "
            f"{', '.join(IMAGE_COLUMNS)}): metadata, not image shards"
        )
    if label_from.startswith("json:") and _label_column(label_from, names) is None:
        field = label_from[5:].split(".")[0]
        raise UsageError(
            f"{url}: --label-from {label_from}: no column {field!r} (its columns: "
            f"{shortlist(names, 20)})"
        )


def _local_column_names(pq: Any, path: str) -> list[str]:
    try:
        with _opened(local_path(path)) as handle:
            return list(pq.read_schema(handle).names)
    except Exception as error:
        raise UsageError(f"{path}: not a parquet file ({error})") from None


MAX_FOOTER_BYTES = 64 << 20  # a remote shard's footer (schema and row-group index), read whole
_TAIL = 8  # the footer's length (4 bytes, little-endian) and the magic "PAR1"


def _remote_column_names(pq: Any, url: str) -> list[str] | None:
    """The column names in a remote parquet file's footer, from two range reads (the last 8
    bytes, then the footer they size, under :data:`MAX_FOOTER_BYTES`); None when the server
    does not answer range requests or give the file's size."""
    import pyarrow as pa

    fs, path = remote.filesystem(url)
    with remote.asking(url, "no such file"):
        size = fs.info(path).get("size")
        if size is None:  # a server that does not say: checked when fetched
            return None
        try:
            tail = _range(fs, path, size - _TAIL, size) if size >= 2 * _TAIL else b""
            footer = _footer_length(tail, size, url)
            data = _range(fs, path, size - _TAIL - footer, size - _TAIL)
        except NoRanges:
            return None
    if len(data) != footer:
        raise UsageError(f"{public_url(url)}: not a parquet file (its footer is cut short)")
    try:  # the footer alone, framed as a file: its schema is all that is read
        return list(pq.read_schema(pa.BufferReader(b"PAR1" + data + tail)).names)
    except Exception as error:
        raise UsageError(f"{public_url(url)}: not a parquet file ({error})") from None


class NoRanges(Exception):
    """The server sent a whole file, or refused, where a byte range was asked for."""


def _range(fs: Any, path: str, start: int, end: int) -> bytes:
    """Bytes ``start``..``end`` of a remote file: one ranged GET from an object store; over
    HTTP, NoRanges when the server ignores ranges (an answer that is not a range is refused
    before its body is read)."""
    data: bytes
    if not remote.is_http(fs):
        data = bytes(fs.cat_file(path, start=start, end=end))
    else:
        try:
            with fs.open(path, "rb", block_size=end - start, cache_type="none", size=end) as f:
                f.seek(start)
                data = f.read(end - start)
        except ValueError as error:  # fsspec's HTTP file: "doesn't appear to support ranges"
            raise NoRanges(str(error)) from None
    if len(data) > end - start:
        raise NoRanges("more bytes than asked for")
    return data


def _footer_length(tail: bytes, size: int, url: str) -> int:
    if len(tail) != _TAIL or tail[4:] != b"PAR1":
        raise UsageError(f"{public_url(url)}: not a parquet file (no PAR1 at its end)")
    footer = int.from_bytes(tail[:4], "little")
    if footer > min(MAX_FOOTER_BYTES, size - 2 * _TAIL + 4):
        raise UsageError(
            f"{public_url(url)}: not a parquet file we read (its footer claims {footer} bytes; "
            f"the limit is {MAX_FOOTER_BYTES})"
        )
    return footer


def parquet_samples(path: str, label_from: str, max_bytes: int) -> Iterator[Sample]:
    """The samples of a parquet shard, one row group at a time: each row group's size is
    checked before it is read (its column chunks' uncompressed sizes, from the footer) and
    before its cells are copied out (their sizes, from the offsets: a dictionary-encoded
    column stays encoded, so one cell repeated a million times is counted, not expanded).
    With a ``status`` column and row groups whose image column a worker may keep
    (:data:`~featx.data.parquet_cells.WORKER_ROW_GROUP_BYTES`), only the small columns are
    read here and each image is a :class:`ParquetCell` for a worker to read; a row whose
    ``status`` is not ``success`` is img2dataset's failed download."""
    pq = parquet_module()
    with _opened(path) as handle:
        cells_of = os.path.realpath(path)  # the workers open it without following a link
        yield from _row_groups(pq, handle, label_from, max_bytes, cells_of)


@contextlib.contextmanager
def _opened(path: str) -> Iterator[BinaryIO]:
    """The file at ``path`` if it is a regular file (a FIFO's open cannot hang, nor a device's
    read run for ever), else BrokenArchive."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise BrokenArchive(error.strerror or str(error)) from None
    with open(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BrokenArchive("not a regular file (a FIFO, device or folder named like one)")
        yield handle


def _row_groups(
    pq: Any, handle: Any, label_from: str, max_bytes: int, cells_of: str
) -> Iterator[Sample]:
    try:
        schema = pq.read_schema(handle)
        # Strings and bytes are read dictionary-encoded as stored: sized before expanded.
        text = [f.name for f in schema if _is_text(f.type)]
        table = pq.ParquetFile(handle, read_dictionary=text)
    except Exception as error:
        raise BrokenArchive(f"not a parquet file ({error})") from None
    names = schema.names
    image = next((c for c in IMAGE_COLUMNS if c in names), None)
    if image is None:
        raise BrokenArchive(f"no image column (looked for {', '.join(IMAGE_COLUMNS)})")
    label = _label_column(label_from, names)
    wanted = [c for c in (image, "key", "status", "error_message", label) if c and c in names]
    groups = [table.metadata.row_group(group) for group in range(table.num_row_groups)]
    # The workers read the cells when the shard says which downloads failed (img2dataset's
    # `status`: the stats file's count leaves those out) and each row group is small enough.
    in_workers = "status" in names and all(
        image_bytes(group, image) <= WORKER_ROW_GROUP_BYTES for group in groups
    )
    read = [column for column in wanted if column != image] if in_workers else wanted
    row = 0
    try:
        for index, group in enumerate(groups):
            _check_stored_size(group, wanted, index)
            rows = table.read_row_group(index, columns=read)
            if in_workers:
                yield from _cells(rows, row, index, cells_of, image, label, label_from)
            else:
                yield from _row_group(rows, row, image, label, label_from, max_bytes)
            row += rows.num_rows
    except BrokenArchive:
        raise
    except Exception as error:
        raise BrokenArchive(f"unreadable after row {row} ({error})") from None


def _cells(
    rows: Any, first: int, group: int, path: str, image: str, label: str | None, label_from: str
) -> Iterator[Sample]:
    """A row group's samples whose image cells the workers read: its small columns only."""
    columns = _small_columns(rows, first, rows.num_rows)
    for i in range(rows.num_rows):
        failed = columns["status"][i] not in (None, "success")
        size = None if failed else 0  # 0: the worker sizes the cell
        cell = ParquetCell(path, group, i, image)
        yield _sample(columns, i, first + i, size, cell, label, label_from, 0)


def _small_columns(
    rows: Any, first: int, count: int, image: str = "", cell_bytes: int = 0
) -> dict[str, list[Any]]:
    """Every column of ``rows`` but ``image``, as lists, once they and the image cells
    (``cell_bytes``) are within the bound expanded (counted without expanding them)."""
    names = [name for name in rows.column_names if name != image]
    total = cell_bytes + sum(_expanded_bytes(rows.column(name)) for name in names)
    if total > MAX_ROW_GROUP_BYTES:
        raise BrokenArchive(
            f"rows {first} to {first + count - 1} hold {total:,} bytes once expanded, "
            f"over the bound of {MAX_ROW_GROUP_BYTES:,} per row group: not read"
        )
    return {name: rows.column(name).to_pylist() for name in names}


def _check_stored_size(group: Any, wanted: list[str], index: int) -> None:
    columns = (group.column(j) for j in range(group.num_columns))
    size = sum(
        c.total_uncompressed_size for c in columns if c.path_in_schema.split(".")[0] in wanted
    )
    if size > MAX_ROW_GROUP_BYTES:
        raise BrokenArchive(
            f"row group {index} holds {size:,} bytes uncompressed, over the bound of "
            f"{MAX_ROW_GROUP_BYTES:,} per row group: not read"
        )


def _is_text(kind: Any) -> bool:
    import pyarrow as pa

    return bool(
        pa.types.is_binary(kind)
        or pa.types.is_string(kind)
        or pa.types.is_large_binary(kind)
        or pa.types.is_large_string(kind)
    )


def _expanded_bytes(column: Any) -> int:
    """A column's bytes once its dictionary (if any) is expanded, counted without expanding."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not pa.types.is_dictionary(column.type):
        return int(column.nbytes)
    return sum(
        pc.sum(pc.take(pc.binary_length(chunk.dictionary), chunk.indices)).as_py() or 0
        for chunk in column.chunks
    )


def _row_group(
    rows: Any, first: int, image: str, label: str | None, label_from: str, max_bytes: int
) -> Iterator[Sample]:
    import pyarrow as pa
    import pyarrow.compute as pc

    cells = rows.column(image).combine_chunks()
    if not pa.types.is_dictionary(cells.type):
        cells = cells.dictionary_encode()
    sizes = pc.take(pc.binary_length(cells.dictionary), cells.indices)
    columns = _small_columns(rows, first, len(cells), image, pc.sum(sizes).as_py() or 0)
    for i, size in enumerate(sizes.to_pylist()):
        index = cells.indices[i].as_py()
        data = None if size is None or size > max_bytes else cells.dictionary[index].as_py()
        yield _sample(columns, i, first + i, size, data, label, label_from, max_bytes)


def _label_column(label_from: str, names: list[str]) -> str | None:
    if label_from == "cls":
        return "cls" if "cls" in names else None
    if label_from.startswith("json:"):
        top = label_from[5:].split(".")[0]
        return top if top in names else None
    return None


def _sample(
    columns: dict[str, list[Any]],
    i: int,
    row: int,
    size: int | None,
    data: bytes | ParquetCell | None,
    label: str | None,
    label_from: str,
    max_bytes: int,
) -> Sample:
    key = columns.get("key", [None] * (i + 1))[i]
    name = str(key) if key not in (None, "") else f"row-{row}"
    if size is None:
        status = columns.get("status", [None] * (i + 1))[i] or "no image"
        reason = columns.get("error_message", [None] * (i + 1))[i]
        error = f"NoImage: {status}" + (f" ({reason})" if reason else "")
        return Sample(name, None, error=error, uncounted=True)  # img2dataset's failures
    if data is None:
        return Sample(
            name,
            None,
            error=f"ValueError: file of {size} bytes, over the --max-file-bytes limit "
            f"of {max_bytes}",
        )
    value, error = _label(columns, i, label, label_from)
    return Sample(name, None if error else data, value, error)


def _label(
    columns: dict[str, list[Any]], i: int, label: str | None, label_from: str
) -> tuple[int | str | None, str]:
    if label is None:
        return None, ""
    value = columns[label][i]
    if label_from == "cls":
        if value is None:
            return None, ""
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_CLASSES:
            return None, f"BadLabel: cls is {value!r}, not a class number (0, 1, …)"
        return value, ""
    field = label_from[5:]
    rest = field.split(".", 1)[1] if "." in field else ""
    if rest:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):  # one sample's label, as in a tar
                return None, f"BadLabel: {label} is not JSON"
        return json_field(value, rest, label)
    return json_field({"v": value}, "v", label)
