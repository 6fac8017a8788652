"""``featx bench``: where does the time go on this machine, with these images and this model?

Each stage alone, then the whole run; every figure is taken after a warm-up over at least
``min_seconds`` (1 s) of timed work, with the device synchronised at both ends:

* decode per worker: what one DataLoader worker does (read, check, decode, resize, crop,
  collate) on one thread;
* the decode ceiling: the real DataLoader workers together, timed after their first batch
  over 10 batches per worker (parallel workers share caches, memory bandwidth and the cores
  that the per-worker figure times alone);
* GPU decode (``--decode gpu``): nvJPEG + resize on the device alone, its own stage;
* model: the cut model on pre-made uint8 batches (same batch, precision, channels_last);
* end to end: a real run into a temporary file, timed from its first finished batch (worker
  start-up and ``--compile`` excluded), over enough images for ``min_seconds`` and at least
  10 batches per worker (the images repeated as needed), with the writer's share of its time;
* peak RSS of the process, and peak GPU memory on CUDA.

The bottleneck is the slowest ceiling; when end to end falls well short of it, the pipeline
itself (I/O, writer, overlap) is named.
"""

from __future__ import annotations

import math
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from featx.config import ExtractConfig, available_cores
from featx.data.archives import is_archive_source
from featx.data.batch import Batch
from featx.data.gpu_decode import DecodeStream, on_device
from featx.data.loader import SampleDataset, collate, decoded_batches, file_items
from featx.data.work import ShardPiece, WorkBatch
from featx.data.worklist import ImageList, scan_folder
from featx.errors import UsageError
from featx.models import CutModel, load_backbone
from featx.pipeline import decode_policy, make_plan, run
from featx.runtime import device as devices
from featx.store.workdir import open_work_dir


def bench(
    source: str | Path, config: ExtractConfig, limit: int = 256, min_seconds: float = 1.0
) -> dict[str, Any]:
    """Measure decode, model and end-to-end throughput on up to ``limit`` images of ``source``.

    Example: ``bench("photos/", ExtractConfig(model="resnet18"))["bottleneck"]``
    """
    if limit < 1:
        raise UsageError("--limit must be at least 1")
    if is_archive_source(str(source)):
        raise UsageError(
            f"{source}: featx bench measures an image folder; archives (tars, parquet shards, "
            "files-format folders) are measured by scripts/bench_inputs.py and "
            "scripts/bench_datapath.py"
        )
    images = scan_folder(source)
    if not len(images):
        raise UsageError(f"source {source}: no image files found")
    images = ImageList(images.root, images.paths[:limit], images.labels[:limit], images.class_names)
    config = config.replace(weights="none" if config.weights == "DEFAULT" else config.weights)
    backbone = load_backbone(config.model, config.weights, config.image_size)
    layers = backbone.check_layers(config.layers)
    device = devices.pick_device(config.device)
    policy = decode_policy(backbone, config, device)
    precision = devices.pick_precision(config.precision, device)
    feed = devices.feed(config.batch_size, config.workers, device, available_cores())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    dataset = SampleDataset(policy)
    decode_rate, decoded = _per_worker(dataset, images, feed.batch_size, min_seconds)
    decode_ceiling = _parallel_decode(dataset, images, feed)
    gpu_decode_rate = None
    if config.decode == "gpu":
        stream = DecodeStream(device)
        gpu_decode_rate = _rate(
            lambda: [on_device(b, policy, device, stream=stream) for b in decoded],
            sum(b.files for b in decoded),
            device,
            min_seconds,
        )

    model = CutModel(backbone, layers, config.pool).to(device).eval()
    crop = backbone.transform["crop"]
    batch = torch.randint(0, 255, (feed.batch_size, 3, crop, crop), dtype=torch.uint8).to(device)
    with torch.inference_mode(), devices.autocast(precision, device):
        with devices.exact_fp32(precision, device):
            model_rate = _rate(lambda: model(batch), feed.batch_size, device, min_seconds)

    ceilings = {"decode": decode_ceiling, "model": model_rate}
    if gpu_decode_rate is not None:
        ceilings["gpu decode"] = gpu_decode_rate
    slowest = min(ceilings.values())
    # Enough images for min_seconds at the slowest ceiling and for STEADY_BATCHES per worker,
    # plus the untimed first batch.
    wanted = (
        max(math.ceil(slowest * min_seconds * 1.2), _steady_batches(feed) * feed.batch_size)
        + feed.batch_size
    )
    repeats = max(1, math.ceil(wanted / len(images)))
    work = ImageList(
        images.root, images.paths * repeats, images.labels * repeats, images.class_names
    )
    end_to_end, writer_share, writer_busy, steady_batches = _end_to_end(work, config)
    bottleneck = min(ceilings, key=lambda stage: ceilings[stage])
    if end_to_end < 0.7 * slowest:
        bottleneck = "pipeline (reading files, writing, or overlap)"
    peak_gpu = None
    if device.type == "cuda":
        peak_gpu = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return {
        "images": len(work),
        "model": config.model,
        "layers": layers,
        "device": str(device),
        "precision": precision,
        "decode": config.decode,
        "batch_size": feed.batch_size,
        "workers": feed.workers,
        "torch_threads": torch.get_num_threads(),
        "decode_images_per_second_per_worker": round(decode_rate, 1),
        "decode_ceiling_images_per_second": round(decode_ceiling, 1),
        "gpu_decode_images_per_second": _round(gpu_decode_rate),
        "model_images_per_second": round(model_rate, 1),
        "end_to_end_images_per_second": round(end_to_end, 1),
        "end_to_end_vs_ceiling": round(end_to_end / slowest, 3),
        "end_to_end_steady_batches": steady_batches,
        "writer_share_of_wall_time": round(writer_share, 4),
        "writer_process_busy_share": round(writer_busy, 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_memory_mb": peak_gpu,
        "bottleneck": bottleneck,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _per_worker(
    dataset: SampleDataset, images: ImageList, batch_size: int, min_seconds: float
) -> tuple[float, list[Batch]]:
    """Images/s of one worker's whole job (read, decode, resize, crop, collate) on one thread,
    as a DataLoader worker runs it; also one pass of decoded batches for the GPU decode stage."""
    items = file_items(images, range(len(images)))
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]

    def one_pass() -> list[Batch]:
        return [collate([dataset[item] for item in chunk]) for chunk in chunks]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # worker_init does the same in every worker
    try:
        rate = _rate(one_pass, len(items), torch.device("cpu"), min_seconds)
    finally:
        torch.set_num_threads(threads)
    return rate, one_pass()


STEADY_BATCHES = 10  # batches per worker timed after the first, for a steady figure


def _steady_batches(feed: devices.Feed) -> int:
    return STEADY_BATCHES * max(1, feed.workers)


def _parallel_decode(dataset: SampleDataset, images: ImageList, feed: devices.Feed) -> float:
    """The decode ceiling: images/s of the real DataLoader workers together (the images
    repeated as needed), timed from the first batch over :data:`STEADY_BATCHES` per worker."""
    count = (_steady_batches(feed) + 1) * feed.batch_size
    rows = [row % len(images) for row in range(count)]
    batches = [
        WorkBatch(file_items(images, rows[i : i + feed.batch_size]), ShardPiece(0))
        for i in range(0, count, feed.batch_size)
    ]
    loaded = decoded_batches(dataset, batches, feed.workers, False, feed.prefetch)
    next(loaded)  # worker start-up and the first decode: not timed
    started, done = time.perf_counter(), 0
    for batch in loaded:
        done += batch.files
    return done / max(time.perf_counter() - started, 1e-9)


def _rate(work: Callable[[], Any], items: int, device: torch.device, min_seconds: float) -> float:
    """``items`` per second of ``work()``: one warm-up call (allocator, cuDNN's choice, codec
    tables), then repeated calls until ``min_seconds`` of timed work, synchronised."""
    work()
    _sync(device)
    calls, started = 0, time.perf_counter()
    while True:
        work()
        calls += 1
        _sync(device)
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return calls * items / elapsed


def _end_to_end(images: ImageList, config: ExtractConfig) -> tuple[float, float, float, int]:
    """Steady images/s of a real run (from its first finished batch), the writer's share of
    the loop's wall time (the CPU time it costs this process: handing rows over), the share of
    it the writer process was busy writing, and the batches timed."""
    with tempfile.TemporaryDirectory() as folder:
        plan = make_plan(
            images,
            Path(folder) / "bench.h5",
            config.replace(
                overwrite=True, progress=False, quiet=True, max_failures="none", shard=None
            ),
        )
        with plan.job.session(plan.device):
            work = open_work_dir(
                plan.target, plan.fingerprint, plan.shard_size, len(images), overwrite=True
            )
            ran = run(plan, work)
    timings = ran.timings
    steady_batches = math.ceil(
        (timings.computed - timings.first_batch_files) / plan.feed.batch_size
    )
    wall = max(timings.loop_s, 1e-9)
    return timings.steady_rate(), ran.writer_main_s / wall, ran.writer_s / wall, steady_batches


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
