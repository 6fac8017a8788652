"""One small filesystem interface for local folders and fsspec URLs: list a folder's top level,
stat a file, read a small file under a limit. Callers never ask which kind they have:
:func:`filesystem_of` is the one place that decides.

Local paths are read with ``os`` (no fsspec import, links followed as ``os.stat`` does for a
named file, a folder's subfolders told apart without following links); URLs through fsspec, with
errors in one line (``remote.asking``).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Protocol

from featx.data import remote
from featx.errors import UsageError
from featx.safe_text import public_url


@dataclass(frozen=True)
class Entry:
    """One name at a folder's top level; ``size`` and ``version`` where the listing said."""

    name: str
    is_dir: bool
    size: int | None = None
    version: str = ""


class FileSystem(Protocol):
    remote: bool  # read over a network: small files are read when needed, not up front

    def listing(self, folder: str) -> dict[str, Entry]:
        """Name → entry of a folder's top level (a missing folder: a UsageError)."""

    def stat(self, url: str) -> tuple[int, str]:
        """(size, version) of a regular file: a missing one is a UsageError."""

    def folder_stat(self, url: str) -> tuple[int, str]:
        """(size, version) of a folder read as one archive (img2dataset's files format)."""

    def exists(self, url: str) -> bool: ...

    def is_dir(self, url: str) -> bool: ...

    def read(self, url: str, what: str, max_bytes: int) -> bytes:
        """A small file's bytes, refused above ``max_bytes`` before more is read."""


def filesystem_of(url: str) -> FileSystem:
    """The filesystem that holds ``url`` (a local path, ``file://`` included, or a URL)."""
    return _Remote() if remote.is_url(url) else _Local()


class _Local:
    remote = False

    def listing(self, folder: str) -> dict[str, Entry]:
        path = remote.local_path(folder)
        if not os.path.isdir(path):
            raise UsageError(f"source {folder}: no such file or folder")
        try:
            with os.scandir(path) as entries:
                return {e.name: Entry(e.name, e.is_dir(follow_symlinks=False)) for e in entries}
        except OSError as error:
            raise UsageError(f"source {path}: {error.strerror}") from None

    def stat(self, url: str) -> tuple[int, str]:
        try:
            info = os.stat(remote.local_path(url))
        except OSError as error:
            raise UsageError(f"{url}: {error.strerror}") from None
        if not stat.S_ISREG(info.st_mode):
            raise UsageError(f"{url}: not a regular file")
        return info.st_size, f"mtime={info.st_mtime_ns}"

    def folder_stat(self, url: str) -> tuple[int, str]:
        try:
            info = os.lstat(remote.local_path(url))
        except OSError as error:
            raise UsageError(f"{url}: {error.strerror}") from None
        return info.st_size, f"mtime={info.st_mtime_ns}"

    def exists(self, url: str) -> bool:
        return os.path.isfile(remote.local_path(url))

    def is_dir(self, url: str) -> bool:
        return os.path.isdir(remote.local_path(url))

    def read(self, url: str, what: str, max_bytes: int) -> bytes:
        from featx.inputs import read_input

        return read_input(remote.local_path(url), what, max_bytes)


class _Remote:
    remote = True

    def listing(self, folder: str) -> dict[str, Entry]:
        fs, path = remote.filesystem(folder)
        with remote.asking(folder, "no such file or folder"):
            if remote.is_http(fs):  # an index page: read under featx's bounds, never whole
                return {
                    (name := link.rstrip("/").rsplit("/", 1)[-1]): Entry(name, is_dir)
                    for link, is_dir in remote.http_listing(fs, path)
                }
            fs.invalidate_cache(path)  # fsspec keeps listings per process: read it as it is now
            found = fs.ls(path, detail=True)
        if len(found) > remote.MAX_LISTING_ENTRIES:
            raise UsageError(f"{public_url(folder)}: {remote.too_many_entries()}")
        entries = {}
        for info in found:
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            size = info.get("size")
            size = int(size) if size is not None else None
            entries[name] = Entry(name, info.get("type") == "directory", size, version(info))
        return entries

    def stat(self, url: str) -> tuple[int, str]:
        fs, path = remote.filesystem(url)
        with remote.asking(url, "no such file"):
            info = fs.info(path)
        size = info.get("size")
        return (int(size) if size is not None else -1), version(info)

    def folder_stat(self, url: str) -> tuple[int, str]:
        raise UsageError(
            f"{url}: img2dataset's files format (a folder per shard) is read from local folders "
            "only; fetch it, or use --output_format webdataset or parquet"
        )

    def exists(self, url: str) -> bool:
        fs, path = remote.filesystem(url)
        with remote.asking(url, "no such file"):
            return bool(fs.exists(path))

    def is_dir(self, url: str) -> bool:
        fs, path = remote.filesystem(url)
        with remote.asking(url, "no such file or folder"):
            return bool(fs.isdir(path))

    def read(self, url: str, what: str, max_bytes: int) -> bytes:
        return remote.read_remote(url, max_bytes)


def version(info: dict) -> str:
    """ETag where the store gives one, else the modification time."""
    for key in ("ETag", "etag", "md5", "generation"):
        if info.get(key):
            return f"{key.lower()}={str(info[key]).strip(chr(34))}"
    for key in ("LastModified", "last_modified", "mtime", "updated", "Last-Modified"):
        if info.get(key):
            return f"mtime={info[key]}"
    return ""
