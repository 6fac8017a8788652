"""A tar's member headers, read without reading member data: name, offset, size and kind.

The main process indexes a tar this way and hands the decode workers byte ranges of the file,
so it never reads or pickles image bytes (``tarfile`` costs ~3x more per member and reads every
member's data). USTAR, GNU and pax headers are read as ``tarfile`` reads them; what carries
data through extension headers is bounded: a pax or GNU long-name header over
:data:`MAX_EXTENSION_BYTES` breaks the archive instead of being read whole. A GNU sparse member
(holes that ``tarfile`` would expand to the size it claims) is a kind of its own, never read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

BLOCK = 512
MAX_EXTENSION_BYTES = 1 << 20  # a pax record or GNU long name; real ones are a few hundred bytes
# After the end-of-archive blocks, a writer pads to its record size (tarfile and GNU tar: 10
# KiB; up to 64 KiB with tar -b 128). A longer run of zeros is a zero-filled tail (a crash into
# a preallocated file) hiding lost members.
MAX_END_PADDING = 2 * BLOCK + (64 << 10)
_KINDS = {
    b"0": "file",
    b"\0": "file",
    b"7": "file",  # contiguous file: a plain file to every reader
    b"1": "hard link",
    b"2": "symbolic link",
    b"3": "device",
    b"4": "device",
    b"5": "folder",
    b"6": "FIFO",
    b"S": "sparse file",
}
_EXTENSIONS = frozenset(b"xgLK")  # pax (per member, global), GNU long name, GNU long link


class BrokenArchive(Exception):
    """An archive that cannot be read to its end: truncated, or with a corrupt header."""


@dataclass(frozen=True)
class Member:
    """One member of a tar: its data is ``size`` bytes at ``offset`` of the file."""

    name: str
    offset: int
    size: int
    kind: str  # file, folder, symbolic link, hard link, device, FIFO, sparse file, other

    @property
    def is_file(self) -> bool:
        return self.kind == "file"


class TarReader:
    """Reads the headers of the tar open as ``fd`` (``size`` bytes), and small members whole."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        self.offset = 0  # the next header's

    def members(self) -> Iterator[Member]:
        """The members in order; then the end of the archive is checked (:meth:`_check_end`)."""
        pending: dict[str, str] = {}  # what extension headers say of the next member
        while True:
            header = self._header()
            if header is None:
                break
            flag, size = header[156:157], self._number(header[124:136])
            data_at = self.offset + BLOCK
            self.offset = data_at + -(-size // BLOCK) * BLOCK
            if data_at + size > self.size:
                raise BrokenArchive(
                    f"truncated: member at byte {data_at - BLOCK} is cut short (it claims "
                    f"{size} bytes, the file ends at byte {self.size})"
                )
            if flag[0] in _EXTENSIONS:
                self._extension(flag, data_at, size, pending)
                continue
            yield self._member(header, flag, data_at, size, pending)
            pending = {}
        self._check_end()

    def read(self, member: Member, limit: int) -> bytes:
        """A member's bytes, at most ``limit`` of them."""
        return os.pread(self.fd, min(member.size, limit), member.offset)

    def _header(self) -> bytes | None:
        """The next header block, or None at the end-of-archive zero block."""
        block = os.pread(self.fd, BLOCK, self.offset)
        if len(block) < BLOCK:
            if self.offset == 0:
                raise BrokenArchive("not a tar archive (empty or shorter than one header)")
            raise BrokenArchive(
                f"truncated: it ends at byte {self.size}, inside or right after member data, "
                "without the end-of-archive blocks"
            )
        if block.count(0) == BLOCK:
            return None
        if not _checksum_ok(block):
            if self.offset == 0:
                raise BrokenArchive("not a tar archive (bad header checksum)")
            raise BrokenArchive(f"corrupt or unreadable member header at byte {self.offset}")
        return block

    def _number(self, field: bytes) -> int:
        """A header's numeric field: octal text, or GNU's base-256 for big values."""
        if field[0] in (0o200, 0o377):
            value = int.from_bytes(field[1:], "big")
            return -value if field[0] == 0o377 else value
        text = field.split(b"\0", 1)[0].strip()
        try:
            return int(text or b"0", 8)
        except ValueError:
            raise BrokenArchive(f"corrupt member header at byte {self.offset}") from None

    def _extension(self, flag: bytes, data_at: int, size: int, pending: dict[str, str]) -> None:
        if size > MAX_EXTENSION_BYTES:
            raise BrokenArchive(
                f"an extension header of {size} bytes at byte {data_at - BLOCK} (over "
                f"{MAX_EXTENSION_BYTES}): not a real name or pax record"
            )
        data = os.pread(self.fd, size, data_at)
        if flag == b"L":
            pending["path"] = _text(data.split(b"\0", 1)[0])
        elif flag == b"x":
            pending.update(_pax_records(data, data_at))
        # g (global pax) and K (long link name) change nothing featx reads

    def _member(
        self, header: bytes, flag: bytes, data_at: int, size: int, pending: dict[str, str]
    ) -> Member:
        name = pending.get("path") or _header_name(header)
        kind = _KINDS.get(flag, "other")
        if kind == "file" and flag == b"\0" and name.endswith("/"):
            kind = "folder"  # an old-style folder entry
        if any(key.startswith("GNU.sparse.") for key in pending):
            _check_sparse_map(pending.get("GNU.sparse.map", ""), data_at)
            kind = "sparse file"
        if "size" in pending:
            size = _pax_size(pending["size"], data_at)
            self.offset = data_at + -(-size // BLOCK) * BLOCK
            if data_at + size > self.size:
                raise BrokenArchive(f"truncated: member {name} is cut short")
        return Member(name.rstrip("/") if kind == "folder" else name, data_at, size, kind)

    def _check_end(self) -> None:
        """A whole tar ends with zero blocks, then at most its writer's padding, all zeros."""
        end = self.offset
        if self.size - end > MAX_END_PADDING:
            raise BrokenArchive(
                f"{self.size - end} bytes after its last member at byte {end}, more than an end "
                "marker and padding: a second tar appended, or a zero-filled tail hiding members"
            )
        tail = os.pread(self.fd, MAX_END_PADDING, end)
        if tail.count(0) != len(tail):
            raise BrokenArchive(f"data after the end-of-archive marker at byte {end}")


def _checksum_ok(block: bytes) -> bool:
    """The header checksum, as tarfile accepts it: unsigned or signed bytes, the field itself
    counted as spaces."""
    try:
        stored = int(block[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    unsigned = 256 + sum(block[:148]) + sum(block[156:])
    if stored == unsigned:
        return True
    signed = 256 + sum(b - 256 if b > 127 else b for b in block[:148] + block[156:])
    return stored == signed


def _header_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:263] == b"ustar\0":  # POSIX: a prefix for long names (GNU uses those bytes)
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return _text(name)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _pax_records(data: bytes, where: int) -> dict[str, str]:
    """``"%d %s=%s\\n"`` records; a malformed one breaks the archive, as in tarfile."""
    records: dict[str, str] = {}
    position = 0
    while position < len(data) and data[position] != 0:
        space = data.find(b" ", position)
        try:
            length = int(data[position:space])
        except ValueError:
            raise BrokenArchive(f"malformed pax header at byte {where}") from None
        record = data[space + 1 : position + length - 1]
        key, equals, value = record.partition(b"=")
        if length <= 0 or not equals or position + length > len(data):
            raise BrokenArchive(f"malformed pax header at byte {where}")
        records[_text(key)] = _text(value)
        position += length
    return records


def _check_sparse_map(text: str, where: int) -> None:
    """A pax sparse map is pairs of numbers (offset, size); anything else is a garbled header,
    as tarfile finds it."""
    numbers = text.split(",") if text else []
    if len(numbers) % 2 or not all(number.isdigit() for number in numbers):
        raise BrokenArchive(f"unreadable member header at byte {where - BLOCK} (bad sparse map)")


def _pax_size(text: str, where: int) -> int:
    if not text.isdigit():
        raise BrokenArchive(f"malformed pax size {text[:20]!r} at byte {where}")
    return int(text)
