"""The work list: which files a run reads, in which order, with which labels.

A folder is scanned recursively and sorted (class folders become labels, as torchvision's
ImageFolder does); a path list (stdin, ``--files-from``) keeps its order; ``--labels CSV`` gives
labels to either.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from featx.data import remote
from featx.data.filesystem import filesystem_of
from featx.errors import UsageError
from featx.inputs import MAX_LIST_BYTES, read_input
from featx.safe_text import public_url, shortlist, stored_name

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageList:
    """The work list: files (relative to ``root``) in sorted order, with labels."""

    root: str
    paths: list[str]  # relative, as os.fsdecode gives them (surrogate escapes kept for reading)
    labels: list[int]  # -1 when unlabelled
    class_names: list[str]
    # Images at the top level of a folder that also holds subfolders: they keep it unlabelled.
    stray: tuple[str, ...] = ()
    labels_from: str | None = None  # the --labels CSV the labels came from
    skipped_links: int = 0  # links the folder scan would not follow (scan_folder)

    def __len__(self) -> int:
        return len(self.paths)

    def absolute(self, index: int) -> str:
        return remote.join(self.root, self.paths[index])

    def digest(self) -> str:
        """sha256 over the exact work list (bytes of each path and its label): part of a run's
        fingerprint, so a resume over another list of files is refused."""
        digest = hashlib.sha256()
        for path, label in zip(self.paths, self.labels, strict=True):
            digest.update(os.fsencode(path))
            digest.update(b"\0%d\n" % label)
        return digest.hexdigest()

    def relabelled(self, labels_csv: str) -> ImageList:
        """The same files with labels from a ``path,label`` CSV (paths relative to root)."""
        class_names, labels = labels_from_csv(labels_csv, self.paths, self.root)
        return dataclasses.replace(
            self, labels=labels, class_names=class_names, labels_from=labels_csv
        )

    def describe(self) -> str:
        """``36 images in 3 classes (cat, coffee, rocket)`` or ``36 unlabelled images``."""
        count = len(self.paths)
        unlabelled = sum(1 for label in self.labels if label < 0)
        if not self.class_names:
            return f"{count:,} unlabelled image{'s' * (count != 1)}"
        shown = shortlist(self.class_names, 8)
        kinds = f"{len(self.class_names)} class{'es' * (len(self.class_names) != 1)}"
        extra = f", {unlabelled:,} unlabelled" if unlabelled else ""
        return f"{count:,} image{'s' * (count != 1)} in {kinds} ({shown}){extra}"

    def layout_warning(self) -> str | None:
        """Why a folder with subfolders was not read as class folders, and the way out."""
        if not self.stray:
            return None
        names = shortlist(self.stray, 3)
        return (
            f"{public_url(self.root)}: {len(self.stray)} image file(s) at the top level ({names}) "
            f"next to subfolders, so the subfolders are not used as classes and every image is "
            f"unlabelled; move those files into a class folder (or away) to label by folder, "
            f"or pass --labels CSV"
        )


def printable(path: str) -> str:
    """A path as valid UTF-8, unambiguously (``featx.safe_text.stored_name``)."""
    return stored_name(path)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


@dataclass(frozen=True)
class ClassLayout:
    """How a folder's images are labelled: :func:`class_layout`'s answer."""

    class_names: list[str]  # [] when the folder is unlabelled
    labels: list[int]  # one per path, -1 when unlabelled
    stray: tuple[str, ...]  # top-level images beside subfolders: they keep it unlabelled


def class_layout(paths: Sequence[str], folders: Iterable[str] = ()) -> ClassLayout:
    """The class-folder rule, for local and remote folders alike (as torchvision's ImageFolder).

    ``paths`` are the images found, relative to the folder, ``/``-separated; ``folders`` are
    top-level subfolders the scanner saw besides those that hold an image (a local listing
    shows empty ones). Subfolders at the top level are classes in sorted order, and an image
    is labelled by its top-level folder, however deep it lies. Images at the top level
    beside subfolders are stray: the folder is then unlabelled (every label -1) and they are
    named, so that the caller can warn. A folder without subfolders is unlabelled.

    Example: ``class_layout(["cat/1.jpg", "dog/2.jpg"]).labels == [0, 1]``
    """
    tops = sorted({p.split("/", 1)[0] for p in paths if "/" in p}.union(folders))
    stray = tuple(p for p in paths if "/" not in p) if tops else ()
    if not tops or stray:
        return ClassLayout([], [-1] * len(paths), stray)
    index = {name: i for i, name in enumerate(tops)}
    return ClassLayout(tops, [index.get(p.split("/", 1)[0], -1) for p in paths], ())


def scan_folder(source: str | os.PathLike[str]) -> ImageList:
    """Every image under ``source``, recursively, sorted by relative path.

    Class folders (a top level holding subfolders and no image files; other files such as a
    README are ignored) become labels in sorted folder order, as torchvision's ImageFolder
    does (:func:`class_layout`). Symlinks are followed once: a loop is not re-entered and a
    file reached twice is listed once. A link into ``/proc``, ``/sys`` or ``/dev``, or to a
    folder that holds ``source`` (``/``, the home folder), is not followed but counted in
    ``skipped_links``: one planted link must not turn a scan into a scan of the machine.

    Example: ``scan_folder("photos").class_names == ["cat", "dog"]``
    """
    root = os.fspath(source)
    if filesystem_of(root).remote:
        return scan_remote_folder(root)
    folders = _top_folders(root)
    paths, skipped = _walk_images(root)
    layout = class_layout([p.replace(os.sep, "/") for p in paths], folders)
    return ImageList(
        root, paths, layout.labels, layout.class_names, stray=layout.stray, skipped_links=skipped
    )


def scan_remote_folder(url: str) -> ImageList:
    """:func:`scan_folder` for a folder behind a URL (``s3://bucket/photos/``): one listing,
    then one GET per image as it is decoded."""
    fs, base = remote.filesystem(url)
    base = base.rstrip("/")
    with remote.asking(url, "no such folder"):
        found = _http_find(fs, base) if remote.is_http(fs) else fs.find(base)
    if len(found) > remote.MAX_LISTING_ENTRIES:
        raise UsageError(f"{public_url(url)}: {remote.too_many_entries()}")
    relative = sorted(
        path[len(base) :].lstrip("/")
        for path in found
        if path.startswith(base + "/") and is_image_name(path)
    )
    paths = [p for p in relative if not any(part.startswith(".") for part in p.split("/"))]
    layout = class_layout(paths)
    root = url.rstrip("/") + "/"
    return ImageList(root, paths, layout.labels, layout.class_names, stray=layout.stray)


def _http_find(fs: object, base: str) -> list[str]:
    """Every file under an HTTP folder by its index pages, each read under featx's bounds: at
    most ``MAX_LISTING_ENTRIES`` names in all and ``MAX_LISTING_DEPTH`` folder levels."""
    files: list[str] = []
    folders, seen, depth = [base + "/"], {base + "/"}, 0
    while folders:
        depth += 1
        if depth > remote.MAX_LISTING_DEPTH:
            raise UsageError(f"{public_url(base)}: more than {remote.MAX_LISTING_DEPTH} levels")
        below = []
        for folder in folders:
            for link, is_dir in remote.http_listing(fs, folder):
                if not is_dir:
                    files.append(link)
                elif link not in seen:
                    seen.add(link)
                    below.append(link)
                if len(files) + len(seen) > remote.MAX_LISTING_ENTRIES:
                    raise UsageError(f"{public_url(base)}: {remote.too_many_entries()}")
        folders = below
    return files


def _top_folders(root: str) -> list[str]:
    """The visible subfolders at the top of a local folder, or UsageError in one line."""
    if not os.path.exists(root):
        raise UsageError(f"source {root}: no such file or directory")
    if not os.path.isdir(root):
        raise UsageError(f"source {root}: not a directory (use --files-from for a list)")
    try:
        top = sorted(entry for entry in os.listdir(root) if not entry.startswith("."))
    except PermissionError:
        raise UsageError(f"source {root}: permission denied") from None
    return [entry for entry in top if os.path.isdir(os.path.join(root, entry))]


def _walk_images(root: str) -> tuple[list[str], int]:
    """The images under ``root`` (relative, sorted by their bytes) and the links not followed."""
    paths: list[str] = []  # broken links: listed, so that failed/ reports them
    found: dict[str, tuple[bool, str]] = {}  # real path → (reached by a file link, path)
    seen_dirs: set[tuple[int, int]] = set()
    real_root = os.path.realpath(root)
    skipped = 0
    for directory, dirnames, filenames in os.walk(root, followlinks=True):
        info = os.stat(directory)
        if (info.st_dev, info.st_ino) in seen_dirs:  # a symlink loop or a second link to a dir
            dirnames[:] = []
            continue
        seen_dirs.add((info.st_dev, info.st_ino))
        visible = sorted(d for d in dirnames if not d.startswith("."))
        dirnames[:] = [d for d in visible if _may_follow(os.path.join(directory, d), real_root)]
        skipped += len(visible) - len(dirnames)
        for name in sorted(filenames):
            if not name.startswith(".") and is_image_name(name):
                skipped += _add_image(os.path.join(directory, name), root, real_root, paths, found)
    paths.extend(relative for _, relative in found.values())
    paths.sort(key=os.fsencode)
    return paths, skipped


def _add_image(
    full: str, root: str, real_root: str, paths: list[str], found: dict[str, tuple[bool, str]]
) -> int:
    """Lists one image the walk met (1 when it is a link not followed, else 0)."""
    if not _may_follow(full, real_root):
        return 1
    relative = os.path.relpath(full, root)
    if not os.path.exists(full):  # a dangling link, or a loop of links
        paths.append(relative)
        return 0
    # A file reached twice is listed once: by its own name rather than a link's, else by the
    # first path the sorted walk reaches.
    real, link = os.path.realpath(full), os.path.islink(full)
    if real not in found or (found[real][0] and not link):
        found[real] = (link, relative)
    return 0


SYSTEM_FOLDERS = ("/proc", "/sys", "/dev")


def _may_follow(path: str, real_root: str) -> bool:
    """False for a link into a system folder or to a folder that holds the scanned one."""
    if not os.path.islink(path):
        return True
    real = os.path.realpath(path)
    inside = (real_root + os.sep).startswith(real.rstrip(os.sep) + os.sep)  # / or an ancestor
    system = any(real == top or real.startswith(top + os.sep) for top in SYSTEM_FOLDERS)
    return not (inside or system)


def read_path_list(lines: list[str], root: str, labels_csv: str | None = None) -> ImageList:
    """An explicit file list (stdin, --files-from), kept in the given order, deduplicated.

    Relative paths resolve against ``root``; labels come from an optional ``path,label`` CSV.
    """
    paths: list[str] = []
    seen: set[str] = set()
    for line in lines:
        entry = line.strip("\r\n")
        if not entry:
            continue
        relative = os.path.relpath(entry, root) if os.path.isabs(entry) else os.path.normpath(entry)
        if relative not in seen:
            seen.add(relative)
            paths.append(relative)
    if not paths:
        raise UsageError("the file list is empty")
    class_names: list[str] = []
    labels = [-1] * len(paths)
    if labels_csv:
        class_names, labels = labels_from_csv(labels_csv, paths, root)
    return ImageList(root, paths, labels, class_names)


def labels_from_csv(csv_path: str, paths: list[str], root: str) -> tuple[list[str], list[int]]:
    """Labels for ``paths`` from a ``path,label`` CSV (a header row is optional; CSV paths are
    relative to the source folder or ``--root``). Class names are the labels of listed files."""
    data = read_input(csv_path, "--labels", MAX_LIST_BYTES)
    try:
        text = data.decode("utf-8-sig")  # -sig: Excel's BOM
        rows = [row for row in csv.reader(io.StringIO(text, newline="")) if row]
    except (UnicodeDecodeError, csv.Error) as error:
        raise UsageError(f"--labels {csv_path}: not a UTF-8 CSV file ({error})") from None
    if rows and [cell.strip().lower() for cell in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    by_path: dict[str, str] = {}
    for number, row in enumerate(rows, start=1):
        if len(row) < 2:
            raise UsageError(f"--labels {csv_path}: line {number} is not 'path,label'")
        key = os.path.normpath(os.path.relpath(row[0], root) if os.path.isabs(row[0]) else row[0])
        by_path[key] = row[1].strip()
    class_names = sorted({by_path[p] for p in paths if p in by_path})
    if not class_names:
        raise UsageError(
            f"--labels {csv_path}: no row names a listed file (paths are relative to {root})"
        )
    index = {name: i for i, name in enumerate(class_names)}
    labels = [index[by_path[p]] if p in by_path else -1 for p in paths]
    return class_names, labels
