"""Remote archives fetched whole, one ahead of the one being read, into a bounded scratch folder.

One GET each (never one request per image, and never HTTP range reads: ``python -m http.server``
has none, and fsspec then silently returns the whole file for every range). At most two
downloaded archives are being fetched or indexed at once, besides those whose batches the
decode workers still read (the loader's window), and a server that sends more than it listed is
cut off.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featx.data.filesystem import filesystem_of
from featx.data.remote import filesystem, is_http, local_path, one_line
from featx.safe_text import public_url


@dataclass(frozen=True)
class Fetched:
    """An archive ready to read: a local path, or the error that stopped its fetch."""

    index: int
    path: str | None
    error: str = ""
    copy: bool = False  # a scratch copy, removed once read (a local archive stays where it is)


SCRATCH_BYTES = 8 << 30  # downloaded archives on disk at once (the current one and the next)
# An archive whose size nobody said (an HTTP index page, a gzip-encoded answer without a
# Content-Length) may grow to this on disk, not to the whole scratch budget.
UNSIZED_ARCHIVE_BYTES = 2 << 30
AHEAD = 1  # archives fetched ahead of the one being read
COPY_BLOCK = 16 << 20


class Prefetcher:
    """Fetches the remote archives of ``urls`` in order into ``scratch``, one ahead of the
    reader; local ones are handed over as they are. ``next()`` gives each in turn.

    At most two downloaded archives exist at once (the one being read and the next), and not
    two whose sizes together pass ``budget`` bytes: a larger archive waits for the previous one
    to be released. A failed fetch is reported for its archive; the others go on.
    """

    def __init__(
        self,
        urls: list[str],
        sizes: list[int],
        scratch: Path,
        budget: int = SCRATCH_BYTES,
    ) -> None:
        self.urls, self.sizes, self.scratch, self.budget = urls, sizes, scratch, budget
        self.ready: queue.Queue[Fetched] = queue.Queue(maxsize=1)
        self.held = 0  # bytes of downloaded archives on disk
        self.count = 0  # downloaded archives on disk
        self.space = threading.Condition()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._fetch_all, name="featx-fetch", daemon=True)
        self.thread.start()

    def __iter__(self) -> Iterator[Fetched]:
        for index in range(len(self.urls)):
            while True:
                try:
                    yield self.ready.get(timeout=1.0)
                    break
                except queue.Empty:
                    if not self.thread.is_alive():  # it died: say so, never wait for ever
                        yield Fetched(index, None, "the fetch thread stopped unexpectedly")
                        break

    def hand_over(self, fetched: Fetched) -> None:
        """The reader has indexed an archive: its scratch copy stays for the decode workers,
        which read byte ranges of it, until the loader removes it after its last batch
        (``ShardPiece.scratch``); it no longer counts here, so the next fetch never waits on
        the thread that consumes the batches. Copies awaiting their decode are bounded by the
        loader's window of batches in flight."""
        if fetched.path is None or not fetched.copy:
            return
        with self.space:
            self.held -= self._counted_size(fetched.index)
            self.count -= 1
            self.space.notify_all()

    def release(self, fetched: Fetched) -> None:
        """The reader is done with an archive: its scratch copy is removed."""
        self.hand_over(fetched)
        if fetched.path is not None and fetched.copy:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(fetched.path)

    def close(self) -> None:
        """Stop fetching (a download in progress stops at its next chunk) and remove every
        scratch copy, handed over or not: a stopped or failed run leaves none behind."""
        self.stopping.set()
        with self.space:
            self.space.notify_all()
        with contextlib.suppress(queue.Empty):
            while True:
                self.ready.get_nowait()
        self.thread.join(timeout=30)
        for leftover in self.scratch.glob("fetch-*"):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()

    def _counted_size(self, index: int) -> int:
        """An archive's share of the budget: its size, or the bound on one of unknown size."""
        size = self.sizes[index]
        return size if size >= 0 else min(UNSIZED_ARCHIVE_BYTES, self.budget)

    def _fetch_all(self) -> None:
        for index, url in enumerate(self.urls):
            if self.stopping.is_set():
                return
            if not filesystem_of(url).remote:
                fetched = Fetched(index, local_path(url))
            else:
                size = self._counted_size(index)
                with self.space:  # wait until the scratch space allows it (or nothing is held)
                    while self.count and (self.held + size > self.budget or self.count > AHEAD):
                        if self.stopping.is_set():
                            return
                        self.space.wait(0.5)
                    self.held += size
                    self.count += 1
                fetched = self._download(index, url, self.sizes[index])
                if fetched.path is None:
                    with self.space:
                        self.held -= size
                        self.count -= 1
            while not self.stopping.is_set():
                try:
                    self.ready.put(fetched, timeout=0.5)
                    break
                except queue.Full:
                    continue

    def _download(self, index: int, url: str, size: int) -> Fetched:
        target = self.scratch / f"fetch-{index:06d}{Path(url).suffix}"
        try:
            fs, path = filesystem(url)
            # O_EXCL | O_NOFOLLOW: a name planted in the scratch folder is never written through.
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            # Never more than the listing said (or UNSIZED_ARCHIVE_BYTES, where it said nothing):
            # a server that streams without end must not fill the disk.
            limit = self._counted_size(index)
            with open(fd, "wb") as file, _Bounded(file, limit, self.stopping) as handle:
                if is_http(fs):
                    fs.get_file(path, handle)  # one streamed GET, no range requests
                else:  # object stores: large sequential reads
                    with fs.open(path, "rb", block_size=COPY_BLOCK) as source:
                        shutil.copyfileobj(source, handle, COPY_BLOCK)
                got = handle.written
            if size >= 0 and got != size:
                raise OSError(f"fetched {got} bytes, the listing said {size}")
            return Fetched(index, str(target), copy=True)
        except Exception as error:  # network and storage errors: this archive's, reported
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
            return Fetched(index, None, f"cannot fetch {public_url(url)}: {one_line(error)}")


class _Bounded:
    """A file to write that refuses to grow past ``limit`` bytes."""

    def __init__(self, file: Any, limit: int, stopping: threading.Event) -> None:
        self.file, self.limit, self.written, self.stopping = file, limit, 0, stopping

    def write(self, data: bytes) -> int:
        if self.stopping.is_set():
            raise OSError("stopped")
        self.written += len(data)
        if self.written > self.limit:
            raise OSError(
                f"the server sent more than the {self.limit} bytes it listed (or featx's bound "
                "for an archive of unknown size)"
            )
        return int(self.file.write(data))

    def tell(self) -> int:
        return self.written

    def read(self, size: int = -1) -> bytes:  # fsspec takes an object with read/close/tell
        raise OSError("not readable")  # for a file, not a path

    def close(self) -> None:
        return None

    def __enter__(self) -> _Bounded:
        return self

    def __exit__(self, *exc: object) -> None:
        return None
