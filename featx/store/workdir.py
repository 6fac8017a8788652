"""The work folder ``OUT.featx/``: its lifecycle (start, resume, discard) and whether to trust it.

The sorted work list is cut into fixed-size shards (``shard_size`` images each, independent of
batch size and process count); ``store.shards`` writes each one to a temporary name, fsynced and
atomically renamed into this folder, so a shard file that exists is complete and a resume does
only the missing ones. The numbering depends only on the sorted work list, so one process, a
torchrun job or N ``--shard K/N`` parts produce the same rows.

Layout::

    run.json              fingerprint (what is computed) + created time + shard size + total
    shard-000007.h5       one finished shard (``store.shards``)
    fetch-HOST-RANK/      a process's fetched archives (``WorkDir.scratch``)

The folder is shared scratch space's most tempting target, so it is created private (0700); one
that is a link, belongs to another user or is writable by others is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py

from featx.errors import FeatxError, ResumeMismatch, UsageError
from featx.store import schema
from featx.store.durable import atomic_output, write_error

RUN_JSON = "run.json"
MAX_RUN_JSON_BYTES = 16 << 20  # a fingerprint holds a digest, not the file list
_SHARD_NAME = re.compile(r"shard-(\d{6,})\.h5")


def shard_ranges(total: int, shard_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + shard_size, total)) for start in range(0, total, shard_size)]


def work_dir_of(out: Path) -> Path:
    return out.with_name(out.name + ".featx")


@dataclass
class WorkDir:
    """The shards of one extraction into ``out``; see the module docstring."""

    out: Path
    fingerprint: dict[str, Any]
    shard_size: int
    total: int
    created: str

    @property
    def path(self) -> Path:
        return work_dir_of(self.out)

    @property
    def shard_count(self) -> int:
        return len(shard_ranges(self.total, self.shard_size))

    def shard_path(self, shard: int) -> Path:
        return self.path / f"shard-{shard:06d}.h5"

    def is_done(self, shard: int) -> bool:
        return self.shard_path(shard).is_file()

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.total)

    def files_in(self, shards: list[int] | range) -> int:
        return sum(len(range(*self.shard_range(shard))) for shard in shards)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def scratch(self, rank: int) -> Path:
        """The private folder of the process of torchrun rank ``rank`` (``Job.rank``) for
        fetched archives, emptied of what a killed run left: one per host and rank, so ranks
        never share one.

        Example: ``work.scratch(job.rank)`` → ``OUT.featx/fetch-node7-3``
        """
        import socket

        if type(rank) is not int or rank < 0:  # a path is built from it: never free text
            raise ValueError(f"a rank is a non-negative int, not {rank!r}")
        path = self.path / f"fetch-{socket.gethostname()}-{rank}"
        try:
            if os.path.lexists(path):
                if os.path.islink(path) or not os.path.isdir(path):
                    os.unlink(path)
                else:
                    shutil.rmtree(path)
            os.mkdir(path, 0o700)
        except OSError as error:  # a read-only work folder: one line, not a traceback
            raise FeatxError(f"cannot make the scratch folder {path}: {error.strerror}") from None
        return path

    def write_error(self, error: OSError) -> FeatxError:
        return write_error(error, self.out, self.path)


def changed_archives(work: WorkDir, shards: list[int], identities: Sequence[str]) -> list[str]:
    """``shard file: made from X, now Y`` for each finished shard whose archive changed since."""
    changed = []
    for shard in shards:
        with h5py.File(work.shard_path(shard), "r") as f:
            made_from = f.attrs.get(schema.SHARD_ARCHIVE, "")
        made_from = made_from.decode() if isinstance(made_from, bytes) else str(made_from)
        if made_from != identities[shard]:
            changed.append(
                f"{work.shard_path(shard).name} was made from {made_from!r}, now "
                f"{identities[shard]!r}"
            )
    return changed


def open_work_dir(
    out: Path,
    fingerprint: dict[str, Any],
    shard_size: int,
    total: int,
    overwrite: bool,
    *,
    shard_size_given: bool = True,
) -> WorkDir:
    """Start or resume the shards for ``out``; a resume must match the fingerprint exactly.

    The shard size must match too when ``shard_size_given`` (the user chose it); otherwise an
    unfinished run of the same fingerprint keeps its own, and the WorkDir returned carries it.
    The folder is created private (0700). One that is a link, belongs to another user or is
    writable by others is refused (another user could have planted its shards); malformed
    content in it (``run.json``, stray shard files) is refused too, and ``--overwrite``
    discards it, as it discards a run of other settings.

    Example: ``open_work_dir(Path("feats.h5"), fingerprint, 256, 10_000, overwrite=False)``
    """
    path = work_dir_of(out)
    _check_trusted(out, path, overwrite)
    meta = _existing_run(out, path, overwrite)
    if meta is not None:
        changes = _changes(meta, fingerprint, shard_size if shard_size_given else None)
        if not changes:
            return WorkDir(out, fingerprint, meta["shard_size"], total, meta["created"])
        if not overwrite:
            raise ResumeMismatch(
                f"{out}: an unfinished run with other settings is in {path} "
                f"({'; '.join(changes)}); run it with its own settings to finish it, "
                f"or pass --overwrite to discard it"
            )
        shutil.rmtree(path)  # --overwrite discards a run of other settings only
    _start_run(path, fingerprint, shard_size, total)
    # Read back what is there now: this run's, or the one a torchrun rank or racing run made.
    return open_work_dir(
        out, fingerprint, shard_size, total, overwrite=False, shard_size_given=shard_size_given
    )


def _check_trusted(out: Path, path: Path, overwrite: bool) -> None:
    """UsageError unless the work folder is trusted or absent; ``overwrite`` removes one that
    is not, unless another user owns it."""
    problem = _untrusted(path)
    if problem and overwrite and "owned by" not in problem:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)  # a link: the link only, never what it points at
        return
    if problem:
        raise UsageError(
            f"{out}: the work folder {path} {problem}; featx will not trust or write it: "
            "remove it (or ask its owner to) or choose another -o"
        )


def _untrusted(path: Path) -> str:
    """Why the work folder at ``path`` cannot be trusted, or "" (also when there is none)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return ""
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link"
    if info.st_uid != os.geteuid():
        return f"is owned by another user (uid {info.st_uid})"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a folder"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "is writable by other users"
    return ""


def _existing_run(out: Path, path: Path, overwrite: bool) -> dict[str, Any] | None:
    """The unfinished run's ``run.json``, or None when there is none (or ``overwrite`` discarded
    a folder that is not a run of featx)."""
    if not os.path.lexists(path):
        return None
    try:
        return _read_meta(path)
    except ValueError as error:
        if not overwrite:
            raise UsageError(
                f"{out}: the work folder {path} is not a run of featx ({error}); pass "
                "--overwrite to discard it"
            ) from None
    shutil.rmtree(path)
    return None


def _changes(
    meta: dict[str, Any], fingerprint: dict[str, Any], shard_size: int | None
) -> list[str]:
    """What differs between the unfinished run and this one; ``shard_size`` None: any will do."""
    changes = schema.differences(meta["fingerprint"], fingerprint)
    if shard_size is not None and meta["shard_size"] != shard_size:
        changes.append(f"shard_size: {meta['shard_size']} → {shard_size}")
    return changes


def _start_run(path: Path, fingerprint: dict[str, Any], shard_size: int, total: int) -> None:
    """Create the private folder and its ``run.json``; nothing when another process made the
    folder first (the caller reads and checks it)."""
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # whatever the umask
    except FileExistsError:
        return
    except OSError as error:  # a read-only folder: one line, not a traceback
        raise FeatxError(f"cannot make the work folder {path}: {error.strerror}") from None
    meta = {
        "fingerprint": fingerprint,
        "shard_size": shard_size,
        "total": total,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "schema": schema.SCHEMA_VERSION,
    }
    meta_path = path / RUN_JSON
    try:
        with atomic_output(meta_path, overwrite=True) as temporary:
            temporary.write_text(json.dumps(meta, indent=1))
    except OSError as error:
        raise FeatxError(f"cannot write {meta_path}: {error.strerror}") from None


def _read_meta(path: Path) -> dict[str, Any]:
    """``run.json`` of the work folder, checked; ValueError saying what is wrong with it or
    with the shard files beside it."""
    names = os.listdir(path)
    if RUN_JSON not in names:
        raise ValueError(f"no {RUN_JSON}")
    meta = _read_run_json(path / RUN_JSON)
    if not (
        isinstance(meta, dict)
        and isinstance(meta.get("fingerprint"), dict)
        and isinstance(meta.get("created"), str)
        and type(meta.get("shard_size")) is int
        and type(meta.get("total")) is int
        and meta["shard_size"] >= 1
        and meta["total"] >= 0
    ):
        raise ValueError(f"{RUN_JSON} lacks the fingerprint, created time, total or shard size")
    shard_count = len(shard_ranges(meta["total"], meta["shard_size"]))
    for name in names:
        match = _SHARD_NAME.fullmatch(name)
        if name.startswith("shard-") and (not match or int(match.group(1)) >= shard_count):
            raise ValueError(f"{name} is not one of its {shard_count} shards")
    return meta


def _read_run_json(path: Path) -> Any:
    """The JSON in ``path``, a plain file of this user under the size limit (never a link)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        raise ValueError(f"{RUN_JSON}: {error.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise ValueError(f"{RUN_JSON} is not a plain file of this user")
        if info.st_size > MAX_RUN_JSON_BYTES:
            raise ValueError(f"{RUN_JSON} is {info.st_size} bytes")
        with open(fd, "rb", closefd=False) as handle:
            return json.loads(handle.read(MAX_RUN_JSON_BYTES + 1))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError(f"{RUN_JSON} is not JSON") from None
    finally:
        os.close(fd)
