"""A sample's bytes, read with bounds: a file (a regular one, identified by its first bytes and
checked against ``--max-file-bytes`` before it is read whole), a byte range of a local archive,
or a URL in one GET. What the decode workers call; no decoding here."""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

from featx.data.work import FileRange, ParquetCell, Payload

DEFAULT_MAX_FILE_BYTES = 1 << 30
PILLOW_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")  # what featx decodes
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
__all__ = ["DEFAULT_MAX_FILE_BYTES", "is_image_signature", "read_file", "read_payload"]


def read_payload(payload: Payload, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes | bytearray:
    """A sample's bytes wherever they are: a file (checked as :func:`read_file` does), a byte
    range of a local archive (sized when it was indexed), a parquet cell, or bytes already
    read."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, ParquetCell):
        from featx.data.parquet_cells import read_cell

        return read_cell(payload, max_bytes)
    if payload.length < 0:
        return read_file(payload.path, max_bytes)
    return read_range(payload, max_bytes)


def read_range(where: FileRange, max_bytes: int) -> bytes:
    """``where.length`` bytes at ``where.offset`` of a regular file, in one ``pread`` (a range
    over :data:`WHOLE_READ_BYTES` only once its first bytes are an image signature)."""
    if where.length > max_bytes:
        raise ValueError(
            f"file of {where.length} bytes, over the --max-file-bytes limit of {max_bytes}"
        )
    # A range's path is the real one the main process listed: a link put there since is refused.
    fd = os.open(where.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError("the archive is no longer a regular file")
        if where.length > WHOLE_READ_BYTES:  # a big member is identified before it is read
            _identify(os.pread(fd, SIGNATURE_BYTES, where.offset))
        data = os.pread(fd, where.length, where.offset)
    finally:
        os.close(fd)
    if len(data) != where.length:
        raise OSError(f"the archive ended inside this member ({len(data)} of {where.length})")
    return data


WHOLE_READ_BYTES = 8 << 20  # a file this small is read in one call, then identified


def _read_checked(fd: int, size: int, max_bytes: int) -> bytes | bytearray:
    """A file's bytes as big as it was when it was checked, identified by its first bytes: a
    small file in one read call (the common case), a big one only once its head is an image
    signature. Bytes a writer appends meanwhile are not read: the read stays within the limit."""
    with open(fd, "rb", buffering=0, closefd=False) as handle:
        if size <= WHOLE_READ_BYTES:
            data = _read_up_to(handle, min(size, max_bytes))
            _identify(bytes(data[:SIGNATURE_BYTES]))
            return data
        head = handle.read(SIGNATURE_BYTES)
        _identify(head)
        return head + _read_up_to(handle, min(size, max_bytes) - len(head))


def _read_up_to(handle: Any, count: int) -> bytearray:
    """Up to ``count`` bytes, into one buffer (a regular file gives them in one call)."""
    data = bytearray(count)
    view, got = memoryview(data), 0
    while got < count and (n := handle.readinto(view[got:])):
        got += n
    view.release()
    del data[got:]
    return data


def read_file(path: str, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes | bytearray:
    """A regular file's bytes, read only once its first bytes are an image signature and its
    size is within ``max_bytes``. A folder, FIFO or device named like an image is refused:
    reading a FIFO would wait forever and ``/dev/zero`` never ends. A URL is read through
    fsspec, in one GET, under the same limit."""
    if "://" in path:
        from featx.data.filesystem import filesystem_of
        from featx.data.remote import read_remote

        if filesystem_of(path).remote:
            data = read_remote(path, max_bytes)
            _identify(data[:SIGNATURE_BYTES] or b"?")  # an empty download is no image either
            return data
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO cannot hang
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, "a directory, not an image file")
        if not stat.S_ISREG(info.st_mode):
            raise OSError("not a regular file (a pipe, socket or device named like an image)")
        if info.st_size > max_bytes:
            raise ValueError(
                f"file of {info.st_size} bytes, over the --max-file-bytes limit of {max_bytes}"
            )
        whole = _read_checked(fd, info.st_size, max_bytes)
    finally:
        os.close(fd)
    if not whole:
        raise ValueError("empty file (0 bytes)")
    return whole


SIGNATURE_BYTES = 12
_SIGNATURES = (
    b"\xff\xd8\xff",  # JPEG
    PNG_SIGNATURE,
    b"BM",
    b"GIF87a",
    b"GIF89a",
    b"II*\0",  # TIFF, little- and big-endian, and BigTIFF
    b"MM\0*",
    b"II+\0",
    b"MM\0+",
)
UNIDENTIFIED = (
    f"cannot identify image file: not {', '.join(PILLOW_FORMATS)} (the formats featx "
    "decodes), or a broken header"
)


def _identify(head: bytes) -> None:
    """Refuse what does not start like an image featx decodes (an empty head: the caller's
    "empty file" error says more)."""
    if head and not is_image_signature(head):
        from PIL import UnidentifiedImageError

        raise UnidentifiedImageError(UNIDENTIFIED)


def is_image_signature(head: bytes) -> bool:
    """Whether a file's first bytes start one of the formats featx decodes."""
    webp = head.startswith(b"RIFF") and head[8:12] == b"WEBP"
    return webp or head.startswith(_SIGNATURES)
