"""featx's data path measured as ratios within one run: decode per core, main-process CPU per tar
sample, and the writer's share of wall time (issue 20's three "Done when" measurements).

    python scripts/bench_datapath.py                          # 256 JPEGs, 2,000 tar samples
    python scripts/bench_datapath.py --images 128 --rounds 3 --json /tmp/datapath.json

Everything is built in a temporary folder: ``--images`` JPEGs of 500x375 (scikit-image's
astronaut, coffee, chelsea and rocket, resized, with a little Gaussian noise so no two are alike,
quality 90) and one WebDataset tar of ``--tar-samples`` samples (``.jpg`` + ``.cls``, the same
JPEGs in turn). Timings on a shared 2-core machine are noisy, so every figure is compared only
with its reference taken in the same round, the rounds alternate their order, and the median of
the per-round ratios is reported; absolute figures are printed for context only.

1. **Decode per core.** The per-core limit: for each file one ``read`` call, then
   ``torchvision.io.decode_jpeg`` + ``transforms.v2.functional.resize`` on uint8 (antialiased,
   ResNet-50's own transform: its resize and interpolation) + ``center_crop``, on one thread.
   featx: what a DataLoader worker runs, ``SampleDataset(policy)[item]`` on every
   ``file_items`` item and ``collate`` per batch of 32, on one thread (the checks, EXIF,
   channels-last stack); and the same through a real DataLoader with one worker
   (``loader.decoded_batches``: collate into shared memory, the batch sent to this process),
   timed from its first batch. Ratio = featx images/s ÷ the limit's. Goal ≥ 0.9.
2. **Main-process CPU per tar sample** (``time.process_time``: this process, all its threads,
   no children). featx: ``archive_feed.archive_batches`` over the local tar behind a
   ``prefetch.Prefetcher``, as ``ArchiveSource.feed`` builds it, no decoding (the main
   process's own job: tar headers, labels, batches of byte ranges); then the same with each
   batch's items pickled as the DataLoader sends them to a worker; then the whole main-process
   side of a real ``decoded_batches`` run with one worker decoding (receiving the batches
   included; the worker's start and stop too). The old path, two ways: ``tarfile`` reading
   every member's bytes and ``pickle.dumps((row, data))`` of each image (a lower bound: no
   grouping, no checks); and featx's own feed at :data:`OLD_COMMIT`, before the rebuild (its
   source taken with ``git archive``, run in a child process: ``archive_batches`` with each
   batch pickled as it was sent to a worker; skipped outside a git checkout). Goal ≤ 60 µs per
   sample for the first featx row. The same images as an img2dataset parquet shard (row groups
   of 100 rows, as img2dataset flushes them): featx's feed, which reads each row group's small
   columns (key, status, label) here and sends the workers cells to read, that send included.
3. **The writer's share of wall time**: ``featx.bench.bench`` on the JPEGs with
   ``resnet18 --weights none --image-size 64 --device cpu`` and the default shard size (the
   writer-heaviest case a CPU has): ``writer_share_of_wall_time`` (the main process's CPU time
   handing rows to the writer process, per loop wall second), ``writer_process_busy_share``
   (the writer process busy, per loop wall second) and ``end_to_end_steady_batches``; then the
   same with ``write_behind=False`` (shards written inline on the main thread), whose busy
   share is the inline writer's share of wall time. Goal ≤ 5%.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import pickle
import platform
import statistics
import sys
import tarfile
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BATCH = 32  # featx's batch size on a CPU
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
SIZE = (500, 375)
GOALS = {"decode_ratio": 0.9, "tar_us_per_sample": 60.0, "writer_share": 0.05}


# --- inputs --------------------------------------------------------------------------------


def make_jpegs(folder: Path, count: int, quality: int = 90) -> list[Path]:
    """``count`` JPEGs of 500x375: the four photos resized, each with its own noise."""
    import numpy as np
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True)
    bases = [
        np.asarray(Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(SIZE))
        for name in PHOTOS
    ]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        noisy = bases[i % len(bases)] + rng.normal(0, 3, bases[0].shape)
        path = folder / f"img{i:05d}.jpg"
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=quality)
        paths.append(path)
    return paths


def write_tar(path: Path, jpegs: list[bytes], samples: int) -> None:
    """A WebDataset tar (USTAR, as tests/archives.py writes them): ``NNNNNNNNN.jpg`` + ``.cls``."""

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key in range(samples):
            add(tar, f"{key:09d}.jpg", jpegs[key % len(jpegs)])
            add(tar, f"{key:09d}.cls", str(key % len(PHOTOS)).encode())


# --- 1. decode per core --------------------------------------------------------------------


def limit_pass(files: list[str], transform: dict[str, Any]) -> int:
    """The per-core limit: one read, decode_jpeg, v2 uint8 antialiased resize, centre crop."""
    import torch
    from torchvision.io import decode_jpeg
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    mode = InterpolationMode(transform["interpolation"])
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            data = bytearray(os.fstat(handle.fileno()).st_size)
            handle.readinto(data)  # one read call
        image = decode_jpeg(torch.frombuffer(data, dtype=torch.uint8))
        image = F.resize(image, [transform["resize"]], interpolation=mode, antialias=True)
        F.center_crop(image, [transform["crop"]])
    return len(files)


def featx_pass(dataset: Any, items: list[Any]) -> int:
    """A worker's whole job on one thread: SampleDataset per item, collate per batch."""
    from featx.data.loader import collate

    done = 0
    for start in range(0, len(items), BATCH):
        batch = collate([dataset[item] for item in items[start : start + BATCH]])
        if batch.failures or batch.images is None:
            raise RuntimeError(f"featx failed images: {batch.failures[:2]}")
        done += batch.files
    return done


def loader_rate(dataset: Any, images: Any, batches: int) -> tuple[float, float, int]:
    """A real DataLoader with one worker (``decoded_batches``): images/s timed from its first
    batch (worker start-up and its first decode not timed) to its last; images per CPU second
    of the worker process, all of its life (start-up, every batch, the send of each batch,
    shutdown); and the batches timed."""
    import resource

    from featx.data.loader import decoded_batches, file_items
    from featx.data.work import ShardPiece, WorkBatch

    rows = [row % len(images) for row in range(batches * BATCH)]
    work = [
        WorkBatch(file_items(images, rows[i : i + BATCH]), ShardPiece(0))
        for i in range(0, len(rows), BATCH)
    ]

    def children_cpu() -> float:  # reaped children only: the worker, once it is shut down
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    cpu_before = children_cpu()
    loaded = decoded_batches(dataset, work, workers=1, pin_memory=False)
    try:
        next(loaded)
        started, done, timed = time.perf_counter(), 0, 0
        for batch in loaded:
            if batch.failures or batch.images is None:
                raise RuntimeError(f"featx failed images: {batch.failures[:2]}")
            done += batch.files
            timed += 1
        wall_rate = done / (time.perf_counter() - started)
    finally:
        loaded.close()  # shuts the worker down: its CPU time is counted from here
    return wall_rate, len(rows) / (children_cpu() - cpu_before), timed


def timed_rate(work: Callable[[], int]) -> float:
    started = time.perf_counter()
    count = work()
    return count / (time.perf_counter() - started)


def cpu_rate(work: Callable[[], int]) -> float:
    """Items per CPU second of this process (one thread busy: torch runs on one)."""
    started = time.process_time()
    count = work()
    return count / (time.process_time() - started)


def decode_per_core(folder: Path, files: list[str], rounds: int) -> dict[str, Any]:
    import torch

    from featx.data.decode import DecodePolicy
    from featx.data.loader import SampleDataset, file_items
    from featx.data.worklist import scan_folder
    from featx.models import load_backbone

    transform = load_backbone("resnet50", "none", None).transform
    dataset = SampleDataset(DecodePolicy(transform))
    images = scan_folder(str(folder))
    items = file_items(images, range(len(images)))
    loader_batches = 1 + max(48, 2 * -(-len(images) // BATCH))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker's setting (worker_init)
    try:
        limit_pass(files[:8], transform)  # warm-up: imports, codec tables
        featx_pass(dataset, items[:8])
        runs: dict[str, Callable[[], tuple[float, ...]]] = {
            "limit": lambda: (
                timed_rate(lambda: limit_pass(files, transform)),
                cpu_rate(lambda: limit_pass(files, transform)),
            ),
            "featx": lambda: (timed_rate(lambda: featx_pass(dataset, items)),),
            "loader": lambda: loader_rate(dataset, images, loader_batches)[:2],
        }
        measured: dict[str, list[tuple[float, ...]]] = {name: [] for name in runs}
        for round_ in range(rounds):
            order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
            for name in order:
                measured[name].append(runs[name]())
        rates = {name: [m[0] for m in values] for name, values in measured.items()}
        rates["limit_cpu"] = [m[1] for m in measured["limit"]]
        rates["loader_worker_cpu"] = [m[1] for m in measured["loader"]]
    finally:
        torch.set_num_threads(threads)
    return {
        "transform": {key: transform[key] for key in ("resize", "crop", "interpolation")},
        "images": len(files),
        "loader_batches_timed": loader_batches - 1,
        "limit_images_per_second": _median(rates["limit"]),
        "featx_images_per_second": _median(rates["featx"]),
        "featx_loader_1_worker_images_per_second": _median(rates["loader"]),
        "featx_vs_limit": _ratio(rates["featx"], rates["limit"]),
        "featx_loader_vs_limit": _ratio(rates["loader"], rates["limit"]),
        "limit_images_per_cpu_second": _median(rates["limit_cpu"]),
        "featx_loader_worker_images_per_cpu_second": _median(rates["loader_worker_cpu"]),
        "featx_loader_worker_cpu_vs_limit": _ratio(rates["loader_worker_cpu"], rates["limit_cpu"]),
        "rates": {name: [round(rate, 1) for rate in values] for name, values in rates.items()},
    }


# --- 2. main-process CPU per tar sample ------------------------------------------------------


def cpu_time(work: Callable[[], int], expected: int) -> float:
    """CPU seconds of this process (every thread, no child process) per sample of ``work()``."""
    started = time.process_time()
    samples = work()
    seconds = time.process_time() - started
    if samples != expected:
        raise RuntimeError(f"{samples} samples, expected {expected}")
    return seconds / samples


def featx_feed(tar: Path, scratch: Path, send: bool) -> int:
    """featx's main-process job on a local tar (``ArchiveSource.feed``'s feed, no decoding);
    with ``send`` each batch's items also pickled as the DataLoader sends them to a worker."""
    from featx.data.archive_feed import archive_batches
    from featx.data.archives import list_archives
    from featx.data.prefetch import Prefetcher
    from featx.data.reading import DEFAULT_MAX_FILE_BYTES

    archives = list_archives(str(tar))
    fetcher = Prefetcher(
        [a.url for a in archives.archives], [a.size for a in archives.archives], scratch
    )
    samples = 0
    try:
        for index, work in enumerate(
            archive_batches(archives, [0], BATCH, fetcher, DEFAULT_MAX_FILE_BYTES)
        ):
            if work.piece.broken or work.piece.failures:
                raise RuntimeError(f"{tar}: {work.piece.broken or work.piece.failures[:2]}")
            if send:
                pickle.dumps((index, work.items), protocol=pickle.HIGHEST_PROTOCOL)
            samples += work.samples
    finally:
        fetcher.close()
    return samples


def featx_loader(tar: Path, scratch: Path, policy: Any) -> int:
    """The whole main-process side of a real run's loading stage over the tar: the feed, the
    DataLoader sending items to one decoding worker and receiving its batches."""
    from featx.data.archive_feed import archive_batches
    from featx.data.archives import list_archives
    from featx.data.loader import SampleDataset, decoded_batches
    from featx.data.prefetch import Prefetcher

    archives = list_archives(str(tar))
    fetcher = Prefetcher(
        [a.url for a in archives.archives], [a.size for a in archives.archives], scratch
    )
    feed = archive_batches(archives, [0], BATCH, fetcher, policy.max_file_bytes)
    loaded = decoded_batches(SampleDataset(policy), feed, workers=1, pin_memory=False)
    samples = 0
    try:
        for batch in loaded:
            if batch.failures or batch.piece.failures or batch.piece.broken:
                raise RuntimeError(f"{tar}: {batch.failures[:2] or batch.piece}")
            samples += batch.samples
    finally:
        loaded.close()
        fetcher.close()
    return samples


def old_path(tar: Path) -> int:
    """What the main process did before: ``tarfile`` reading every member's bytes, and each
    image's bytes pickled to go to a worker (``pickle.dumps((row, data))``)."""
    samples = 0
    with tarfile.open(tar) as archive:
        for member in archive:
            if not member.isfile():
                continue
            handle = archive.extractfile(member)
            assert handle is not None
            data = handle.read()
            if member.name.endswith(".jpg"):
                pickle.dumps((samples, data), protocol=pickle.HIGHEST_PROTOCOL)
                samples += 1
            elif member.name.endswith(".cls"):
                int(data)
    return samples


# The old featx feed (at OLD_COMMIT, before the data path was rebuilt), run from its own source
# tree in a child process: its batches of (row, bytes), each pickled as it was sent to a worker
# (BatchSpec pickled as the list of its items). Prints CPU seconds per sample of one timed pass.
OLD_COMMIT = "d4e79c5"
OLD_FEED = """
import pickle, sys, time
from pathlib import Path
from featx.data.archive_feed import archive_batches
from featx.data.archives import list_archives
from featx.data.remote import Prefetcher
tar, scratch = sys.argv[1], Path(sys.argv[2])
def feed():
    archives = list_archives(tar)
    fetcher = Prefetcher([a.url for a in archives.archives], [a.size for a in archives.archives],
                         scratch)
    samples = 0
    try:
        for index, spec in enumerate(archive_batches(archives, [0], 32, fetcher, 1 << 30)):
            assert not spec.tag.broken and not spec.tag.failures
            pickle.dumps((index, spec), protocol=pickle.HIGHEST_PROTOCOL)
            samples += len(spec)
    finally:
        fetcher.close()
    return samples
feed()
started = time.process_time()
samples = feed()
print((time.process_time() - started) / samples)
"""


def old_featx_tree(root: Path, commit: str) -> Path | None:
    """featx's source at ``commit`` (``git archive``) under ``root``, or None without git."""
    import subprocess

    target = root / f"featx-{commit}"
    target.mkdir()
    try:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", commit, "featx"],
            capture_output=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tree:
        tree.extractall(target, filter="data")
    return target


def old_featx(tree: Path, tar: Path, scratch: Path) -> float:
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, "-W", "ignore", "-c", OLD_FEED, str(tar), str(scratch)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tree)
    if done.returncode:
        raise RuntimeError(f"featx at {OLD_COMMIT} failed: {done.stderr.strip()[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def tar_cpu(
    tar: Path, scratch: Path, samples: int, rounds: int, old_tree: Path | None
) -> dict[str, Any]:
    from featx.data.decode import DecodePolicy
    from featx.models import load_backbone

    policy = DecodePolicy(load_backbone("resnet50", "none", None).transform)
    runs: dict[str, Callable[[], float]] = {
        "featx_feed": lambda: cpu_time(lambda: featx_feed(tar, scratch, send=False), samples),
        "featx_feed_sent": lambda: cpu_time(lambda: featx_feed(tar, scratch, send=True), samples),
        "featx_loader_1_worker": lambda: cpu_time(
            lambda: featx_loader(tar, scratch, policy), samples
        ),
        "old_tarfile_pickle": lambda: cpu_time(lambda: old_path(tar), samples),
    }
    if old_tree is not None:
        runs[f"old_featx_{OLD_COMMIT}"] = lambda: old_featx(old_tree, tar, scratch)
    # warm-up (page cache, imports) and a count check
    for name, count in (
        ("featx_feed", featx_feed(tar, scratch, send=False)),
        ("old_tarfile_pickle", old_path(tar)),
    ):
        if count != samples:
            raise RuntimeError(f"{name}: {count} samples, expected {samples}")
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(rounds):
        order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
        for name in order:
            seconds[name].append(runs[name]())
    us = {name: [value * 1e6 for value in values] for name, values in seconds.items()}
    featx_rows = ("featx_feed", "featx_feed_sent", "featx_loader_1_worker")
    return {
        "samples": samples,
        "tar_mb": round(tar.stat().st_size / 2**20, 1),
        "old_commit": OLD_COMMIT if old_tree is not None else None,
        **{f"{name}_us_per_sample": _median(values, 2) for name, values in us.items()},
        **{f"{name}_vs_old": _ratio(us[name], us["old_tarfile_pickle"]) for name in featx_rows},
        **(
            {
                f"{name}_vs_old_featx": _ratio(us[name], us[f"old_featx_{OLD_COMMIT}"])
                for name in featx_rows
            }
            if old_tree is not None
            else {}
        ),
        "us_per_sample": {name: [round(v, 2) for v in values] for name, values in us.items()},
    }


def write_parquet(path: Path, jpegs: list[bytes], samples: int) -> None:
    """An img2dataset parquet shard of the same samples: ``key``, ``jpg``, ``status``,
    ``error_message``, ``cls``, in row groups of 100 rows (img2dataset's writer buffer)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "key": [f"{key:09d}" for key in range(samples)],
            "jpg": pa.array([jpegs[key % len(jpegs)] for key in range(samples)], pa.binary()),
            "status": ["success"] * samples,
            "error_message": pa.array([None] * samples, pa.string()),
            "cls": [key % len(PHOTOS) for key in range(samples)],
        }
    )
    pq.write_table(table, path, row_group_size=100)


def parquet_cpu(parquet: Path, scratch: Path, samples: int, rounds: int) -> dict[str, Any]:
    """Main-process CPU per sample of featx's feed of a local parquet shard, bytes sent."""
    featx_feed(parquet, scratch, send=True)  # warm-up: page cache, pyarrow's first use
    us = [
        1e6 * cpu_time(lambda: featx_feed(parquet, scratch, send=True), samples)
        for _ in range(rounds)
    ]
    return {
        "samples": samples,
        "parquet_mb": round(parquet.stat().st_size / 2**20, 1),
        "row_group_rows": 100,
        "featx_feed_sent_us_per_sample": _median(us, 2),
        "us_per_sample": [round(v, 2) for v in us],
    }


# --- 3. the writer's share -------------------------------------------------------------------


def writer_share(folder: Path, limit: int) -> dict[str, Any]:
    from featx.bench import bench
    from featx.config import ExtractConfig

    config = ExtractConfig(model="resnet18", weights="none", image_size=64, device="cpu")
    keys = (
        "writer_share_of_wall_time",
        "writer_process_busy_share",
        "end_to_end_steady_batches",
        "end_to_end_images_per_second",
        "batch_size",
        "workers",
        "images",
    )
    behind = bench(folder, config, limit=limit)
    inline = bench(folder, config.replace(write_behind=False), limit=limit)
    return {
        "write_behind": {key: behind[key] for key in keys},
        # Inline, the "writer process" figure is the sink's own busy time on the main thread.
        "inline": {key: inline[key] for key in keys},
    }


# --- the report ----------------------------------------------------------------------------


def _median(values: list[float], digits: int = 1) -> float:
    return round(statistics.median(values), digits)


def _ratio(values: list[float], references: list[float]) -> float:
    """The median of per-round ratios (each against its own round's reference)."""
    return round(statistics.median(v / r for v, r in zip(values, references, strict=True)), 3)


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def table(report: dict[str, Any]) -> str:
    d, t, w = report["decode"], report["tar"], report["writer"]
    behind, inline = w["write_behind"], w["inline"]
    ratio_goal, us_goal, share_goal = (
        GOALS["decode_ratio"],
        GOALS["tar_us_per_sample"],
        GOALS["writer_share"],
    )
    old_us = f"{t['old_tarfile_pickle_us_per_sample']:.1f} µs"
    old_words = "old path: tarfile reads every member + pickle of the bytes"
    if t["old_commit"]:
        old_us += f" / {t[f'old_featx_{OLD_COMMIT}_us_per_sample']:.1f} µs"
        old_words += f" / featx's own feed at {OLD_COMMIT} (tarfile, bytes pickled to workers)"

    def old_ratio(name: str) -> str:
        key = f"{name}_vs_old_featx"
        return f" / {t[key]:.2f}x" if key in t else ""

    rows = [
        (
            "1 decode per core: featx worker job, 1 thread (read, checks, decode, resize, crop, "
            "collate) ÷ limit (read + decode_jpeg + v2 uint8 resize + crop)",
            f"{d['featx_images_per_second']:,.0f} ÷ {d['limit_images_per_second']:,.0f} img/s",
            f"{d['featx_vs_limit']:.2f}x",
            f"≥ {ratio_goal}x {_met(d['featx_vs_limit'] >= ratio_goal)}",
        ),
        (
            "1 the same through a DataLoader, 1 worker (collate into shared memory, sent to "
            f"the main process; {d['loader_batches_timed']} batches after the first) ÷ limit",
            f"{d['featx_loader_1_worker_images_per_second']:,.0f} ÷ "
            f"{d['limit_images_per_second']:,.0f} img/s",
            f"{d['featx_loader_vs_limit']:.2f}x",
            f"≥ {ratio_goal}x {_met(d['featx_loader_vs_limit'] >= ratio_goal)}",
        ),
        (
            "1 per core: images per CPU second of that worker process (its whole life: start, "
            "every batch and its send, shutdown) ÷ the limit's images per CPU second",
            f"{d['featx_loader_worker_images_per_cpu_second']:,.0f} ÷ "
            f"{d['limit_images_per_cpu_second']:,.0f} img/CPU-s",
            f"{d['featx_loader_worker_cpu_vs_limit']:.2f}x",
            f"≥ {ratio_goal}x {_met(d['featx_loader_worker_cpu_vs_limit'] >= ratio_goal)}",
        ),
        (
            "2 main-process CPU per tar sample: featx `archive_batches` (tar headers, labels, "
            f"byte ranges; no decode) vs {old_words}",
            f"{t['featx_feed_us_per_sample']:.1f} vs {old_us}",
            f"{t['featx_feed_vs_old']:.2f}x{old_ratio('featx_feed')}",
            f"≤ {us_goal:g} µs {_met(t['featx_feed_us_per_sample'] <= us_goal)}",
        ),
        (
            "2 featx feed + each batch's items pickled as the DataLoader sends them",
            f"{t['featx_feed_sent_us_per_sample']:.1f} vs {old_us}",
            f"{t['featx_feed_sent_vs_old']:.2f}x{old_ratio('featx_feed_sent')}",
            "(context)",
        ),
        (
            "2 featx main process, whole loading stage (feed, send, receive batches; 1 worker "
            "decoding; worker start and stop included)",
            f"{t['featx_loader_1_worker_us_per_sample']:.1f} vs {old_us}",
            f"{t['featx_loader_1_worker_vs_old']:.2f}x{old_ratio('featx_loader_1_worker')}",
            "(context)",
        ),
        (
            "2 main-process CPU per parquet sample: featx feed of the same samples as an "
            "img2dataset parquet shard (row groups of 100; key, status and label columns read "
            "here, cells sent to the workers to read)",
            f"{report['parquet']['featx_feed_sent_us_per_sample']:.1f} µs",
            "",
            f"≤ {us_goal:g} µs "
            f"{_met(report['parquet']['featx_feed_sent_us_per_sample'] <= us_goal)}",
        ),
        (
            "3 writer share of loop wall time, resnet18 @64 px CPU, default shard size: main "
            "process handing rows to the writer process "
            f"({behind['end_to_end_steady_batches']} steady batches)",
            f"{behind['writer_share_of_wall_time']:.2%}",
            f"writer process busy {behind['writer_process_busy_share']:.2%}",
            f"≤ {share_goal:.0%} {_met(behind['writer_share_of_wall_time'] <= share_goal)}",
        ),
        (
            "3 for comparison: `write_behind=False` (shards written inline on the main thread; "
            f"{inline['end_to_end_steady_batches']} steady batches)",
            f"{inline['writer_process_busy_share']:.2%}",
            f"inline writer CPU {inline['writer_share_of_wall_time']:.2%}",
            f"≤ {share_goal:.0%} {_met(inline['writer_process_busy_share'] <= share_goal)}",
        ),
    ]
    lines = ["| measurement | featx (vs reference) | ratio / share | goal |", "|---|---:|---:|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    m = report["machine"]
    lines += [
        "",
        f"{report['date']}; {m['cores']} cores ({m['cpu']}), load average {m['load_after']} at "
        f"the end; Python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}. "
        f"Ratios: median of {report['rounds']} rounds, each against its own round's reference.",
    ]
    return "\n".join(lines) + "\n"


def machine() -> dict[str, Any]:
    import torch
    import torchvision

    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), cpu)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_before": ", ".join(f"{v:.2f}" for v in os.getloadavg()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256, help="JPEGs to make (default 256)")
    parser.add_argument(
        "--tar-samples", type=int, default=2000, help="samples in the tar (default 2000)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds of 1 and 2 (default 5)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--workdir", type=Path, default=None, help="make the files under here")
    args = parser.parse_args()
    if args.images < 1 or args.tar_samples < 1 or args.rounds < 1:
        parser.error("--images, --tar-samples and --rounds must be at least 1")
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities")
    started = time.perf_counter()
    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "rounds": args.rounds,
        "goals": GOALS,
    }
    with tempfile.TemporaryDirectory(prefix="featx-bench-datapath-", dir=args.workdir) as tmp:
        root = Path(tmp)
        paths = make_jpegs(root / "jpegs", args.images)
        tar = root / "tar" / "00000.tar"
        tar.parent.mkdir()
        write_tar(tar, [path.read_bytes() for path in paths], args.tar_samples)
        scratch = root / "scratch"
        scratch.mkdir()
        files = [str(path) for path in paths]
        report["decode"] = decode_per_core(root / "jpegs", files, args.rounds)
        old_tree = old_featx_tree(root, OLD_COMMIT)
        report["tar"] = tar_cpu(tar, scratch, args.tar_samples, args.rounds, old_tree)
        parquet = root / "parquet" / "00000.parquet"
        parquet.parent.mkdir()
        write_parquet(parquet, [path.read_bytes() for path in paths], args.tar_samples)
        report["parquet"] = parquet_cpu(parquet, scratch, args.tar_samples, args.rounds)
        report["writer"] = writer_share(root / "jpegs", limit=args.images)
    report["machine"]["load_after"] = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    report["seconds"] = round(time.perf_counter() - started, 1)
    text = table(report)
    print(text, end="")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**report, "table": text}, indent=2) + "\n")


if __name__ == "__main__":
    main()
