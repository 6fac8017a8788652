"""The progress bar on stderr (tqdm): shown when stderr is a terminal, unless asked otherwise."""

from __future__ import annotations

import os
import sys
from typing import Protocol

from featx.safe_text import for_terminal


def show_progress(requested: bool | None) -> bool:
    if requested is not None:
        return requested
    return sys.stderr.isatty()


class Progress(Protocol):
    """What the run asks of its progress bar (tqdm's own methods)."""

    def update(self, n: float | None = 1) -> bool | None: ...

    def close(self) -> None: ...


def progress_bar(total: int | None, initial: int, enabled: bool, desc: str) -> Progress:
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        unit="img",
        desc=for_terminal(desc),
        file=sys.stderr,
        dynamic_ncols=True,
        smoothing=0.05,
        colour=None if os.environ.get("NO_COLOR") else "green",
    )


def note(message: str | None, quiet: bool = False, kind: str = "") -> None:
    """One line for a person on stderr (``kind``: "warning: "), unless quiet or nothing to say."""
    if message and not quiet:
        print(for_terminal(f"featx: {kind}{message}"), file=sys.stderr, flush=True)
