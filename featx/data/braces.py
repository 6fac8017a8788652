"""Brace lists in source names: the shell's ``{a,b}`` and ``{00000..00099}``, for URLs and for
quoted arguments the shell did not expand (WebDataset and img2dataset name shards this way)."""

from __future__ import annotations

import re

from featx.errors import UsageError

_BRACES = re.compile(r"\{([^{}]*)\}")
MAX_EXPANDED = 10_000_000


def expand_braces(pattern: str) -> list[str]:
    """``data/{00000..00002}.tar`` → three names (zero padding kept), ``{a,b}`` → two; the
    shell's rules, for URLs and for quoted arguments the shell did not expand.

    Example: ``expand_braces("s/{0..1}.tar") == ["s/0.tar", "s/1.tar"]``
    """
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if numeric:
        first, last = numeric.groups()
        start, stop = int(first), int(last)
        width = len(first) if first.startswith("0") and len(first) > 1 else 0
        step = 1 if stop >= start else -1
        if abs(stop - start) >= MAX_EXPANDED:
            raise UsageError(f"{pattern}: the range {body} names more than {MAX_EXPANDED} items")
        choices = [f"{n:0{width}d}" for n in range(start, stop + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:
        return [pattern[: match.end()] + name for name in expand_braces(pattern[match.end() :])]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    names: list[str] = []
    for choice in choices:
        names += expand_braces(head + choice + tail)
        if len(names) > MAX_EXPANDED:
            raise UsageError(f"{pattern}: names more than {MAX_EXPANDED} items")
    if len(set(names)) != len(names):
        raise UsageError(f"{pattern}: names the same item twice")
    return names
