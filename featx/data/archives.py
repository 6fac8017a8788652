"""The work list of an archive source: WebDataset tars (img2dataset's output) or img2dataset's
parquet shards, local or behind an fsspec URL. One archive is one featx shard.

A source names archives as one file (``data/00012.tar``), a brace list
(``s3://b/laion/{00000..00099}.tar``) or a folder holding them. Rows are named
``<archive relative to the root>/<member>``; the root is the ``source`` attribute.
img2dataset writes ``NNNNN_stats.json`` after its tar: where such files exist, only archives
with one are read (the others may be half written) and their sample counts are checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field

from featx.data import remote
from featx.data.work import FileRange
from featx.errors import FeatxError, UsageError
from featx.safe_text import shortlist

ARCHIVE_SUFFIXES = (".tar", ".parquet")
MAX_STATS_BYTES = 1 << 20
LABEL_SOURCES = "cls, json:FIELD or none"


@dataclass(frozen=True)
class Archive:
    """One input archive: its name under the root, where to read it, and what identifies its
    content (size plus ETag or modification time: both in the run's fingerprint)."""

    name: str
    url: str
    size: int
    version: str
    expected: int | None = None  # samples img2dataset's stats file says it holds (read now)
    stats: str | None = None  # a remote stats file, read when the archive is: see counted()

    def counted(self) -> int | None:
        """The samples its stats file says it holds (None without one)."""
        return self.expected if self.stats is None else read_stats(self.stats)

    @property
    def identity(self) -> str:
        """What its shard was made from: a resume checks it for each finished shard."""
        return f"{self.name} size={self.size} {self.version}".strip()


@dataclass(frozen=True)
class ArchiveList:
    """The archives of a source, in order (shard N is archive N)."""

    root: str
    archives: list[Archive]
    label_from: str = "cls"  # cls | json:FIELD | none
    without_stats: tuple[str, ...] = ()  # archives skipped: no stats file (not finished)
    not_read: tuple[str, ...] = ()  # subfolders and image files beside a folder's archives

    def __len__(self) -> int:
        return len(self.archives)

    @property
    def kind(self) -> str:
        return "parquet" if self.archives[0].name.endswith(".parquet") else "tar"

    def digest(self) -> str:
        """sha256 over the archives' names (and the root, for a URL) and the label source: the
        fingerprint's work list. A local root is left out, as for image folders: parts made
        where the data is mounted elsewhere still merge. Sizes and ETags (or mtimes) are checked
        per shard instead (``Archive.identity``), so an archive re-fetched after it broke is read
        on resume while the finished shards are kept."""
        root = self.root if remote.is_url(self.root) else ""
        digest = hashlib.sha256(f"labels={self.label_from}\nroot={root}\n".encode())
        for archive in self.archives:
            digest.update(f"{archive.name}\n".encode())
        return digest.hexdigest()

    def content_digest(self) -> str:
        """sha256 over every archive's URL, size and version: the output's provenance."""
        digest = hashlib.sha256(f"labels={self.label_from}\n".encode())
        for archive in self.archives:
            digest.update(f"{archive.identity}\n".encode())
        return digest.hexdigest()

    def expected_images(self, shards: list[int] | range) -> int | None:
        """Samples in these archives per their stats files (None when one has none)."""
        counts = [self.archives[shard].expected for shard in shards]
        return None if any(c is None for c in counts) else sum(c or 0 for c in counts)

    def describe(self) -> str:
        count = len(self.archives)
        where = "remote " if remote.is_url(self.root) else ""
        text = f"{count:,} {where}{self.kind} shard{'s' * (count != 1)} in {self.root}"
        total = self.expected_images(range(count))
        if total is not None:
            text += f" ({total:,} samples by their stats files)"
        return text + f"; labels: {self.label_from}"

    def layout_warning(self) -> str | None:
        """What of the source is not read, and why."""
        notes = []
        if self.without_stats:
            notes.append(
                f"{len(self.without_stats)} archive(s) have no _stats.json beside them "
                f"({shortlist(self.without_stats, 3)}): img2dataset writes it last, so they are "
                "skipped as unfinished"
            )
        if self.not_read:
            notes.append(
                f"{self.root}: {len(self.not_read)} subfolder(s) or image file(s) beside the "
                f"archives ({shortlist(self.not_read, 3)}) are not read: a folder is read as "
                "archives or as images, not both"
            )
        return "; ".join(notes) or None


def is_archive_source(source: str) -> bool:
    """Whether ``source`` names archives rather than an image folder: an archive file, a brace
    list, or a folder (local or a URL) whose top level holds archives."""
    if len(remote.expand_braces(source)) > 1 or source.endswith(ARCHIVE_SUFFIXES):
        return True
    if remote.is_url(source):
        return bool(_archives_in(sorted(_remote_entries(source))))
    path = remote.local_path(source)
    return os.path.isdir(path) and bool(_archives_in(sorted(_listdir(path))))


def _remote_entries(folder: str) -> dict[str, dict]:
    """The files at the top level of a remote folder: name → fsspec info."""
    fs, path = remote.filesystem(folder)
    with remote.asking(folder, "no such file or folder"):
        fs.invalidate_cache(path)  # fsspec keeps listings per process: read it as it is now
        entries = fs.ls(path, detail=True)
    return {_basename(e["name"]): e for e in entries if e.get("type") != "directory"}


def list_archives(source: str, label_from: str = "cls") -> ArchiveList:
    """The archives ``source`` names, in sorted order (a brace list keeps its own order)."""
    check_label_from(label_from)
    names = remote.expand_braces(source)
    listed: set[str] | None = None  # URLs of remote files known to exist (stats files)
    if len(names) == 1 and not names[0].endswith(ARCHIVE_SUFFIXES):
        root, found, listed = _folder(names[0])
    else:
        wrong = [n for n in names if not n.endswith(ARCHIVE_SUFFIXES)]
        if wrong:
            raise UsageError(f"{wrong[0]}: not a .tar or .parquet file")
        root = remote.common_root(names)
        found, listed = _stat_all(names)
    kinds = {os.path.splitext(name)[1] for name, _, _ in found}
    if len(kinds) > 1:
        raise UsageError(f"{source}: both .tar and .parquet archives; name one kind")
    archives, without = _with_stats(root, found, listed)
    if not archives:
        raise UsageError(f"source {source}: no finished archives (no _stats.json for any)")
    return ArchiveList(root, archives, label_from, tuple(without), _not_read(names[0]))


def _not_read(source: str) -> tuple[str, ...]:
    """The subfolders and image files at a local archive folder's top level."""
    path = remote.local_path(source)
    if remote.is_url(source) or not os.path.isdir(path):
        return ()
    from featx.data.worklist import is_image_name

    names = sorted(n for n in _listdir(path) if not n.startswith("."))
    return tuple(n for n in names if is_image_name(n) or os.path.isdir(os.path.join(path, n)))


def check_label_from(label_from: str) -> None:
    if label_from in ("cls", "none") or (label_from.startswith("json:") and len(label_from) > 5):
        return
    raise UsageError(f"--label-from {label_from!r}: expected {LABEL_SOURCES}")


def _folder(folder: str) -> tuple[str, list[tuple[str, int, str]], set[str] | None]:
    """(root, [(url, size, version)], remote listing) of the archives at a folder's top level."""
    root = folder.rstrip("/") + "/"
    if remote.is_url(folder):
        listed = _remote_entries(folder)
        chosen = _archives_in(sorted(listed))
        if not chosen:
            raise UsageError(f"source {folder}: no .tar or .parquet archives in it")
        found = [(root + name, *_known(root + name, listed[name])) for name in chosen]
        return root, found, {root + name for name in listed}
    path = remote.local_path(folder)
    if not os.path.isdir(path):
        raise UsageError(f"source {folder}: no such file or folder")
    chosen = _archives_in(sorted(_listdir(path)))
    if not chosen:
        raise UsageError(f"source {folder}: no .tar or .parquet archives in it")
    found = [(os.path.join(path, name), *_stat(os.path.join(path, name))) for name in chosen]
    return root, found, None


def _archives_in(names: list[str]) -> list[str]:
    """Tars if there are any (img2dataset's parquet files beside tars are only metadata),
    else parquet files."""
    visible = [n for n in names if not n.startswith(".")]
    tars = [n for n in visible if n.endswith(".tar")]
    return tars or [n for n in visible if n.endswith(".parquet")]


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError as error:
        raise UsageError(f"source {path}: {error.strerror}") from None


def _stat(url: str) -> tuple[int, str]:
    """(size, version) of one archive; a missing one is a usage error."""
    if remote.is_url(url):
        fs, path = remote.filesystem(url)
        with remote.asking(url, "no such file"):
            info = fs.info(path)
        return _size(info), _version(info)
    path = remote.local_path(url)
    try:
        info = os.stat(path)
    except OSError as error:
        raise UsageError(f"{url}: {error.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"{url}: not a regular file")
    return info.st_size, f"mtime={info.st_mtime_ns}"


def _stat_all(urls: list[str]) -> tuple[list[tuple[str, int, str]], set[str] | None]:
    """(url, size, version) of each archive, and the remote files seen: one listing per remote
    folder rather than a request per archive (where the folder can be listed)."""
    if not all(remote.is_url(url) for url in urls):
        return [(url, *_stat(url)) for url in urls], None
    seen: dict[str, dict] = {}
    for folder in dict.fromkeys(url.rsplit("/", 1)[0] + "/" for url in urls):
        try:
            entries = _remote_entries(folder)
        except FeatxError:
            continue  # not listable (an HTTP server without an index page): ask per archive
        seen.update({folder + name: info for name, info in entries.items()})
    found = [(url, *(_known(url, seen[url]) if url in seen else _stat(url))) for url in urls]
    return found, set(seen) if seen else None


def _known(url: str, info: dict) -> tuple[int, str]:
    """(size, version) from a listing; a listing without them (an HTTP index page) is completed
    by asking for the one file."""
    if info.get("size") is None or not _version(info):
        return _stat(url)
    return _size(info), _version(info)


def _size(info: dict) -> int:
    size = info.get("size")
    return int(size) if size is not None else -1


def _version(info: dict) -> str:
    """ETag where the store gives one, else the modification time."""
    for key in ("ETag", "etag", "md5", "generation"):
        if info.get(key):
            return f"{key.lower()}={str(info[key]).strip(chr(34))}"
    for key in ("LastModified", "last_modified", "mtime", "updated", "Last-Modified"):
        if info.get(key):
            return f"mtime={info[key]}"
    return ""


def _basename(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


def _with_stats(
    root: str, found: list[tuple[str, int, str]], listed: set[str] | None
) -> tuple[list[Archive], list[str]]:
    """Archives with their stats files; where any stats file exists, those without one are
    left out (returned by name). Local stats files are read now; remote ones when their archive
    is (one request each, not thousands before the first image)."""
    has = {url: _has_stats(_stats_url(url), listed) for url, _, _ in found}
    archives, without = [], []
    for url, size, version in found:
        name = url[len(root) :] if url.startswith(root) else _basename(url)
        stats = _stats_url(url)
        if any(has.values()) and not has[url]:
            without.append(name)
        elif not has[url]:
            archives.append(Archive(name, url, size, version))
        elif remote.is_url(stats):
            archives.append(Archive(name, url, size, version, stats=stats))
        else:
            archives.append(Archive(name, url, size, version, expected=read_stats(stats)))
    return archives, without


def _has_stats(url: str, listed: set[str] | None) -> bool:
    if listed is not None:
        return url in listed
    if remote.is_url(url):
        fs, path = remote.filesystem(url)
        with remote.asking(url, "no such file"):
            return bool(fs.exists(path))
    return os.path.isfile(remote.local_path(url))


def _stats_url(url: str) -> str:
    return os.path.splitext(url)[0] + "_stats.json"


def read_stats(url: str) -> int:
    """The number of samples img2dataset wrote (``successes``) by its stats file at ``url``."""
    try:
        if remote.is_url(url):
            data = remote.read_remote(url, MAX_STATS_BYTES)
        else:
            from featx.inputs import read_input

            data = read_input(remote.local_path(url), "stats file", MAX_STATS_BYTES)
        stats = json.loads(data)
        count = stats["successes"]
        if type(count) is not int or count < 0:
            raise ValueError("'successes' is not a count")
        return count
    except UsageError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise UsageError(f"{url}: not an img2dataset stats file ({error})") from None
    except Exception as error:
        raise remote.fetch_error(url, error) from None


@dataclass
class Sample:
    """One row of an archive: its name (``<member>`` within the archive), the image's bytes
    (None for a sample that failed before decoding, with ``error`` saying why) and its label
    (an int from ``.cls``, an int or str from JSON, or None)."""

    name: str
    image: bytes | FileRange | None  # bytes, or where they are in a local archive
    label: int | str | None = None
    error: str = ""
    members: list[str] = field(default_factory=list)
    # Not one of the samples img2dataset's stats count as successes: a tar member failing on
    # its own (a duplicate, a second image), a parquet row whose download failed.
    uncounted: bool = False
