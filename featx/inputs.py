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
MAX_CLASS_NAMES_BYTES = 16 << 20  # a million classes of a few words each
MAX_CLASS_NAME = 1000  # characters; a head refuses longer names


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


def read_class_names(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """The class names of a ``--class-names`` file: UTF-8, one name per line (line i names
    class i; spaces at either end dropped, a final newline optional), no empty line, no
    control character, no name twice; else one UsageError naming the line.

    Example: ``read_class_names("classes.txt")`` → ``("cat", "coffee", "rocket")``
    """
    where = f"--class-names {os.fsdecode(path)}"
    data = read_input(path, "--class-names", MAX_CLASS_NAMES_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"{where}: not UTF-8 text (byte {error.start})") from None
    names = [line.strip() for line in text.removeprefix("\ufeff").splitlines()]
    if not names:
        raise UsageError(f"{where}: no class names (one per line: line i names class i)")
    seen: dict[str, int] = {}
    for number, name in enumerate(names, start=1):
        problem = _class_name_problem(name, seen)
        if problem:
            raise UsageError(f"{where}: line {number} {problem}")
        seen[name] = number
    return tuple(names)


def _class_name_problem(name: str, seen: dict[str, int]) -> str:
    if not name:
        return "is empty (line i names class i: every line needs a name)"
    if len(name) > MAX_CLASS_NAME:
        return f"is longer than {MAX_CLASS_NAME} characters"
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in name):
        return "holds a control character"
    if name in seen:
        return f"repeats the name on line {seen[name]}"
    return ""
