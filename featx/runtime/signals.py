"""Ctrl-C and SIGTERM during a run: the loop finishes the batch in flight, then stops cleanly."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from featx.safe_text import for_terminal


class StopSignals:
    """Turn SIGINT/SIGTERM into a flag the loop checks between batches."""

    def __init__(self, notice: str = "") -> None:
        """``notice`` is written to stderr at once on the first signal (the batch in flight
        may take seconds to finish, and a bare ``^C`` looks like a hang)."""
        self.notice = for_terminal(notice, newlines=True)
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received is not None:  # a second Ctrl-C: stop waiting for the batch in flight
            raise KeyboardInterrupt
        self.received = signum
        if self.notice:
            # os.write, not print: a handler may interrupt a print to stderr in progress.
            os.write(2, self.notice.encode())

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
