"""``featx bench``: where does the time go on this machine, with these images and this model?

Four measurements, each of one stage alone, then the whole run:

* decode: files → uint8 crops in this process (one worker's rate; x workers = the ceiling);
* model: the cut model on pre-made uint8 batches (same batch, precision, channels_last);
* end-to-end: a real ``extract()`` into a temporary file, with the writer's busy time;
* peak RSS of the process.

The bottleneck is the slower of the decode ceiling and the model ceiling; when end-to-end falls
well short of both, the pipeline itself (I/O, writer, overlap) is named.
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from featx.config import ExtractConfig
from featx.data.decode import DecodePolicy, load_image
from featx.data.worklist import ImageList, scan_folder
from featx.errors import UsageError
from featx.models import CutModel, load_backbone
from featx.pipeline import extract
from featx.runtime import device as devices


def bench(
    source: str | Path, config: ExtractConfig, limit: int = 256, decode_samples: int = 64
) -> dict[str, Any]:
    """Measure decode, model and end-to-end throughput on ``limit`` images of ``source``.

    Example: ``bench("photos/", ExtractConfig(model="resnet18"))["bottleneck"]``
    """
    if limit < 1:
        raise UsageError("--limit must be at least 1")
    images = scan_folder(source)
    if not len(images):
        raise UsageError(f"source {source}: no image files found")
    images = ImageList(images.root, images.paths[:limit], images.labels[:limit], images.class_names)
    backbone = load_backbone(
        config.model, "none" if config.weights == "DEFAULT" else config.weights, config.image_size
    )
    layers = backbone.check_layers(config.layers)
    device = devices.pick_device(config.device)
    precision = devices.pick_precision(config.precision, device)
    policy = DecodePolicy(
        backbone.transform,
        config.background,
        config.max_image_pixels,
        "cpu" if config.decode == "gpu" else config.decode,
        config.max_file_size,
    )

    sample = images.paths[:decode_samples]
    _decode_quietly(Path(images.root) / sample[0], policy)  # warm-up: imports, codec tables
    started = time.perf_counter()
    for relative in sample:
        _decode_quietly(Path(images.root) / relative, policy)
    decode_per_worker = len(sample) / (time.perf_counter() - started)

    model = CutModel(backbone, layers, config.pool).to(device).eval()
    crop = backbone.transform["crop"]
    batch = torch.randint(0, 255, (config.batch_size, 3, crop, crop), dtype=torch.uint8)
    batch = batch.to(device)
    with torch.inference_mode(), devices.autocast(precision, device):
        model(batch)  # warm-up: allocator, oneDNN/cuDNN algorithm choice
        _sync(device)
        repeats = max(2, min(20, limit // config.batch_size))
        started = time.perf_counter()
        for _ in range(repeats):
            model(batch)
        _sync(device)
    model_rate = repeats * config.batch_size / (time.perf_counter() - started)

    with tempfile.TemporaryDirectory() as folder:
        run = extract(
            images,
            Path(folder) / "bench.h5",
            config.replace(
                weights="none" if config.weights == "DEFAULT" else config.weights,
                overwrite=True,
                progress=False,
                quiet=True,  # the bench reports; the run's own notes would be noise
                max_failures="none",
                shard=None,
            ),
        )
    workers = max(1, config.num_workers)
    decode_ceiling = decode_per_worker * workers
    ceilings = {"decode": decode_ceiling, "model": model_rate}
    bottleneck = min(ceilings, key=lambda stage: ceilings[stage])
    end_to_end = run.total / max(run.loop_s, 1e-9)  # steady state: model loading excluded
    if end_to_end < 0.7 * min(ceilings.values()):
        bottleneck = "pipeline (reading files, writing, or overlap)"
    return {
        "images": run.total,
        "model": config.model,
        "layers": layers,
        "device": str(device),
        "precision": precision,
        "batch_size": config.batch_size,
        "workers": config.num_workers,
        "torch_threads": torch.get_num_threads(),
        "decode_images_per_second_per_worker": round(decode_per_worker, 1),
        "decode_ceiling_images_per_second": round(decode_ceiling, 1),
        "model_images_per_second": round(model_rate, 1),
        "end_to_end_images_per_second": round(end_to_end, 1),
        "end_to_end_vs_ceiling": round(end_to_end / min(ceilings.values()), 3),
        "writer_share_of_wall_time": round(run.writer_s / max(run.elapsed_s, 1e-9), 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "bottleneck": bottleneck,
    }


def _decode_quietly(path: Path, policy: DecodePolicy) -> None:
    try:
        load_image(str(path), policy)
    except Exception:  # a bad file costs its read and counts like a decoded one
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
