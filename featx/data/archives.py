"""The work list of an archive source: WebDataset tars (img2dataset's output) or img2dataset's
parquet shards, local or behind an fsspec URL. One archive is one featx shard.

A source names archives as one file (``data/00012.tar``), a brace list
(``s3://b/laion/{00000..00099}.tar``) or a folder holding them. Rows are named
``<archive relative to the root>/<member>``; the root is the ``source`` attribute.
img2dataset writes ``NNNNN_stats.json`` after its tar: where such files exist, only archives
with one are read (the others may be half written) and their sample counts are checked.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field

from featx.data import remote
from featx.data.filesystem import Entry, filesystem_of
from featx.data.work import Payload
from featx.errors import FeatxError, UsageError
from featx.safe_text import public_url, shortlist

ARCHIVE_SUFFIXES = (".tar", ".parquet")
FOLDER_KIND = "sample-folder"  # img2dataset's files format: NNNNN/ folders of one file a member
MAX_STATS_BYTES = 1 << 20
LABEL_SOURCES = "cls, json:FIELD or none"


@dataclass(frozen=True)
class Archive:
    """One input archive: its name under the root, where to read it, and what identifies its
    content (size plus ETag or modification time: both in the run's fingerprint)."""

    name: str
    url: str
    listed_size: int  # -1: the listing did not say (an HTTP index page): asked when needed
    listed_version: str
    expected: int | None = None  # samples img2dataset's stats file says it holds (read now)
    stats: str | None = None  # a remote stats file, read when the archive is: see counted()

    @property
    def kind(self) -> str:
        return os.path.splitext(self.name)[1][1:] or FOLDER_KIND

    @property
    def size(self) -> int:
        """Its size in bytes (-1 where the store does not say)."""
        return self.listed_size if self.listed_size >= 0 else _asked(self.url)[0]

    @property
    def version(self) -> str:
        return self.listed_version if self.listed_size >= 0 else _asked(self.url)[1]

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
    class_names: tuple[str, ...] = ()  # --class-names: name i of integer label i
    without_stats: tuple[str, ...] = ()  # archives skipped: no stats file (not finished)
    not_read: tuple[str, ...] = ()  # subfolders and image files beside a folder's archives
    skipped_links: int = 0  # as ImageList's: archives are listed, never found by following links

    def __len__(self) -> int:
        return len(self.archives)

    @property
    def kind(self) -> str:
        """``tar``, ``parquet`` or ``sample-folder`` (img2dataset's ``files`` format)."""
        return self.archives[0].kind

    def digest(self) -> str:
        """sha256 over the archives' names (and the root, for a URL) and the label source: the
        fingerprint's work list. A local root is left out, as for image folders: parts made
        where the data is mounted elsewhere still merge. Sizes and ETags (or mtimes) are checked
        per shard instead (``Archive.identity``), so an archive re-fetched after it broke is read
        on resume while the finished shards are kept."""
        root = self.root if filesystem_of(self.root).remote else ""
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
        where = "remote " if filesystem_of(self.root).remote else ""
        text = f"{count:,} {where}{self.kind} shard{'s' * (count != 1)} in {public_url(self.root)}"
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
                f"{public_url(self.root)}: {len(self.not_read)} subfolder(s) or image file(s) "
                f"beside the archives ({shortlist(self.not_read, 3)}) are not read: a folder is "
                "read as archives or as images, not both"
            )
        return "; ".join(notes) or None


@functools.lru_cache(maxsize=4096)
def _asked(url: str) -> tuple[int, str]:
    """(size, version) of an archive its listing did not describe: one request, made when the
    archive is read (a listing of a million links must not start a million HEAD requests)."""
    return filesystem_of(url).stat(url)


def is_archive_source(source: str) -> bool:
    """Whether ``source`` names archives rather than an image folder: an archive file, a brace
    list, or a folder (local or a URL) whose top level holds archives."""
    if len(remote.expand_braces(source)) > 1 or source.endswith(ARCHIVE_SUFFIXES):
        return True
    entries = _folder_entries(source)
    return entries is not None and bool(_archives_in(entries))


def _folder_entries(source: str) -> dict[str, Entry] | None:
    """The top level of a folder; None when ``source`` is a local non-folder (a URL is listed
    whatever it is: asking first would cost a request)."""
    fs = filesystem_of(source)
    if not fs.remote and not fs.is_dir(source):
        return None
    return fs.listing(source)


def list_archives(source: str, label_from: str = "cls") -> ArchiveList:
    """The archives ``source`` names, in sorted order (a brace list keeps its own order)."""
    check_label_from(label_from)
    names = remote.expand_braces(source)
    listed: set[str] | None = None  # URLs of files known to exist (stats files)
    if len(names) == 1 and not names[0].endswith(ARCHIVE_SUFFIXES):
        root, found, listed, not_read = _folder(names[0])
    else:
        wrong = [n for n in names if not n.endswith(ARCHIVE_SUFFIXES)]
        if wrong:
            raise UsageError(f"{wrong[0]}: not a .tar or .parquet file")
        root = remote.common_root(names)
        (found, listed), not_read = _stat_all(names), ()
    kinds = {os.path.splitext(name)[1] for name, _, _ in found}
    if len(kinds) > 1:
        raise UsageError(f"{source}: both .tar and .parquet archives; name one kind")
    archives, without = _with_stats(root, found, listed)
    if not archives:
        raise UsageError(f"source {source}: no finished archives (no _stats.json for any)")
    return ArchiveList(root, archives, label_from, without_stats=tuple(without), not_read=not_read)


def check_label_from(label_from: str) -> None:
    if label_from in ("cls", "none") or (label_from.startswith("json:") and len(label_from) > 5):
        return
    raise UsageError(f"--label-from {label_from!r}: expected {LABEL_SOURCES}")


Found = list[tuple[str, int, str]]  # (url, size, version) of each archive


def _folder(folder: str) -> tuple[str, Found, set[str], tuple[str, ...]]:
    """(root, archives, the files listed, what is not read) of a folder's top level."""
    root = folder.rstrip("/") + "/"
    entries = _folder_entries(folder)
    if entries is None:
        raise UsageError(f"source {folder}: no such file or folder")
    chosen = _archives_in(entries)
    if not chosen:
        raise UsageError(f"source {folder}: no .tar or .parquet archives in it")
    fs = filesystem_of(folder)
    found = []
    for name in chosen:
        url = remote.join(root, name)
        stat = fs.folder_stat if entries[name].is_dir else fs.stat
        later = (-1, "") if fs.remote and not entries[name].is_dir else None  # see _asked
        found.append((url, *(_known(entries[name]) or later or stat(url))))
    listed = {remote.join(root, name) for name, entry in entries.items() if not entry.is_dir}
    return root, found, listed, _not_read(entries, chosen)


def _not_read(entries: dict[str, Entry], chosen: list[str]) -> tuple[str, ...]:
    """The subfolders and image files at an archive folder's top level that are not read."""
    from featx.data.worklist import is_image_name

    read = set(chosen)  # a set: a listing may name a million archives
    visible = sorted(n for n in entries if not n.startswith(".") and n not in read)
    return tuple(n for n in visible if is_image_name(n) or entries[n].is_dir)


def _archives_in(entries: dict[str, Entry]) -> list[str]:
    """Tars if there are any (img2dataset's parquet files beside tars are only metadata), else
    img2dataset's ``files`` shards (subfolders beside a parquet or stats file of their name,
    the parquet then only metadata), else parquet files."""
    visible = sorted(n for n in entries if not n.startswith("."))
    files = {n for n in visible if not entries[n].is_dir}
    tars = [n for n in visible if n.endswith(".tar") and n in files]
    folders = [
        n for n in visible if entries[n].is_dir and ({f"{n}.parquet", f"{n}_stats.json"} & files)
    ]
    return tars or folders or [n for n in visible if n.endswith(".parquet") and n in files]


def _stat_all(urls: list[str]) -> tuple[Found, set[str] | None]:
    """(url, size, version) of each archive, and the files seen: one listing per folder rather
    than a request per archive (where the folder can be listed)."""
    seen: dict[str, Entry] = {}
    for folder in dict.fromkeys(remote.common_root([url]) for url in urls):
        try:
            entries = filesystem_of(folder or ".").listing(folder or ".")
        except FeatxError:
            continue  # not listable (an HTTP server without an index page): ask per archive
        seen.update({folder + name: entry for name, entry in entries.items()})
    found = []
    for url in urls:
        known = _known(seen[url]) if url in seen else None
        found.append((url, *(known or filesystem_of(url).stat(url))))
    return found, set(seen) if seen else None


def _known(entry: Entry) -> tuple[int, str] | None:
    """(size, version) from a listing; None where it did not say (a local folder, an HTTP
    index page): the file is then asked for."""
    if entry.size is None or not entry.version:
        return None
    return entry.size, entry.version


def _with_stats(
    root: str, found: Found, listed: set[str] | None
) -> tuple[list[Archive], list[str]]:
    """Archives with their stats files; where any stats file exists, those without one are
    left out (returned by name). Local stats files are read now; remote ones when their archive
    is (one request each, not thousands before the first image)."""
    has = {url: _has_stats(_stats_url(url), listed) for url, _, _ in found}
    archives, without = [], []
    any_stats = any(has.values())
    for url, size, version in found:
        name = url[len(root) :] if url.startswith(root) else url.rsplit("/", 1)[-1]
        stats = _stats_url(url)
        if any_stats and not has[url]:
            without.append(name)
        elif not has[url]:
            archives.append(Archive(name, url, size, version))
        elif (expected := _read_now(stats)) is None:
            archives.append(Archive(name, url, size, version, stats=stats))
        else:
            archives.append(Archive(name, url, size, version, expected=expected))
    return archives, without


def _read_now(stats: str) -> int | None:
    """A local stats file's count; None for a remote one, or a local one that cannot be read
    (a pipe, a device, too big, not JSON: read again with its archive, which then fails in one
    line while the others run)."""
    if filesystem_of(stats).remote:
        return None
    try:
        return read_stats(stats)
    except UsageError:
        return None


def _has_stats(url: str, listed: set[str] | None) -> bool:
    if listed is not None:
        return url in listed
    return filesystem_of(url).exists(url)


def _stats_url(url: str) -> str:
    return os.path.splitext(url)[0] + "_stats.json"


def read_stats(url: str) -> int:
    """The number of samples img2dataset wrote (``successes``) by its stats file at ``url``."""
    try:
        stats = json.loads(filesystem_of(url).read(url, "stats file", MAX_STATS_BYTES))
        count = stats["successes"]
        if type(count) is not int or count < 0:
            raise ValueError("'successes' is not a count")
        return count
    except UsageError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise UsageError(f"{public_url(url)}: not an img2dataset stats file ({error})") from None
    except Exception as error:
        raise remote.fetch_error(url, error) from None


@dataclass
class Sample:
    """One row of an archive: its name (``<member>`` within the archive), the image's bytes
    (None for a sample that failed before decoding, with ``error`` saying why) and its label
    (an int from ``.cls``, an int or str from JSON, or None)."""

    name: str
    image: Payload | None  # bytes, or where they are in a local archive
    label: int | str | None = None
    error: str = ""
    members: list[str] = field(default_factory=list)
    # Not one of the samples img2dataset's stats count as successes: a tar member failing on
    # its own (a duplicate, a second image), a parquet row whose download failed.
    uncounted: bool = False
