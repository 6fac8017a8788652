"""A WebDataset tar → its samples, in member order, with every problem named.

Members are grouped into samples by the name before the last extension (``a/photo.v2.jpg`` is
sample ``a/photo.v2``; WebDataset's first-dot rule would make it ``a/photo``), consecutive
members only, as every WebDataset reader groups them. What such readers skip silently is a
failure here, with its reason: a member of a sample that is not next to the others, a sample
without an image, a second image, a duplicate member, a link or device named like an image, a
label that is not one. A tar that ends early or has a broken header raises :class:`BrokenArchive`
(its shard is then not written), because a member cut off at the end cannot be told from the
last one.
"""

from __future__ import annotations

import functools
import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from featx.data.archives import Sample
from featx.data.tar_index import BrokenArchive, TarReader
from featx.data.work import FileRange
from featx.data.worklist import IMAGE_SUFFIXES
from featx.limits import MAX_CLASSES

MAX_LABEL_BYTES = 1 << 20  # a .cls or .json member read for the label
__all__ = [
    "BrokenArchive",
    "Member",
    "group_samples",
    "json_field",
    "sample_key",
    "tar_samples",
]


def sample_key(name: str) -> tuple[str, str]:
    """(sample key, extension) of a member: the name split at its last dot (the base name's)."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.rpartition(".")
    if not dot or not stem:
        return name, ""
    return (folder + "/" if folder else "") + stem, extension.lower()


IMAGE_EXTENSIONS = frozenset(suffix[1:] for suffix in IMAGE_SUFFIXES)


@dataclass(frozen=True)
class Member:
    """One file of a sample, whatever holds it (a tar member, a file in a shard folder)."""

    name: str
    size: int
    kind: str  # "" for a regular file, else what it is ("symbolic link", …): never read
    read: Callable[[], bytes]  # its bytes, at most ``size``; BrokenArchive if it cannot be read
    where: FileRange  # where a worker reads its bytes (the main process reads only labels)

    @property
    def regular(self) -> bool:
        return not self.kind


def tar_samples(path: str, label_from: str, max_bytes: int) -> Iterator[Sample]:
    """The samples of the tar at ``path``, in member order; BrokenArchive if it is cut short.
    An image is the :class:`FileRange` of its bytes in the tar, for a worker to read: only
    headers and labels are read here."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO's open cannot hang
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BrokenArchive("not a regular file (a FIFO, device or folder named like a tar)")
        reader = TarReader(fd, info.st_size)
        real = os.path.realpath(path)  # the workers open it without following a link
        yield from group_samples(_members(reader, real), label_from, max_bytes)
    finally:
        os.close(fd)


def _members(reader: TarReader, path: str) -> Iterator[Member]:
    for member in reader.members():
        if member.kind == "folder":
            continue
        yield Member(
            member.name,
            member.size,
            "" if member.is_file else member.kind,
            functools.partial(reader.read, member, member.size),
            FileRange(path, member.offset, member.size),
        )


def group_samples(members: Iterable[Member], label_from: str, max_bytes: int) -> Iterator[Sample]:
    """Members → samples: consecutive members of one key make a sample (see the module's
    docstring); whatever breaks the rule is a failure with its reason."""
    finished: dict[str, str] = {}  # key of every sample already given → its first member
    group: _Group | None = None
    for member in members:
        key, extension = sample_key(member.name)
        if group is not None and key != group.key:
            finished[group.key] = group.first
            yield from group.samples()
            group = None
        if key in finished:
            yield Sample(
                member.name,
                None,
                error=f"NotContiguous: member of sample {key!r}, which ended at "
                f"{finished[key]!r}: a sample's members must be next to each other in the tar",
                uncounted=True,
            )
            continue
        group = group or _Group(key, member.name, label_from)
        group.add(member, extension, max_bytes)
    if group is not None:
        yield from group.samples()


class _Group:
    """The members of one sample, as they are read."""

    def __init__(self, key: str, first: str, label_from: str) -> None:
        self.key, self.first, self.label_from = key, first, label_from
        self.image: tuple[str, FileRange | None, str] | None = None  # (member, data, error)
        self.label: int | str | None = None
        self.label_error = ""
        self.names: list[str] = []
        self.extra: list[Sample] = []  # members that fail on their own

    def add(self, member: Member, extension: str, max_bytes: int) -> None:
        name = member.name
        if name in self.names:
            self.extra.append(
                Sample(name, None, error="DuplicateMember: the same name again", uncounted=True)
            )
            return
        self.names.append(name)
        if extension in IMAGE_EXTENSIONS:
            if self.image is not None:
                self.extra.append(
                    Sample(
                        name,
                        None,
                        error=f"SecondImage: sample {self.key!r} already has {self.image[0]!r}",
                        uncounted=True,
                    )
                )
            elif not member.regular:
                self.image = (name, None, f"NotAFile: a {member.kind} member, not image data")
            elif member.size > max_bytes:
                self.image = (
                    name,
                    None,
                    f"ValueError: file of {member.size} bytes, over the --max-file-bytes "
                    f"limit of {max_bytes}",
                )
            else:
                self.image = (name, member.where, "")
        elif extension == "cls" and self.label_from == "cls":
            self.label, self.label_error = _class_label(member)
        elif extension == "json" and self.label_from.startswith("json:"):
            self.label, self.label_error = _json_label(member, self.label_from[5:])

    def samples(self) -> Iterator[Sample]:
        if self.image is None:
            members = ", ".join(self.names[:5])
            yield Sample(self.key, None, error=f"NoImage: sample without an image ({members})")
        else:
            name, data, error = self.image
            if self.label_error and not error:
                error = self.label_error
            yield Sample(name, None if error else data, self.label, error, self.names)
        yield from self.extra


def _class_label(member: Member) -> tuple[int | None, str]:
    """(the integer class of a ``.cls`` member, or the error that makes the sample fail)."""
    if not member.regular or member.size > 64:
        return None, f"BadLabel: {member.name} is not a short file holding an integer class"
    text = member.read().decode("ascii", "replace").strip()
    if not text.isdigit() or int(text) >= MAX_CLASSES:
        return None, (
            f"BadLabel: {member.name} holds {text[:20]!r}, not a class number "
            f"(0 to {MAX_CLASSES - 1})"
        )
    return int(text), ""


def _json_label(member: Member, field: str) -> tuple[str | None, str]:
    """(the label at ``field`` of a ``.json`` member, dots naming nested keys, or the error);
    a missing field leaves the sample unlabelled."""
    if not member.regular or member.size > MAX_LABEL_BYTES:
        return None, f"BadLabel: {member.name} is not a JSON file under {MAX_LABEL_BYTES} bytes"
    try:
        value: Any = json.loads(member.read())
    except (ValueError, RecursionError):
        return None, f"BadLabel: {member.name} is not JSON"
    return json_field(value, field, member.name)


def json_field(value: Any, field: str, where: str) -> tuple[str | None, str]:
    """The label at ``field`` (dots: nested keys) as a class name: a string or an integer's
    digits, so that every process names classes alike (assembly numbers them in sorted order)."""
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return None, ""
        value = value[part]
    if value is None:
        return None, ""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return (
            None,
            f"BadLabel: {where}: {field} is {type(value).__name__}, not a string or integer",
        )
    return str(value), ""
