"""Building WebDataset tars, img2dataset parquet shards and servers for them, inside the tests.

Tars are USTAR with a fixed mtime and owner, so the same members give the same bytes.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg(array: np.ndarray, quality: int = 85) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def member(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE):
    info = tarfile.TarInfo(name)
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    info.type = kind
    if kind == tarfile.SYMTYPE:
        info.linkname = "elsewhere.jpg"
        tar.addfile(info)
        return
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            member(tar, name, data)
    return path


def crops(photo_arrays: dict[str, np.ndarray], count: int) -> list[np.ndarray]:
    """``count`` different small crops of the sample photos."""
    arrays = [photo_arrays[name] for name in ("chelsea", "coffee", "rocket", "astronaut")]
    out = []
    for i in range(count):
        top, left = (i * 7) % 60, (i * 13) % 80
        out.append(np.ascontiguousarray(arrays[i % 4][top : top + 120, left : left + 150]))
    return out


def webdataset(
    folder: Path, images: list[bytes], per_tar: int, labels: list[str] | None = None
) -> list[str]:
    """img2dataset's layout: ``00000.tar …`` with ``NNNNNNNNN.jpg``, ``.cls`` (the class
    number) and ``.json`` (``{"label": name}``); returns the row names, in order."""
    names = []
    for start in range(0, len(images), per_tar):
        tar_name = f"{start // per_tar:05d}.tar"
        members = []
        for key in range(start, min(start + per_tar, len(images))):
            label = labels[key] if labels else str(key % 2)
            members += [
                (f"{key:09d}.jpg", images[key]),
                (f"{key:09d}.cls", str(key % 2).encode()),
                (f"{key:09d}.json", json.dumps({"key": f"{key:09d}", "label": label}).encode()),
            ]
            names.append(f"{tar_name}/{key:09d}.jpg")
        write_tar(folder / tar_name, members)
    return names


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[tuple[str, str, str | None]]  # (method, path, Range header)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def send_head(self):  # type: ignore[no-untyped-def]
        self.requests.append((self.command, self.path, self.headers.get("Range")))
        return super().send_head()


@contextlib.contextmanager
def http_server(folder: Path) -> Iterator[tuple[str, list[tuple[str, str, str | None]]]]:
    """``python -m http.server``'s handler serving ``folder`` on 127.0.0.1 (no range requests,
    as it has none); yields the base URL and the list of requests it received."""
    requests: list[tuple[str, str, str | None]] = []
    handler = type("Handler", (_QuietHandler,), {"requests": requests})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(folder))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()


def files_format(folder: Path, images: list[bytes], per_shard: int, labels: list[str]) -> list[str]:
    """img2dataset's ``--output_format files``: ``00000/`` folders of ``NNNNNNNNN.jpg``,
    ``.json`` (``{"label": name}``) and ``.txt``, beside a metadata-only ``00000.parquet`` and
    ``00000_stats.json``; returns the row names, in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = []
    for start in range(0, len(images), per_shard):
        shard = f"{start // per_shard:05d}"
        (folder / shard).mkdir(parents=True)
        keys = [f"{key:09d}" for key in range(start, min(start + per_shard, len(images)))]
        for key in keys:
            (folder / shard / f"{key}.jpg").write_bytes(images[int(key)])
            (folder / shard / f"{key}.json").write_text(
                json.dumps({"key": key, "label": labels[int(key)]})
            )
            (folder / shard / f"{key}.txt").write_text(f"a caption of {key}")
            names.append(f"{shard}/{key}.jpg")
        metadata = {"key": keys, "status": ["success"] * len(keys), "caption": keys}
        pq.write_table(pa.table(metadata), folder / f"{shard}.parquet")
        stats = {"count": len(keys), "successes": len(keys)}
        (folder / f"{shard}_stats.json").write_text(json.dumps(stats))
    return names
