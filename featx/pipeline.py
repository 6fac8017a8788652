"""``extract()``: image files → uint8 batches → cut model → pooled vectors → shards → one file.

Read this file top to bottom to know what a run does. Decoding lives in images.py, the loading
stage (DataLoader, decoder crashes, GPU decode) in loader.py, the model in backbone.py, pooling in
pooling.py, shards and the output file in store.py, and the plumbing (device, signals, progress,
writer thread) in runtime.py.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featx import __version__, distributed, runtime, store
from featx.backbone import Backbone, describe_layers, load_backbone
from featx.config import ExtractConfig, too_many_failures
from featx.errors import Interrupted, TooManyFailures, UsageError
from featx.images import (
    IMAGE_SUFFIXES,
    DecodePolicy,
    ImageDataset,
    ImageList,
    printable,
    scan_folder,
)
from featx.loader import decoded_batches, on_device
from featx.pooling import pool, pooled_shape


@dataclass(frozen=True)
class ExtractResult:
    """What a run did; ``featx extract --json`` prints this."""

    output: str
    images: int  # rows written (good images)
    failed: int
    total: int  # files in the work list (for this part)
    shards_done_before: int  # shards found finished from an earlier, interrupted run
    elapsed_s: float
    images_per_second: float  # images computed by this run (not resumed ones) per second
    writer_s: float  # time spent writing shards (overlapped with compute by the writer thread)
    loop_s: float  # the decode → model → write loop alone (no model loading, no assembly)
    complete: bool = True  # False on torchrun ranks other than 0: rank 0 writes the file

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class CutModel(nn.Module):
    """uint8 images on the device → normalised → cut backbone → ``{layer: pooled vectors}``."""

    def __init__(self, backbone: Backbone, layers: list[str], how: str) -> None:
        super().__init__()
        # channels_last weights and inputs: oneDNN / cuDNN's fast convolution layout.
        self.extractor = backbone.cut(layers).to(memory_format=torch.channels_last)
        self.layers = layers
        self.how = how
        self.prefix_tokens = backbone.prefix_tokens
        self.register_buffer("mean", torch.tensor(backbone.transform["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(backbone.transform["std"]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        # Same arithmetic as the weights' transforms(): to float in [0, 1], then normalise.
        x = images.to(torch.float32).div(255).sub(self.mean).div(self.std)
        x = x.contiguous(memory_format=torch.channels_last)
        out = self.extractor(x)
        return {layer: pool(out[layer], self.how, self.prefix_tokens) for layer in self.layers}


def extract(
    source: str | os.PathLike[str] | ImageList,
    out: str | os.PathLike[str],
    config: ExtractConfig = ExtractConfig(),
) -> ExtractResult:
    """Extract features of every image in ``source`` into the HDF5 file ``out``.

    Re-running the same call after a kill resumes from the finished shards.

    Example: ``extract("photos/", "feats.h5", ExtractConfig(model="resnet18", layers=("layer3",)))``
    """
    started = time.perf_counter()
    out = Path(out)
    store.check_writable(out)
    job = distributed.job_for(config.shard)
    target = part_path(out, job.part, job.parts) if job.writes_part else out
    _refuse_existing(target, config)
    images = source if isinstance(source, ImageList) else scan_folder(source)
    if config.labels_csv:
        images = images.relabelled(config.labels_csv)
    if not len(images):
        raise UsageError(
            f"source {images.root}: no image files found "
            f"(looked for {', '.join(s[1:] for s in IMAGE_SUFFIXES)})"
        )

    # Everything that can be wrong with the arguments fails here, before any image is read.
    backbone = load_backbone(config.model, config.weights, config.image_size)
    layers = backbone.check_layers(config.layers)
    shapes = {info.name: info for info in describe_layers(backbone, config.pool, layers)}
    _check_pool(config.pool, layers, shapes)
    device = job.device(runtime.pick_device(config.device))
    precision = runtime.pick_precision(config.precision, device)
    policy = DecodePolicy(
        backbone.transform, config.background, config.max_image_pixels, config.decode
    )
    if config.decode == "gpu" and device.type != "cuda":
        raise UsageError("--decode gpu needs a CUDA device (--device cuda)")
    fingerprint = {
        "model": config.model,
        "weights": backbone.weights,
        "layers": layers,
        "pool": config.pool,
        "transform": backbone.transform,
        "dtype": config.dtype,
        "precision": precision,
        "decode": policy.describe(),
        "files": len(images),
        "files_sha256": store.list_digest(images.paths, images.labels),
        "shapes": {layer: list(pooled_shape(shapes[layer].shape, config.pool)) for layer in layers},
    }

    lock = store.output_lock(target) if job.leader else contextlib.nullcontext()
    with job.session(device), lock:
        if job.leader:
            _refuse_existing(target, config)  # again: another run may have finished meanwhile
        work = job.leader_first(
            lambda overwrite: store.open_work_dir(
                target, fingerprint, config.shard_size, len(images), overwrite
            ),
            config.overwrite,
        )
        mine = store.part_shards(work.shard_count, job.part, job.parts)
        todo = [shard for shard in mine if not work.is_done(shard)]
        model = CutModel(backbone, layers, config.pool).to(device).eval()
        if config.compile:
            model = torch.compile(model, dynamic=False)
        size = sum(len(range(*work.shard_range(s))) for s in mine)
        todo_size = sum(len(range(*work.shard_range(s))) for s in todo)
        loop_started = time.perf_counter()
        writer_s = _run_shards(
            images,
            work,
            todo,
            model,
            config,
            device,
            precision,
            policy,
            initial=size - todo_size,
            total=size,
        )
        loop_s = time.perf_counter() - loop_started
        if not job.leader:  # counted now: rank 0 removes the shard folder once it assembled
            counts = store.count_rows(work, mine)
        job.barrier()  # torchrun: every rank's shards exist before rank 0 assembles

        # The final file covers this part (--shard K/N) or the whole job (one process, torchrun).
        shards = mine if job.writes_part else range(work.shard_count)
        # An empty part (more parts than shards) still sits at its place in the work list.
        start = min(shards.start * work.shard_size, work.total)
        rows = (start, work.shard_range(shards[-1])[1]) if shards else (start, start)
        if job.leader:
            attrs = _file_attributes(images, backbone, config, fingerprint)
            if job.writes_part:
                attrs["part"] = f"{job.part}/{job.parts}"
            try:
                written = store.assemble(
                    work, shards, images.paths, images.labels, attrs, target, rows
                )
            except OSError as error:
                raise store.write_error(error, work) from None
            work.remove()
            counts = (written.rows, written.failed)

    elapsed = time.perf_counter() - started
    total = rows[1] - rows[0] if job.leader else size
    summary = ExtractResult(
        str(target),
        counts[0],
        counts[1],
        total,
        len(mine) - len(todo),
        round(elapsed, 3),
        round(todo_size / elapsed, 2),
        round(writer_s, 3),
        round(loop_s, 3),
        job.leader,
    )
    if job.leader and too_many_failures(config.max_failures, counts[1], total):
        raise TooManyFailures(
            f"{counts[1]} of {total} images failed (more than --max-failures "
            f"{config.max_failures}); the output {target} was written: see its failed/ group",
            result=summary,
        )
    return summary


def _run_shards(
    images: ImageList,
    work: store.WorkDir,
    todo: list[int],
    model: nn.Module,
    config: ExtractConfig,
    device: torch.device,
    precision: str,
    policy: DecodePolicy,
    initial: int,
    total: int,
) -> float:
    """The loop: loader → device → model → writer thread, one finished shard at a time."""
    batches = [
        list(range(start, min(start + config.batch_size, stop)))
        for shard in todo
        for start, stop in [work.shard_range(shard)]
        for start in range(start, stop, config.batch_size)
    ]
    shard_writer = store.ShardSink(work, config.dtype, config.compression)
    writer = runtime.BackgroundWriter(shard_writer.handle, depth=4 if config.write_behind else 0)
    pad_to = config.batch_size if config.compile else None  # one shape: no recompiles
    failed = 0
    progress = runtime.progress_bar(
        total, initial, runtime.show_progress(config.progress), desc=Path(work.out).name
    )
    try:
        with (
            runtime.StopSignals() as signals,
            torch.inference_mode(),
            contextlib.closing(
                decoded_batches(ImageDataset(images, policy), batches, config, device)
            ) as loaded,
        ):
            for batch in loaded:
                features = _compute(batch, model, device, precision, policy, pad_to)
                writer.put((batch, features))
                failed += len(batch["failures"])
                progress.update(len(batch["indices"]) + len(batch["failures"]))
                progress.set_postfix(failed=failed, refresh=False)
                if signals.received is not None:
                    raise Interrupted(
                        f"interrupted by {_signal_name(signals.received)}: finished shards are "
                        f"kept in {work.path}; run the same command again to resume",
                        signals.received,
                    )
            writer.close()
    except BaseException:
        writer_error = _close_quietly(writer)
        shard_writer.discard()
        if writer_error is not None:
            raise writer_error from None
        raise
    finally:
        progress.close()
    return shard_writer.busy_s


def _compute(
    batch: dict[str, Any],
    model: nn.Module,
    device: torch.device,
    precision: str,
    policy: DecodePolicy,
    pad_to: int | None,
) -> dict[str, Any]:
    """One batch through the cut model; rows come back in the batch's index order."""
    images = on_device(batch, policy, device)  # --decode gpu merges nvJPEG output here
    if images is None:
        return {}
    x = images.to(device, non_blocking=True)
    count = len(x)
    if pad_to and count < pad_to:
        x = torch.cat([x, x.new_zeros(pad_to - count, *x.shape[1:])])
    with runtime.autocast(precision, device):
        outputs = model(x)
    return {k: v[:count].float().cpu().numpy() for k, v in outputs.items()}


def _close_quietly(writer: runtime.BackgroundWriter) -> BaseException | None:
    try:
        writer.close()
    except BaseException as error:  # reported instead of the error it caused downstream
        return error
    return None


def _refuse_existing(target: Path, config: ExtractConfig) -> None:
    if target.exists() and not config.overwrite:
        raise UsageError(f"output {target} exists; pass --overwrite to replace it")


def _signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


def _check_pool(how: str, layers: list[str], shapes: dict[str, Any]) -> None:
    for layer in layers:
        if layer not in shapes:
            raise UsageError(f"layer {layer!r} does not output a batched tensor; pick another")
        pooled_shape(shapes[layer].shape, how)


def part_path(out: Path, part: int, parts: int) -> Path:
    """Where ``--shard K/N`` writes its part: ``feats.h5`` → ``feats.part-03-of-16.h5``."""
    width = len(str(parts - 1))
    return out.with_name(f"{out.stem}.part-{part:0{width}d}-of-{parts}{out.suffix}")


def _file_attributes(
    images: ImageList, backbone: Backbone, config: ExtractConfig, fingerprint: dict[str, Any]
) -> dict[str, Any]:
    """The root attributes: the run's fingerprint plus labels, source and versions."""
    import torchvision

    attrs: dict[str, Any] = {
        "featx_schema": store.SCHEMA_VERSION,
        "class_names": images.class_names,
        **fingerprint,
        "compression": config.compression,
        "source": printable(os.path.abspath(images.root)),
        "featx_version": __version__,
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
    }
    if backbone.source == "timm":
        import timm

        attrs["timm_version"] = timm.__version__
    return attrs
