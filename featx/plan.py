"""A run, decided and checked before any image is read: ``make_plan`` loads the model, cuts it,
picks the device and fixes the fingerprint that a resume must match; ``file_attributes`` is what
the output file records of it."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from featx import __version__, defaults
from featx.config import ExtractConfig, available_cores, parse_bytes
from featx.data.archives import ArchiveList
from featx.data.decode import DecodePolicy
from featx.data.views import ViewPolicy
from featx.data.worklist import ImageList, printable
from featx.errors import UsageError
from featx.models import Backbone, describe_layers, load_backbone
from featx.models.pooling import pooled_shape
from featx.preflight import preflight
from featx.runtime import device as devices
from featx.runtime.distributed import Job, job_for
from featx.runtime.progress import note
from featx.safe_text import public_url
from featx.sources import WorkSource, source_of
from featx.store import schema
from featx.store.durable import refuse_existing


@dataclass(frozen=True)
class Plan:
    """A run, decided and checked before any image is read."""

    config: ExtractConfig
    source: WorkSource  # files (shards of --shard-size) or archives (one shard each)
    target: Path  # the output, or this part's file with --shard K/N
    job: Job
    backbone: Backbone
    layers: list[str]
    device: torch.device
    precision: str
    policy: DecodePolicy
    fingerprint: dict[str, Any]
    feed: devices.Feed  # batch size, workers, prefetch (not fingerprinted: free between runs)
    shard_size: int  # files per shard (--shard-size, or the device's rule); archives: 1
    label: str = ""  # the progress bar's label


def make_plan(
    source: str | os.PathLike[str] | ImageList | ArchiveList,
    out: Path,
    config: ExtractConfig,
    label: str | None = None,
) -> Plan:
    """Everything that can be wrong with the arguments fails here, before any image is read."""
    images = preflight(source, out, config)
    job = job_for(config.shard)
    target = schema.part_path(out, job.part, job.parts) if job.writes_part else out
    refuse_existing(target, config.overwrite)  # torchrun ranks: known only now
    if job.leader:
        note(images.layout_warning(), config.quiet, "warning: ")
        note(images.describe(), config.quiet)
    backbone = load_backbone(config.model, config.weights, config.image_size)
    layers = backbone.check_layers(config.layers)
    shapes = {info.name: info.shape for info in describe_layers(backbone, config.pool, layers)}
    for layer in layers:
        if layer not in shapes:
            raise UsageError(f"layer {layer!r} does not output a batched tensor; pick another")
    device = job.device(devices.pick_device(config.device))
    policy = decode_policy(backbone, config, device)
    precision = devices.pick_precision(config.precision, device)
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
        "files_sha256": images.digest(),
        "shapes": {layer: list(pooled_shape(shapes[layer], config.pool)) for layer in layers},
    }
    if policy.views is not None:  # only then: files without views stay as they were
        fingerprint["augment"] = policy.views.describe()
    feed = devices.feed(
        config.batch_size, config.workers, device, available_cores(), job.ranks_per_node
    )
    if policy.views is not None:  # the batch size counts crops: each image brings 1 + K
        feed = replace(feed, batch_size=max(1, feed.batch_size // (1 + policy.views.views)))
    work_source = source_of(images)
    shard_size = work_source.shard_size(config.shard_size or defaults.shard_size_for(device.type))
    return Plan(
        config,
        work_source,
        target,
        job,
        backbone,
        layers,
        device,
        precision,
        policy,
        fingerprint,
        feed,
        shard_size,
        label or target.name,
    )


def decode_policy(backbone: Backbone, config: ExtractConfig, device: torch.device) -> DecodePolicy:
    """How pixels are made for ``backbone`` on ``device`` (recorded in the fingerprint)."""
    if config.decode == "gpu" and device.type != "cuda":
        raise UsageError("--decode gpu needs a CUDA device (--device cuda)")
    views = ViewPolicy(config.augment, config.augment_seed) if config.augment else None
    decode = config.decode
    if views is not None and decode == "gpu":
        # Views are cut from the full-size decode in the workers; nvJPEG would hand the device
        # only the clean crop. Recorded: the file's decode policy says cpu.
        note("--augment: images are decoded on the CPU workers (not --decode gpu)", config.quiet)
        decode = "cpu"
    return DecodePolicy(
        backbone.transform,
        config.background,
        config.max_image_pixels,
        decode,
        parse_bytes(config.max_file_bytes, "--max-file-bytes"),
        views,
    )


def file_attributes(plan: Plan) -> dict[str, Any]:
    """The root attributes: the run's fingerprint plus labels, source and versions."""
    import torchvision

    attrs: dict[str, Any] = {
        "featx_schema": schema.SCHEMA_VERSION,
        **plan.source.attributes(),  # inputs, class_names (archives': decided at assembly)
        **plan.fingerprint,
        "compression": plan.config.compression,
        "source": _source(plan.source.images),
        "featx_version": __version__,
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
    }
    if plan.backbone.weights["source"] != "torchvision":
        import timm

        attrs["timm_version"] = timm.__version__
    attrs.update(device_attributes(plan.device, plan.policy.mode))
    return attrs


def device_attributes(device: torch.device, decode: str) -> dict[str, Any]:
    """On CUDA: which GPU computed the features and, with ``--decode gpu``, which decoder made
    the pixels (torchvision's nvJPEG, built against this CUDA; torchvision does not say whether
    the GPU's hardware JPEG engine or its CUDA decoder ran, so neither does the file)."""
    if device.type != "cuda":
        return {}
    attrs: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(device),
        "cuda_version": torch.version.cuda or "",
    }
    if decode == "gpu":
        import torchvision

        attrs["gpu_decoder"] = {
            "library": f"torchvision {torchvision.__version__} decode_jpeg (nvJPEG)",
            "cuda": torch.version.cuda or "",
            "backend": "not reported by torchvision (hardware engine or CUDA)",
        }
    return attrs


def _source(images: ImageList | ArchiveList) -> str:
    """The root the rows are relative to: a folder (absolute) or a URL."""
    from featx.data.filesystem import filesystem_of

    root = images.root
    return printable(public_url(root) if filesystem_of(root).remote else os.path.abspath(root))
