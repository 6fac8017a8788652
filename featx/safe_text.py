"""Names from the file system and from other people's files, made safe for where they go.

* :func:`stored_name`: a file name as UTF-8 text, unambiguously. A byte that is not UTF-8
  becomes ``\\xNN`` and a real backslash becomes ``\\\\``, so no real name can collide with the
  escaped form of another (``caf\\xe9`` in a file is the byte 0xE9; a name holding the four
  characters backslash, x, e, 9 is stored as ``caf\\\\xe9``). :func:`original_name` inverts it.
* :func:`for_terminal`: control characters (escape sequences, carriage returns, bidirectional
  overrides) shown as ``\\xNN`` / ``\\uNNNN`` instead of reaching the terminal.
* :func:`csv_cell`: a cell a spreadsheet will not run as a formula.
* :func:`public_url`: a URL without its user, password and signed-URL tokens, for what is
  stored or printed (:func:`public_text` for every URL in a message).
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Sequence

_BIDI = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F)}


def stored_name(path: str) -> str:
    r"""A path (as ``os.fsdecode`` gives it) as UTF-8 text: ``\`` → ``\\``, a non-UTF-8 byte →
    ``\xNN``. Example: ``stored_name(os.fsdecode(b"caf\xe9.jpg")) == "caf\\xe9.jpg"``"""
    return (
        path.replace("\\", "\\\\")
        .encode("utf-8", "surrogateescape")
        .decode("utf-8", "backslashreplace")
    )


_ESCAPED = re.compile(r"\\(\\|x[0-9a-f]{2})")


def original_name(stored: str) -> str:
    """The path (``os.fsdecode`` form) that :func:`stored_name` turned into ``stored``."""

    def byte(match: re.Match[str]) -> str:
        text = match.group(1)
        return "\\" if text == "\\" else os.fsdecode(bytes([int(text[1:], 16)]))

    return _ESCAPED.sub(byte, stored)


def for_terminal(text: str, newlines: bool = False) -> str:
    """``text`` with control characters escaped (and URLs made :func:`public_url`); ``newlines``
    keeps line breaks and tabs."""
    text = public_text(text)
    kept = "\n\t" if newlines else ""
    return "".join(
        _escape(char)
        if (unicodedata.category(char) == "Cc" and char not in kept) or char in _BIDI
        else char
        for char in text
    )


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(text: str) -> str:
    """``text`` with a leading ``'`` when a spreadsheet would read it as a formula (OWASP's
    advice for CSV injection): ``=HYPERLINK(...)`` is shown, never run."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def shortlist(names: Sequence[str], limit: int) -> str:
    """``a, b, c, …``: the first ``limit`` names, and an ellipsis when there are more."""
    return ", ".join(names[:limit]) + (", …" if len(names) > limit else "")


# Query parameters that carry a secret (case-insensitive): signed URLs of S3 and GCS
# (X-Amz-*, X-Goog-*), CloudFront (Signature, Policy, Key-Pair-Id), Azure SAS (sig), and the
# usual token and key names. Their values are replaced, their names kept.
SECRET_PARAMETERS = frozenset(
    name.lower()
    for name in (
        "X-Amz-Signature",
        "X-Amz-Credential",
        "X-Amz-Security-Token",
        "X-Goog-Signature",
        "X-Goog-Credential",
        "GoogleAccessId",
        "Signature",
        "Policy",
        "Key-Pair-Id",
        "sig",
        "token",
        "access_token",
        "id_token",
        "key",
        "api_key",
        "apikey",
        "password",
        "secret",
    )
)
REDACTED = "REDACTED"
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]]+")


def public_url(url: str) -> str:
    """``url`` without what would let another person read as its owner: the user and password
    go, and the values of :data:`SECRET_PARAMETERS` in its query become ``REDACTED``.

    Example: ``public_url("https://al:pw@h/x?sig=1&n=2") == "https://h/x?sig=REDACTED&n=2"``
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    cut = min((rest.find(c) for c in "/?#" if c in rest), default=len(rest))
    host = rest[:cut].rpartition("@")[2]
    path, question, query = rest[cut:].partition("?")
    if question:
        query, hash_, fragment = query.partition("#")
        query = "&".join(_public_parameter(part) for part in query.split("&")) + hash_ + fragment
    return f"{scheme}://{host}{path}{question}{query}"


def _public_parameter(part: str) -> str:
    name, equals, _ = part.partition("=")
    return f"{name}={REDACTED}" if equals and name.lower() in SECRET_PARAMETERS else part


def public_text(text: str) -> str:
    """``text`` with every URL in it made :func:`public_url`: for errors, notes and stored
    reasons, which may quote a URL (ours, or a library's message)."""
    return _URL.sub(lambda match: public_url(match.group(0)), text) if "://" in text else text
