"""The one small exception family. The CLI turns each into one line on stderr and its exit code."""

from __future__ import annotations

from typing import Any, Protocol

# Documented exit codes (README "Exit codes"); every command uses these and no others.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TOO_MANY_FAILURES = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143
EXIT_BROKEN_PIPE = 141  # stdout closed early (`| head`) after the work completed, as Unix tools


class Summary(Protocol):
    """What a finished command reports (``ExtractResult``): kept on errors raised after it."""

    def as_dict(self) -> dict[str, Any]: ...


class FeatxError(Exception):
    """Base class: a problem the user can act on. ``exit_code`` is what the CLI returns."""

    exit_code = EXIT_FAILED


class UsageError(FeatxError):
    """Bad arguments or inputs: unknown model or layer, missing source, conflicting options."""

    exit_code = EXIT_USAGE


class ResumeMismatch(UsageError):
    """An unfinished run of different settings sits at the output path."""


class HeadMismatch(UsageError):
    """A head meets features of another extraction (model, weights, layer, pool or transform)."""


class OfflineError(FeatxError):
    """Weights are neither cached nor reachable."""


class OutputLocked(FeatxError):
    """Another featx process is writing the same output."""


class TooManyFailures(FeatxError):
    """The output was written, but more images failed than ``--max-failures`` allows."""

    exit_code = EXIT_TOO_MANY_FAILURES

    def __init__(self, message: str, result: Summary | None = None) -> None:
        super().__init__(message)
        self.result = result  # the run's summary: the file exists, CI may still want the numbers


class Interrupted(FeatxError):
    """SIGINT or SIGTERM arrived; finished shards are kept and the run can be resumed."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum
