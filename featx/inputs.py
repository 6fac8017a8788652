"""Small user files read whole (``--config``, ``--labels``, ``--files-from``), read safely.

Only a regular file or ``-`` (stdin) is accepted, and only up to a size limit: a FIFO would
wait forever, ``/dev/zero`` never ends, and a huge file would exhaust memory before a line of
it was checked.
"""

from __future__ import annotations

import os
import stat
import sys

from featx.errors import UsageError

MAX_CONFIG_BYTES = 1 << 20
MAX_LIST_BYTES = 512 << 20  # paths or labels of several million files


def read_input(path: str | os.PathLike[str], option: str, limit: int) -> bytes:
    """The bytes of a regular file (or stdin for ``-``) of at most ``limit`` bytes, or a
    UsageError naming ``option``.

    Example: ``read_input("run.toml", "--config", MAX_CONFIG_BYTES)``
    """
    where = f"{option} {os.fsdecode(path)}"
    if os.fspath(path) == "-":
        data = sys.stdin.buffer.read(limit + 1)
    else:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO's open cannot hang
        except OSError as error:
            raise UsageError(f"{where}: {error.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise UsageError(
                    f"{where}: not a regular file (a folder, pipe or device); "
                    "pass a file, or - to read stdin"
                )
            if info.st_size > limit:
                raise UsageError(f"{where}: {info.st_size} bytes, over the limit of {limit}")
            with open(fd, "rb", closefd=False) as handle:
                data = handle.read(limit + 1)
        finally:
            os.close(fd)
    if len(data) > limit:
        raise UsageError(f"{where}: more than {limit} bytes")
    return data
