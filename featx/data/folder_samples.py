"""One shard folder of img2dataset's ``files`` format (``00000/000000000.jpg``, ``.json``,
``.txt``) → its samples, grouped by key exactly as tar members are
(:func:`featx.data.tar_samples.group_samples`): the folder is read as a tar whose members are
its files, in name order.

Only the folder's own files are read: it is opened without following a link, each file is
opened relative to it (here) or by its path (a worker's byte range) without following one, and
a link, subfolder or device is a member that is never read (named like an image, it is a
failure with its reason). A file is read only up to the size it was listed with (which the
grouping checks against ``--max-file-bytes`` first).
"""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Iterator

from featx.data.archives import Sample
from featx.data.tar_samples import BrokenArchive, Member, group_samples, sample_key
from featx.data.work import FileRange


def folder_samples(path: str, label_from: str, max_bytes: int) -> Iterator[Sample]:
    """The samples of the shard folder at ``path``; BrokenArchive if it cannot be listed. An
    image is the :class:`FileRange` of its whole file, for a worker to read as it was listed (a
    file of another size by then fails)."""
    try:
        folder = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as error:
        raise BrokenArchive(f"not a readable folder ({error.strerror})") from None
    try:
        members = _members(folder, os.path.realpath(path))
        yield from group_samples(members, label_from, max_bytes)
    finally:
        os.close(folder)


def _members(folder: int, real: str) -> Iterator[Member]:
    try:
        with os.scandir(folder) as entries:
            found = [(e.name, e.stat(follow_symlinks=False)) for e in entries]
    except OSError as error:
        raise BrokenArchive(f"cannot list it ({error.strerror})") from None
    # By key, then name: a key's files are next to each other whatever the other names are.
    for name, info in sorted(found, key=lambda item: (sample_key(item[0])[0], item[0])):
        kind = _kind(info.st_mode)
        where = FileRange(os.path.join(real, name), 0, info.st_size)
        yield Member(name, info.st_size, kind, functools.partial(_read, folder, name, info), where)


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return ""
    if stat.S_ISLNK(mode):
        return "symbolic link"
    return "folder" if stat.S_ISDIR(mode) else "device, FIFO or other non-file"


def _read(folder: int, name: str, listed: os.stat_result) -> bytes:
    """The file's bytes, no more than it was listed with; a file replaced or grown since then
    breaks the shard (its samples would not be the ones counted)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=folder)
    except OSError as error:
        raise BrokenArchive(f"cannot open {name} ({error.strerror})") from None
    with open(fd, "rb") as handle:
        now = os.fstat(fd)
        if (now.st_ino, now.st_dev) != (listed.st_ino, listed.st_dev):
            raise BrokenArchive(f"{name} was replaced while the folder was read")
        data = handle.read(listed.st_size + 1)
    if len(data) != listed.st_size:
        raise BrokenArchive(f"{name} changed size while the folder was read")
    return data
