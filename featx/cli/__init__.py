"""The ``featx`` command: each command parses its flags, builds one config dataclass
(``config.settings``), calls one library function, and prints; errors become one line and an
exit code in ``_app.reports_errors``. Commands by family: extract.py (extract, bench, merge),
explore.py (layers, info, models, plot, export), weights.py, heads.py (train-head, predict,
evaluate), probe.py (probe).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from featx.cli import explore, extract, heads, probe, weights  # noqa: F401  (they register)
from featx.cli._app import RESUME_HINT, app
from featx.errors import EXIT_BROKEN_PIPE

__all__ = ["app", "main"]


def _terminated(signum: int, _frame: Any) -> None:
    """SIGTERM outside the extraction loop (start-up, assembly): the same one line and 143
    as inside it, where pipeline.py's own handler lets the batch in flight finish first."""
    from featx.errors import Interrupted

    raise Interrupted(f"interrupted by SIGTERM; {RESUME_HINT}", signum)


def main() -> None:
    """Entry point of the ``featx`` script."""
    # Past a file-size limit (`ulimit -f`) the kernel sends SIGXFSZ, which kills at once. Ignored,
    # the write fails with EFBIG instead and is reported like a full disk, shards kept.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _terminated)
    try:
        app()
    finally:
        # Block-buffered stdout is flushed here, not at interpreter exit, so a reader that left
        # early (`| head -1`) costs a quiet exit 141 instead of an "Exception ignored" trace.
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(EXIT_BROKEN_PIPE) from None
