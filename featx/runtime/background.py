"""Work on a thread behind a bounded queue, so writing shards overlaps compute."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any


class BackgroundWriter:
    """Runs ``handle(item)`` on a thread behind a bounded queue, so writing overlaps compute.

    An error on the writer thread is re-raised in the caller at the next ``put`` or ``close``.
    """

    def __init__(
        self,
        handle: Callable[[Any], None],
        depth: int = 4,
        finish: Callable[[], None] = lambda: None,
    ) -> None:
        """``depth`` 0 writes synchronously in the caller (no thread): the plain path.
        ``finish`` runs on ``close``, after the last item was handled."""
        self._handle = handle
        self._finish = finish
        self.cpu_s = 0.0  # CPU time spent handling items, in this process
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(depth, 1))
        self._error: BaseException | None = None
        self._thread = None
        if depth > 0:
            self._thread = threading.Thread(target=self._run, name="featx-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self._timed(item)
                except BaseException as error:  # handed to the main thread, not swallowed
                    self._error = error

    def _timed(self, item: Any) -> None:
        started = time.thread_time()
        try:
            self._handle(item)
        finally:
            self.cpu_s += time.thread_time() - started

    def put(self, item: Any) -> None:
        self._raise()
        if self._thread is None:
            self._timed(item)
            return
        self._queue.put(item)

    def close(self) -> None:
        """Handle what is queued, then ``finish``; the first error is raised."""
        self._stop()
        self._raise()
        self._finish()

    def close_quietly(self) -> BaseException | None:
        """Stop after another error (without ``finish``): the writer's own error is returned,
        not raised, so the caller can report whichever came first."""
        self._stop()
        error, self._error = self._error, None
        return error

    def _stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
