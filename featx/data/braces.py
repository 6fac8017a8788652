"""Brace lists in source names: the shell's ``{a,b}`` and ``{00000..00099}``, for URLs and for
quoted arguments the shell did not expand (WebDataset and img2dataset name shards this way).

Bounded three ways, each refused in one line before more is built: the number of names
(``MAX_EXPANDED``), their total length (``MAX_EXPANDED_CHARS``) and the brace groups in one
name, nested or in a row (``MAX_BRACE_GROUPS``: each group is one level of the expansion).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from featx.errors import UsageError

_BRACES = re.compile(r"\{([^{}]*)\}")
MAX_EXPANDED = 10_000_000  # names
MAX_EXPANDED_CHARS = 64 << 20  # characters of all names together
MAX_BRACE_GROUPS = 32  # brace groups in one name, nested or in a row


def expand_braces(pattern: str) -> list[str]:
    """``data/{00000..00002}.tar`` → three names (zero padding kept), ``{a,b}`` → two; the
    shell's rules, for URLs and for quoted arguments the shell did not expand.

    Example: ``expand_braces("s/{0..1}.tar") == ["s/0.tar", "s/1.tar"]``
    """
    names = _expand(pattern, pattern, 0)
    if len(set(names)) != len(names):
        raise UsageError(f"{_shown(pattern)}: names the same item twice")
    return names


def _expand(pattern: str, whole: str, groups: int) -> list[str]:
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    if groups >= MAX_BRACE_GROUPS:
        raise UsageError(f"{_shown(whole)}: more than {MAX_BRACE_GROUPS} brace groups")
    body = match.group(1)
    head, tail = pattern[: match.start()], pattern[match.end() :]
    choices = _choices(body, whole)
    if choices is None:  # a literal {x}: kept, the rest expanded
        return [head + "{" + body + "}" + name for name in _expand(tail, whole, groups + 1)]
    names: list[str] = []
    chars = 0
    for choice in choices:
        more = _expand(head + choice + tail, whole, groups + 1)
        names += more
        chars += sum(len(name) for name in more)
        if len(names) > MAX_EXPANDED:
            raise UsageError(f"{_shown(whole)}: names more than {MAX_EXPANDED} items")
        if chars > MAX_EXPANDED_CHARS:
            raise UsageError(
                f"{_shown(whole)}: names more than {MAX_EXPANDED_CHARS >> 20} MiB of names"
            )
    return names


def _choices(body: str, whole: str) -> Iterable[str] | None:
    """The names a group's body stands for, made one at a time; None for a literal group."""
    numeric = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if numeric:
        first, last = numeric.groups()
        start, stop = int(first), int(last)
        width = len(first) if first.startswith("0") and len(first) > 1 else 0
        step = 1 if stop >= start else -1
        if abs(stop - start) >= MAX_EXPANDED:
            raise UsageError(
                f"{_shown(whole)}: the range {body} names more than {MAX_EXPANDED} items"
            )
        return (f"{n:0{width}d}" for n in range(start, stop + step, step))
    return body.split(",") if "," in body else None


def _shown(pattern: str) -> str:
    """A pattern short enough for one line of an error."""
    return pattern if len(pattern) <= 200 else pattern[:200] + "…"
