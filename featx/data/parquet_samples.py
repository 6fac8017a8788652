"""An img2dataset parquet shard → its samples: image bytes in a column (``jpg``, ``png``,
``webp`` or ``image``), ``None`` where the download failed (a failure here, with img2dataset's
own status and error message), rows named by the ``key`` column.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from featx.data.archives import ArchiveList, Sample
from featx.data.filesystem import filesystem_of
from featx.data.remote import local_path
from featx.data.tar_samples import MAX_CLASS, BrokenArchive, json_field
from featx.errors import UsageError

IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image")
ROWS_PER_READ = 256


def parquet_module() -> Any:
    """``pyarrow.parquet``, or the one line that says how to install it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError("parquet shards need pyarrow: pip install 'featx[parquet]'") from None
    return pq


def check_parquet_shards(archives: ArchiveList) -> None:
    """Refuse, before any model loads, parquet shards that cannot give images: pyarrow
    missing, or a local shard whose schema (its footer, read alone) has no image column
    (img2dataset's ``files`` and ``webdataset`` formats write metadata-only parquet files).
    A remote shard's schema is checked when it is fetched."""
    if archives.kind != "parquet":
        return
    pq = parquet_module()
    for archive in archives.archives:
        if filesystem_of(archive.url).remote:
            continue
        path = local_path(archive.url)
        try:
            names = pq.read_schema(path).names
        except Exception as error:
            raise UsageError(f"{archive.url}: not a parquet file ({error})") from None
        if not any(column in names for column in IMAGE_COLUMNS):
            raise UsageError(
                f"{archive.url}: a parquet file without an image column (looked for "
                f"{', '.join(IMAGE_COLUMNS)}): metadata, not image shards"
            )


def parquet_samples(path: str, label_from: str, max_bytes: int) -> Iterator[Sample]:
    pq = parquet_module()
    try:
        table = pq.ParquetFile(path)
    except Exception as error:
        raise BrokenArchive(f"not a parquet file ({error})") from None
    names = table.schema_arrow.names
    image = next((c for c in IMAGE_COLUMNS if c in names), None)
    if image is None:
        raise BrokenArchive(f"no image column (looked for {', '.join(IMAGE_COLUMNS)})")
    label = _label_column(label_from, names)
    wanted = [c for c in (image, "key", "status", "error_message", label) if c and c in names]
    row = 0
    try:
        for batch in table.iter_batches(batch_size=ROWS_PER_READ, columns=wanted):
            columns = {name: batch.column(name).to_pylist() for name in wanted}
            for i in range(batch.num_rows):
                yield _sample(columns, i, row + i, image, label, label_from, max_bytes)
            row += batch.num_rows
    except BrokenArchive:
        raise
    except Exception as error:
        raise BrokenArchive(f"unreadable after row {row} ({error})") from None


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
    image: str,
    label: str | None,
    label_from: str,
    max_bytes: int,
) -> Sample:
    key = columns.get("key", [None] * (i + 1))[i]
    name = str(key) if key not in (None, "") else f"row-{row}"
    data = columns[image][i]
    if data is None:
        status = columns.get("status", [None] * (i + 1))[i] or "no image"
        reason = columns.get("error_message", [None] * (i + 1))[i]
        error = f"NoImage: {status}" + (f" ({reason})" if reason else "")
        return Sample(name, None, error=error, uncounted=True)  # img2dataset's failures
    if len(data) > max_bytes:
        return Sample(
            name,
            None,
            error=f"ValueError: file of {len(data)} bytes, over the --max-file-bytes limit "
            f"of {max_bytes}",
        )
    value, error = _label(columns, i, label, label_from)
    return Sample(name, None if error else bytes(data), value, error)


def _label(
    columns: dict[str, list[Any]], i: int, label: str | None, label_from: str
) -> tuple[int | str | None, str]:
    if label is None:
        return None, ""
    value = columns[label][i]
    if label_from == "cls":
        if value is None:
            return None, ""
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_CLASS:
            return None, f"BadLabel: cls is {value!r}, not a class number (0, 1, …)"
        return value, ""
    field = label_from[5:]
    rest = field.split(".", 1)[1] if "." in field else ""
    if rest:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                return None, f"BadLabel: {label} is not JSON"
        return json_field(value, rest, label)
    return json_field({"v": value}, "v", label)
