"""Input sources compared: the same JPEGs as loose files, local tars, tars over HTTP and over S3.

    python scripts/bench_inputs.py                          # 2000 JPEGs of 500x375, 500 per tar
    python scripts/bench_inputs.py --repeat 1 --out /tmp/bench_inputs.md

Builds, in a temporary folder, ``--images`` JPEGs (quality 85, ``--size`` pixels, cut and resized
from scikit-image's photos, so real photo content) as loose files and the same bytes as WebDataset
tars in img2dataset's layout (``00000.tar`` with ``.jpg``, ``.cls``, ``.json`` members and an
``00000_stats.json`` beside each). A child process serves that folder on 127.0.0.1 only: Python's
``http.server`` (HTTP/1.1 keep-alive, no range requests) and moto's S3 server (the tars uploaded
to ``s3://featx-bench/tars/``). Nothing leaves the machine.

Every figure is images/s in this one process, one thread (``torch.set_num_threads(1)``), through
featx's own code paths, so the decoded columns are per core (a DataLoader worker's share); each
figure is the best of ``--repeat`` runs (default 3), as the machine may be busy with other work:

* read-only, loose files: ``featx.data.decode.read_file`` on each file;
* read-only, tars: ``list_archives`` + ``prefetch.Prefetcher`` (remote archives fetched whole, one
  ahead, into a fresh scratch folder) + ``archive_feed.archive_batches`` (``tar_samples``, batches
  of 32 as on a CPU), every image's bytes taken (``reading.read_payload``: a local tar's images
  and a fetched copy's are byte ranges that a worker reads);
* decoded: the same, plus decode + resize + 224 crop of each image (``load_image`` for files,
  ``loader.SampleDataset`` for archive items) with ResNet-50's transform;
* loose files over HTTP, one request per image: fsspec ``cat_file`` on each image URL (one GET),
  and featx's ``read_file`` on each URL (featx's path for a remote image folder, with whatever
  requests it makes per image), to compare per-image requests with streaming tars.

Every timed run covers at least :data:`MIN_BATCHES` batches of 32 (2,000 images: 64 batches
over 4 tars of 500); fewer ``--images`` are refused.

Cold: before the run every input file is written back and evicted from the page cache
(``os.fsync`` + ``os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)``): the loose files and tars
on disk, which the HTTP server also reads, and moto's spooled object files (opened through
``/proc/<server>/fd``); fsspec's cached filesystems (connections, listings) are dropped and featx's
scratch folder is new. Warm: the same run again at once. On a virtual machine the host may still
cache the disk, so cold here is a best case for a real cold disk; and the servers share this
machine's cores with the reader.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import http.server
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BUCKET = "featx-bench"
BATCH = 32  # featx's batch size on a CPU
MIN_BATCHES = 60  # batches each timed run covers at least
MAX_BYTES = 1 << 30  # featx's default --max-file-bytes
PHOTOS = ("chelsea", "coffee", "rocket", "astronaut")


# --- the images ------------------------------------------------------------------------------


def make_jpegs(count: int, size: tuple[int, int], quality: int) -> list[bytes]:
    """``count`` different JPEGs of ``size``: 4:3 crops of varying scale and place of the sample
    photos, mirrored every other round, resized with Lanczos."""
    import numpy as np
    import skimage.data
    from PIL import Image

    photos = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]
    rng = np.random.default_rng(0)
    aspect = size[0] / size[1]
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        width, height = photo.size
        scale = rng.uniform(0.55, 1.0)
        crop_w = min(width, height * aspect) * scale
        crop_h = crop_w / aspect
        left = rng.uniform(0, width - crop_w)
        top = rng.uniform(0, height - crop_h)
        image = photo.resize(size, Image.LANCZOS, box=(left, top, left + crop_w, top + crop_h))
        if (i // len(photos)) % 2:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


def write_inputs(root: Path, images: list[bytes], per_tar: int) -> tuple[Path, Path]:
    """``root/loose/img000000.jpg …`` and ``root/tars/00000.tar …`` (img2dataset's layout)."""
    loose, tars = root / "loose", root / "tars"
    loose.mkdir(parents=True)
    tars.mkdir(parents=True)
    for key, data in enumerate(images):
        (loose / f"img{key:06d}.jpg").write_bytes(data)
    for start in range(0, len(images), per_tar):
        stem = f"{start // per_tar:05d}"
        keys = range(start, min(start + per_tar, len(images)))
        with tarfile.open(tars / f"{stem}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for key in keys:
                caption = {"key": f"{key:09d}", "label": PHOTOS[key % len(PHOTOS)]}
                _member(tar, f"{key:09d}.jpg", images[key])
                _member(tar, f"{key:09d}.cls", str(key % len(PHOTOS)).encode())
                _member(tar, f"{key:09d}.json", json.dumps(caption).encode())
        stats = {"count": len(keys), "successes": len(keys), "failed_to_download": 0}
        (tars / f"{stem}_stats.json").write_text(json.dumps(stats))
    return loose, tars


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


# --- the servers (a child process) ---------------------------------------------------------


class _Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as any real server
    disable_nagle_algorithm = True  # TCP_NODELAY, as any real server: no 40 ms delayed-ACK stalls

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def serve(root: Path) -> None:
    """The child process: HTTP and S3 on 127.0.0.1; prints their addresses as one JSON line,
    then serves until its stdin closes (the parent ended)."""
    os.environ["MOTO_S3_DEFAULT_KEY_BUFFER_SIZE"] = "1"  # every object in a file: evictable
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    web = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Handler, directory=str(root))
    )
    threading.Thread(target=web.serve_forever, daemon=True).start()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    s3.start()
    host, port = s3.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    for path in sorted((root / "tars").iterdir()):
        client.put_object(Bucket=BUCKET, Key=f"tars/{path.name}", Body=path.read_bytes())
    address = {"http": f"http://127.0.0.1:{web.server_address[1]}", "s3": endpoint}
    print(json.dumps(address), flush=True)
    sys.stdin.read()
    s3.stop()
    web.shutdown()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def servers(root: Path) -> Iterator[tuple[dict[str, str], int]]:
    """(addresses, pid) of the serving child process; S3 credentials set for fsspec."""
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    env = {**os.environ, "TMPDIR": str(root / "server-tmp")}
    (root / "server-tmp").mkdir()
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        if not line:
            raise RuntimeError("the server process ended before serving")
        address = json.loads(line)
        os.environ["AWS_ENDPOINT_URL"] = address["s3"]
        yield address, child.pid
    finally:
        if child.stdin is not None:
            child.stdin.close()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


# --- cold caches ---------------------------------------------------------------------------


def evict(paths: list[str]) -> None:
    """Write back and drop each file's pages from the page cache."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            if os.path.isfile(f"/proc/self/fd/{fd}"):
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def server_files(pid: int, folder: Path) -> list[str]:
    """The files under ``folder`` that the server process holds open (moto's spooled objects,
    deleted temporary files: reached through ``/proc/<pid>/fd``)."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            path = f"/proc/{pid}/fd/{fd}"
            with contextlib.suppress(OSError):
                if os.readlink(path).startswith(f"{folder}/") and os.path.isfile(path):
                    found.append(path)
    return found


def forget_filesystems() -> None:
    """Drop fsspec's cached filesystem objects: their sessions, connections and listings."""
    import fsspec

    for cls in fsspec.registry.values():  # the implementations imported so far
        cls.clear_instance_cache()


# --- the runs ------------------------------------------------------------------------------


Decode = Callable[[int, Any], None]  # (row, payload: a tar's FileRange or bytes)


def archive_run(source: str, scratch_root: Path, decode: Decode | None) -> tuple[int, int]:
    """(images, bytes) of every archive of ``source`` through featx's archive path."""
    from featx.data.archive_feed import archive_batches
    from featx.data.archives import list_archives
    from featx.data.prefetch import Prefetcher
    from featx.data.reading import read_payload

    archives = list_archives(source)
    shards = list(range(len(archives)))
    images = total = 0
    with tempfile.TemporaryDirectory(dir=scratch_root) as scratch:
        urls = [a.url for a in archives.archives]
        fetcher = Prefetcher(urls, [a.size for a in archives.archives], Path(scratch))
        try:
            for batch in archive_batches(archives, shards, BATCH, fetcher, MAX_BYTES):
                if batch.piece.broken or batch.piece.failures:
                    raise RuntimeError(f"{source}: {batch.piece.broken or batch.piece.failures}")
                for row, payload in batch.items:
                    if decode is not None:
                        decode(row, payload)  # reads the payload, as a worker does
                        total += payload.length if isinstance(payload, tuple) else len(payload)
                    else:
                        total += len(read_payload(payload, MAX_BYTES))
                    images += 1
        finally:
            fetcher.close()
    return images, total


def file_run(paths: list[str], read: Callable[[str], bytes]) -> tuple[int, int]:
    total = 0
    for path in paths:
        total += len(read(path))
    return len(paths), total


def measure(
    run: Callable[[], tuple[int, int]], expected: int, cold: Callable[[], None], repeat: int
) -> tuple[float, float]:
    """(cold, warm) images/s of ``run``: the best of ``repeat`` cold runs, each followed at
    once by a warm one."""
    rates: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(repeat):
        for is_cold in (True, False):
            if is_cold:
                cold()
            started = time.perf_counter()
            images, _ = run()
            elapsed = time.perf_counter() - started
            if images != expected:
                raise RuntimeError(f"read {images} images, expected {expected}")
            rates[is_cold].append(images / elapsed)
    return max(rates[True]), max(rates[False])


def decoder(policy: object) -> tuple[Decode, Callable[[str], bytes]]:
    """(archive item → checked read + decode, path → checked decode) under ``policy``."""
    from featx.data.decode import load_image
    from featx.data.loader import SampleDataset
    from featx.data.work import WorkItem

    dataset = SampleDataset(policy)  # type: ignore[arg-type]

    def from_bytes(row: int, payload: Any) -> None:
        _, image, error = dataset[WorkItem(row, payload)]
        if image is None or tuple(image.shape[1:]) != (224, 224):
            raise RuntimeError(f"row {row}: {error or 'wrong shape'}")

    def from_path(path: str) -> bytes:
        image = load_image(path, policy)  # type: ignore[arg-type]
        if tuple(image.shape[1:]) != (224, 224):
            raise RuntimeError(f"{path}: wrong shape")
        return b""

    return from_bytes, from_path


def bench(args: argparse.Namespace, root: Path) -> tuple[list[tuple[str, list[float]]], dict]:
    import fsspec
    import torch

    from featx.data.decode import DecodePolicy
    from featx.data.reading import read_file
    from featx.models import load_backbone

    torch.set_num_threads(1)
    size = tuple(int(side) for side in args.size.lower().split("x"))
    started = time.perf_counter()
    images = make_jpegs(args.images, (size[0], size[1]), args.quality)
    loose, tars = write_inputs(root, images, args.per_tar)
    print(f"made {len(images)} JPEGs in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    policy = DecodePolicy(load_backbone("resnet50", "none", None).transform)
    from_bytes, from_path = decoder(policy)
    for row, data in enumerate(images[:16]):  # warm-up: imports, codec tables
        from_bytes(row, data)
    count = len(images)
    files = sorted(str(path) for path in loose.iterdir())
    tar_files = sorted(str(path) for path in tars.iterdir())
    scratch = root / "scratch"
    scratch.mkdir()
    rows: list[tuple[str, list[float]]] = []
    with servers(root) as (address, pid):

        def cold_local() -> None:
            evict(files + tar_files + server_files(pid, root / "server-tmp"))
            forget_filesystems()

        def row(name: str, read_only: Callable, decoded: Callable | None) -> None:
            rates = [*measure(read_only, count, cold_local, args.repeat)]
            if decoded is not None:
                rates += measure(decoded, count, cold_local, args.repeat)
            print(f"{name}: {', '.join(f'{rate:,.0f}' for rate in rates)}", file=sys.stderr)
            rows.append((name, rates))

        row(
            "loose files, local disk",
            lambda: file_run(files, read_file),
            lambda: file_run(files, from_path),
        )
        for name, source in (
            ("WebDataset tars, local disk", f"{tars}/"),
            ("tars over HTTP (127.0.0.1)", f"{address['http']}/tars/"),
            ("tars over S3 (moto, 127.0.0.1)", f"s3://{BUCKET}/tars/"),
        ):
            row(
                name,
                functools.partial(archive_run, source, scratch, None),
                functools.partial(archive_run, source, scratch, from_bytes),
            )
        urls = [f"{address['http']}/loose/{Path(path).name}" for path in files]

        def cat_file(url: str) -> bytes:
            fs = fsspec.filesystem("http")
            return bytes(fs.cat_file(url))

        row(
            "loose files over HTTP, one GET each (fsspec cat_file)",
            lambda: file_run(urls, cat_file),
            None,
        )
        row(
            "loose files over HTTP, featx read_file per URL",
            lambda: file_run(urls, read_file),
            lambda: file_run(urls, from_path),
        )
    mean_kb = sum(len(data) for data in images) / len(images) / 1024
    tar_mb = sum(os.path.getsize(p) for p in tar_files if p.endswith(".tar")) / 2**20
    facts = {"size": size, "mean_kb": mean_kb, "tar_mb": tar_mb, "tars": -(-count // args.per_tar)}
    return rows, facts


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def table(rows: list[tuple[str, list[float]]], facts: dict, args: argparse.Namespace) -> str:
    import torch

    lines = [
        "| source | read-only cold | read-only warm | decoded cold | decoded warm |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, rates in rows:
        cells = [f"{rate:,.0f}" for rate in rates] + ["—"] * (4 - len(rates))
        lines.append(f"| {name} | {' | '.join(cells)} |")
    width, height = facts["size"]
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    lines += [
        "",
        f"Images/s, one process, one thread, best of {args.repeat} runs. "
        f"{args.images} JPEGs of {width}x{height} "
        f"(quality {args.quality}, {facts['mean_kb']:.0f} KiB on average), {facts['tars']} tars "
        f"of {args.per_tar} ({facts['tar_mb']:.0f} MiB in all); decoded: resize 232 + crop 224. "
        "Servers in one child process: Python's http.server (keep-alive, TCP_NODELAY) and "
        "moto's S3. "
        f"{os.cpu_count()} cores, {cpu_model()}; Python {platform.python_version()}, "
        f"torch {torch.__version__}; load average {load} at the end; "
        f"{datetime.date.today().isoformat()}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="JPEGs to make (default 2000)")
    parser.add_argument("--per-tar", type=int, default=500, help="images per tar (default 500)")
    parser.add_argument("--size", default="500x375", help="WIDTHxHEIGHT of each JPEG")
    parser.add_argument("--quality", type=int, default=85, help="JPEG quality (default 85)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each; the best is kept (default 3)"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--workdir", type=Path, default=None, help="make the files under here")
    parser.add_argument("--serve", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve)
        return
    # batches never mix two tars: each full tar's, then the last one's
    full_tars, rest = divmod(args.images, args.per_tar)
    batches = full_tars * -(-args.per_tar // BATCH) + -(-rest // BATCH)
    if batches < MIN_BATCHES:
        parser.error(
            f"--images {args.images} with --per-tar {args.per_tar} makes {batches} batches of "
            f"{BATCH}; each timed run must cover at least {MIN_BATCHES}"
        )
    with tempfile.TemporaryDirectory(prefix="featx-bench-inputs-", dir=args.workdir) as tmp:
        rows, facts = bench(args, Path(tmp))
    text = table(rows, facts, args)
    print(text, end="")
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
