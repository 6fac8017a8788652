"""Where input bytes come from: local paths, or URLs through fsspec (s3://, gs://, https://).

The URL grammar, the filesystem behind a URL, one bounded read, and a store's errors as one
line. Remote archives are fetched by :mod:`featx.data.prefetch`; brace lists are expanded by
:mod:`featx.data.braces`. Credentials are fsspec's usual ones (``AWS_*`` variables and
``~/.aws``, ``GOOGLE_*``), never options of featx.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

# Re-exported: callers name them remote.expand_braces / remote.MAX_EXPANDED.
from featx.data.braces import MAX_EXPANDED as MAX_EXPANDED
from featx.data.braces import expand_braces as expand_braces
from featx.errors import FeatxError, UsageError
from featx.safe_text import public_text, public_url

# Which package serves a URL scheme, for the one-line hint when it is missing.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http"}
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def is_url(source: str) -> bool:
    """``s3://…``, ``https://…``: read through fsspec (``file://`` is a local path)."""
    match = _SCHEME.match(source)
    return match is not None and match.group(1).lower() != "file"


def local_path(source: str) -> str:
    return source[len("file://") :] if source.lower().startswith("file://") else source


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path in it) for a URL; a missing implementation is one line."""
    import fsspec

    scheme = url.split("://", 1)[0].lower()
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as error:
        extra = EXTRAS.get(scheme)
        hint = f": pip install 'featx[{extra}]'" if extra else ""
        raise UsageError(
            f"{public_url(url)}: cannot read {scheme}:// URLs ({public_text(str(error))}){hint}"
        ) from None
    return fs, path


def join(root: str, relative: str) -> str:
    """``root`` + ``relative``, with ``/`` for URLs and the OS separator for paths."""
    if is_url(root):
        return root.rstrip("/") + "/" + relative.replace(os.sep, "/")
    return os.path.join(root, relative)


def common_root(names: list[str]) -> str:
    """The folder (or URL prefix up to a ``/``) that holds every name."""
    prefix = os.path.commonprefix(names)
    cut = prefix.rfind("/")
    return prefix[: cut + 1] if cut >= 0 else ""


def one_line(error: BaseException) -> str:
    """An exception as one short line with its type: ``OSError: disk full``."""
    text = " ".join(public_text(str(error)).split()) or type(error).__name__
    return f"{type(error).__name__}: {text[:300]}"


def read_remote(url: str, max_bytes: int) -> bytes:
    """A remote file's bytes, refused above ``max_bytes`` before more is read.

    HTTP: one streamed GET, read up to the limit (a size hint keeps fsspec from sending a HEAD
    first). Object stores: one GET of at most the limit plus one byte.
    """
    fs, path = filesystem(url)
    if is_http(fs):
        with fs.open(path, "rb", block_size=0, size=max_bytes + 1) as handle:
            data: bytes = handle.read(max_bytes + 1)
    else:  # object stores answer range requests: one bounded GET
        data = fs.cat_file(path, start=0, end=max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"file of more than {max_bytes} bytes (--max-file-bytes)")
    return data


def is_http(fs: Any) -> bool:
    """Whether an fsspec filesystem speaks HTTP (no reliable range requests)."""
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "http" in protocol or "https" in protocol


def fetch_error(url: str, error: BaseException) -> FeatxError:
    return FeatxError(f"{public_url(url)}: {one_line(error)}")


@contextlib.contextmanager
def asking(url: str, missing: str) -> Iterator[None]:
    """A listing or stat of ``url`` with its errors in one line: ``missing`` (a usage error)
    when it is not there, the store's own error otherwise."""
    try:
        yield
    except FeatxError:
        raise
    except FileNotFoundError:
        raise UsageError(f"{public_url(url)}: {missing}") from None
    except Exception as error:  # network, credentials, the server's answer
        raise fetch_error(url, error) from None


MAX_LISTING_BYTES = 64 << 20  # an HTML index page, as sent (decompressed)
MAX_LISTING_ENTRIES = 1_000_000  # names in one listing, or in a whole folder walk
MAX_LISTING_DEPTH = 32  # folder levels under a remote image folder


def http_listing(fs: Any, url: str) -> list[tuple[str, bool]]:
    """(URL, is a folder) of each link on an HTTP index page, as fsspec's ``ls`` finds them,
    but from one streamed GET read to at most ``MAX_LISTING_BYTES`` and at most
    ``MAX_LISTING_ENTRIES`` names: an endless or huge page is refused in one line."""
    from fsspec.implementations.http import ex, ex2

    links = set()
    text = _page(fs, url)
    for match in (*ex2.finditer(text), *ex.finditer(text)):
        link = _absolute(url, match.group("url"))
        if link is not None:
            links.add(link)
            if len(links) > MAX_LISTING_ENTRIES:
                raise FeatxError(f"{public_url(url)}: {too_many_entries()}")
    if not links and url.endswith("/"):
        return http_listing(fs, url.rstrip("/"))
    return [(link, link.endswith("/")) for link in sorted(links)]


def too_many_entries() -> str:
    return f"the listing names more than {MAX_LISTING_ENTRIES:,} entries (featx's bound)"


def _page(fs: Any, url: str) -> str:
    with fs.open(url, "rb", block_size=0, size=MAX_LISTING_BYTES + 1) as handle:
        kind = handle.r.headers.get("Content-Type", "").partition(";")[0].strip()
        if kind not in ("text/html", ""):
            return ""  # a file, not an index page (as fsspec's ls)
        chunks, got = [], 0
        while chunk := handle.read(1 << 20):
            got += len(chunk)
            if got > MAX_LISTING_BYTES:
                raise FeatxError(
                    f"{public_url(url)}: the listing is larger than "
                    f"{MAX_LISTING_BYTES >> 20} MiB (featx's bound)"
                )
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "ignore")


def _absolute(url: str, link: str) -> str | None:
    """A link of the page at ``url`` as a URL under it (fsspec's rules), or None."""
    parts = urlsplit(url)
    if link.startswith("/") and len(link) > 1:
        link = f"{parts.scheme}://{parts.netloc}{link}"
    if link.startswith("http"):
        under = url.replace("https", "http").rstrip("/") + "/"
        return link if link.replace("https", "http").startswith(under) else None
    if link in ("..", "../"):
        return None
    return "/".join([url.rstrip("/"), link.lstrip("/")])
