"""The Typer app every command module registers on, and the one place errors become exit codes.

torch and h5py are imported inside the commands, so ``featx --help`` answers at once.
Exit codes: 0 done, 1 failed, 2 usage error, 3 too many failed images, 130/143 interrupted,
141 stdout closed early (``| head``) after the work completed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Annotated, Any, TypeVar

import typer

from featx import __version__
from featx.errors import EXIT_BROKEN_PIPE, EXIT_SIGINT, FeatxError
from featx.safe_text import for_terminal

app = typer.Typer(
    name="featx",
    help="Extract features of image folders with a cut pretrained backbone, into HDF5.\n\n"
    "Example: featx extract ./photos -o feats.h5 --model efficientnet_lite0 --layer blocks.5",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

F = TypeVar("F", bound=Callable[..., Any])
# A second Ctrl-C (or one outside extract's loop): files already published stay as they are.
RESUME_HINT = (
    "files already written are kept (an extract keeps its finished shards: run the same "
    "command again to resume)"
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(for_terminal(f"featx {__version__}"))
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = None,
) -> None:
    """Extract features of image folders with a cut pretrained backbone, into HDF5."""


def reports_errors(command: F) -> F:
    """One place where library exceptions become one line on stderr and an exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except FeatxError as error:
            typer.echo(for_terminal(f"featx: error: {error}"), err=True)
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            typer.echo(for_terminal(f"featx: interrupted by SIGINT; {RESUME_HINT}"), err=True)
            raise typer.Exit(EXIT_SIGINT) from None
        except BrokenPipeError:
            # The reader of stdout went away (`| head -1`): nothing to report, nothing lost.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(EXIT_BROKEN_PIPE) from None

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def libraries_silenced(quiet: bool) -> Iterator[None]:
    """With ``--quiet``, what decoders print themselves (Pillow's warnings and log records,
    libtiff's C-level messages on file descriptor 2, in this process and in the decode workers
    it forks) goes nowhere, while featx's own lines (``sys.stderr``) still reach the real
    stderr."""
    if not quiet:
        yield
        return
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    own_stream = _writes_to_fd2(sys.stderr)
    stream = sys.stderr
    try:
        if own_stream:
            sys.stderr.flush()
            sys.stderr = open(os.dup(saved), "w", buffering=1, errors="backslashreplace")  # noqa: SIM115
        os.dup2(devnull, 2)
        # Pillow reports some bad files through `logging` (its TIFF reader's "More samples per
        # pixel than can be decoded"), which with no handler prints to sys.stderr: the real one
        # here, for featx's own lines. Decode workers fork inside and inherit all three.
        logging.disable(logging.CRITICAL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
        if sys.stderr is not stream:
            sys.stderr.close()
            sys.stderr = stream


def _writes_to_fd2(stream: Any) -> bool:
    try:
        return bool(stream.fileno() == 2)
    except (AttributeError, OSError, ValueError):  # a test runner's in-memory stream
        return False


def emit(data: Any) -> None:
    """Machine output: JSON on stdout, one document."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def show(line: str) -> None:
    """A line of a command's output on stdout: names in it come from files, so controls are
    escaped."""
    print(for_terminal(line))


def say(message: str, quiet: bool = False) -> None:
    """Human output: stderr, control characters in names escaped."""
    if not quiet:
        typer.echo(for_terminal(message, newlines=True), err=True)
