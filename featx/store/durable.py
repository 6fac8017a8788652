"""Writes that survive crashes, full disks and a second writer.

Every file featx publishes goes through :func:`atomic_output`: written under a temporary name
in the target folder, fsynced, renamed over the target, and deleted if anything fails first, so
a reader sees either the old file or the whole new one. HDF5 writes go through
:class:`DiskFile`, which keeps a failed write (disk full, quota, ``ulimit -f``) to itself so that
HDF5 can still close the file. :func:`output_lock` keeps two runs off one output.

Outputs often go to shared scratch folders that other users can write to, so nothing here
follows a link: temporary files are made by :mod:`tempfile` (``O_EXCL``, unpredictable names,
mode 0600 until published) and every other open uses ``O_NOFOLLOW``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py

from featx.errors import FeatxError, OutputLocked, UsageError


def fsync_path(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(temporary: Path, final: Path) -> None:
    """Make ``temporary`` appear at ``final`` all at once, surviving a crash right after."""
    fd = os.open(temporary, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, FILE_MODE)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, final)
    fsync_path(final.parent)


def temporary_name(final: Path) -> Path:
    """A new empty file beside ``final`` that nobody else can have named: created by
    :func:`tempfile.mkstemp` (``O_EXCL``, a random name, mode 0600), so a link planted in a
    shared folder can never redirect the write. :func:`publish` gives it the usual mode."""
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent or ".")
    os.close(fd)
    return Path(name)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would have given a new file


def check_writable(out: Path) -> None:
    """Fail before any work when the output's folder is missing or read-only."""
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"output {out}: folder {parent} does not exist (mkdir -p {parent})")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"output {out}: folder {parent} is not writable")
    if out.is_dir():
        raise UsageError(f"output {out} is a directory")


def refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise UsageError(f"output {out} exists; pass --overwrite to replace it")


def check_output(out: Path, overwrite: bool) -> None:
    """Everything about an output path that can be refused before any work is done."""
    check_writable(out)
    refuse_existing(out, overwrite)


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; when the block succeeds it replaces ``out`` at
    once, when it fails it is deleted. The one way featx writes a file it hands to a user.

    Example::

        with atomic_output("preds.csv", overwrite=True) as temporary:
            temporary.write_text("path,label\\n")
    """
    final = Path(out)
    check_output(final, overwrite)
    temporary = temporary_name(final)
    try:
        yield temporary
        publish(temporary, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


class DiskFile:
    """The file h5py writes through (its ``fileobj`` driver), keeping a failed write to itself.

    HDF5 that sees a write fail (disk full, quota, ``ulimit -f``) cannot close its file any more
    and crashes the interpreter at exit. So the first write error is kept here and later writes
    are dropped: HDF5 closes cleanly, :meth:`check` raises the kept error, the file is deleted.
    """

    def __init__(self, path: Path) -> None:
        # O_NOFOLLOW: ``path`` is a temporary_name() file; never write through a link.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        self.raw = open(fd, "w+b", buffering=0)  # closed by close()
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        while len(view) and self.error is None:
            try:
                view = view[self.raw.write(view) :]  # raw writes may be partial
            except OSError as error:
                self.error = error
        return size

    def readinto(self, buffer: Any) -> int:
        return self.raw.readinto(buffer)

    def read(self, size: int = -1) -> bytes:
        return self.raw.read(size)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def truncate(self, size: int | None = None) -> int:
        try:
            return self.raw.truncate(size)
        except OSError as error:
            self.error = self.error or error
            return self.raw.tell()

    def flush(self) -> None:
        pass  # unbuffered

    def close(self) -> None:
        self.raw.close()

    def check(self) -> None:
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def writing_hdf5(path: Path) -> Iterator[h5py.File]:
    """``h5py.File(path, "w")`` through a :class:`DiskFile`: a failed write is raised as the
    OSError it was once HDF5 has closed cleanly."""
    disk = DiskFile(path)
    try:
        with h5py.File(disk, "w", track_order=True) as f:
            yield f
    except OSError:
        disk.check()  # the disk's own error (ENOSPC, EFBIG) says more than HDF5's rewording
        raise
    finally:
        disk.close()
    disk.check()


def write_error(error: OSError, out: Path, kept_in: Path) -> FeatxError:
    """One line for a failed write, saying that finished shards are kept for a resume."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return FeatxError(
            f"cannot write {out}: {error.strerror} (disk full, quota or file-size limit); "
            f"finished shards are kept in {kept_in}: free some space and run the same "
            "command again to resume"
        )
    return FeatxError(
        f"cannot write {out}: {error.strerror or error}; finished shards are kept in "
        f"{kept_in}: fix the cause and run the same command again to resume"
    )


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Refuse a second writer of the same output, whatever HDF5's own locking is set to.

    The lock file is featx's own (``.OUT.lock``); the kernel drops the flock when the
    holder dies, so a killed run never leaves a stale lock behind. It is opened with
    ``O_NOFOLLOW`` and only written when it is a plain file of this user with one name, so a
    link or hard link planted in a shared folder cannot turn the write onto another file.
    """
    lock_path = out.with_name(f".{out.name}.lock")
    fd = _locked(lock_path, out)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"featx pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
        lock_path.unlink(missing_ok=True)  # tidy after success; a killed run leaves it, harmless
    finally:
        os.close(fd)


def _locked(lock_path: Path, out: Path) -> int:
    """An fd holding the flock on the file now at ``lock_path``."""
    while True:
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o644)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise UsageError(
                    f"output {out}: its lock file {lock_path} is a symbolic link, which featx "
                    "never writes through; remove it (someone else may have planted it)"
                ) from None
            raise UsageError(
                f"output {out}: cannot create files there ({error.strerror})"
            ) from None
        _refuse_foreign_lock(fd, lock_path, out)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputLocked(
                f"output {out} is being written by {holder}; wait for it or choose another -o"
            ) from None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(lock_path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder finished and removed it just now: lock the one there now


def _refuse_foreign_lock(fd: int, lock_path: Path, out: Path) -> None:
    """UsageError (closing ``fd``) unless the lock file is a plain file of this user with one
    link: another name for it (a hard link) would be someone else's file."""
    info = os.fstat(fd)
    problem = (
        "not a regular file"
        if not stat.S_ISREG(info.st_mode)
        else "another file's hard link"
        if info.st_nlink != 1
        else "owned by another user"
        if info.st_uid != os.geteuid()
        else ""
    )
    if problem:
        os.close(fd)
        raise UsageError(
            f"output {out}: its lock file {lock_path} is {problem}; featx will not write it: "
            "remove it or choose another -o"
        )
