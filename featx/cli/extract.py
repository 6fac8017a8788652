"""``featx extract``, ``featx bench`` and ``featx merge``: making features files."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from featx.cli._app import app, emit, libraries_silenced, reports_errors, say, show
from featx.cli._options import (
    Augment,
    AugmentSeed,
    BatchSize,
    ClassNames,
    Compile,
    Compression,
    Config,
    Decode,
    Device,
    Dtype,
    ImageSize,
    Json,
    LabelFrom,
    Labels,
    Layers,
    MaxFailures,
    MaxFileBytes,
    MaxImagePixels,
    Model,
    Overwrite,
    Pool,
    Precision,
    Progress,
    Quiet,
    Shard,
    ShardSize,
    Weights,
    Workers,
)
from featx.config import ExtractConfig, settings
from featx.errors import TooManyFailures, UsageError
from featx.inputs import MAX_LIST_BYTES, read_input


@app.command()
@reports_errors
def extract(
    source: Annotated[
        str | None,
        typer.Argument(
            help="Image folder (class subfolders become labels); WebDataset tars or img2dataset "
            "parquet shards (a file, a folder of them, a {00000..00099}.tar brace list) or "
            "img2dataset's files format (a local folder of 00000/ shard folders); any of these "
            "but the last as an s3://, gs:// or https:// URL; or - to read paths from stdin."
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="HDF5 file to write.")
    ] = None,
    files_from: Annotated[
        Path | None, typer.Option(help="Read image paths from this file (one per line).")
    ] = None,
    null: Annotated[
        bool, typer.Option("-0", "--null", help="Paths are NUL-separated (find -print0).")
    ] = False,
    root: Annotated[
        Path | None,
        typer.Option(
            help="Relative listed paths resolve against this folder [default: the current folder]."
        ),
    ] = None,
    labels: Labels = None,
    label_from: LabelFrom = None,
    class_names: ClassNames = None,
    model: Model = None,
    weights: Weights = None,
    layer: Layers = None,
    pool: Pool = None,
    image_size: ImageSize = None,
    batch_size: BatchSize = None,
    workers: Workers = None,
    device: Device = None,
    precision: Precision = None,
    dtype: Dtype = None,
    shard_size: ShardSize = None,
    shard: Shard = None,
    max_failures: MaxFailures = None,
    max_image_pixels: MaxImagePixels = None,
    max_file_bytes: MaxFileBytes = None,
    decode: Decode = None,
    augment: Augment = None,
    augment_seed: AugmentSeed = None,
    compile_model: Compile = None,
    compression: Compression = None,
    config: Config = None,
    overwrite: Overwrite = None,
    quiet: Quiet = False,
    progress: Progress = None,
    as_json: Json = False,
) -> None:
    """Extract features of every image under SOURCE into an HDF5 file.

    Example: featx extract ./photos -o f.h5 --model efficientnet_lite0 --layer blocks.5 --pool max
    """
    flags = {
        "labels_csv": labels,
        "label_from": label_from,
        "class_names_file": class_names,
        "model": model,
        "weights": weights,
        "layers": layer,
        "pool": pool,
        "image_size": image_size,
        "batch_size": batch_size,
        "workers": workers,
        "device": device,
        "precision": precision,
        "dtype": dtype,
        "shard_size": shard_size,
        "shard": shard,
        "max_failures": max_failures,
        "max_image_pixels": max_image_pixels,
        "max_file_bytes": max_file_bytes,
        "decode": decode,
        "augment": augment,
        "augment_seed": augment_seed,
        "compile": compile_model,
        "compression": compression,
        "overwrite": overwrite,
        "quiet": quiet,
        "progress": False if quiet else progress,
    }
    options = settings(ExtractConfig, flags, config, "extract")
    if output is None:
        raise UsageError("missing option -o / --output: the HDF5 file to write")
    from featx.preflight import preflight  # no torch: usage errors come at once

    images = preflight(_image_source(source, files_from, null, root), output, options)
    skipped = images.skipped_links
    if skipped:
        say(
            f"featx: skipped {skipped} symbolic link(s) into /proc, /sys, /dev "
            "or to a folder holding the source",
            quiet,
        )

    from featx.pipeline import extract as run_extract

    try:
        with libraries_silenced(quiet):
            result = run_extract(images, output, options)
    except TooManyFailures as error:  # the file was written: its summary still goes to stdout
        if as_json and error.result is not None:
            emit(error.result.as_dict())
        raise
    if as_json:
        emit(result.as_dict())
    say(summary_line(result), quiet)


def summary_line(result: Any) -> str:
    """``wrote feats.h5: 18 images, 0 failed; 8.8 img/s after 4.1 s of start-up``."""
    line = f"wrote {result.output}: {result.images} images, {result.failed} failed"
    if result.steady_images_per_second:
        line += (
            f"; {result.steady_images_per_second:.1f} img/s after "
            f"{result.startup_s:.1f} s of start-up (model, workers, first batch)"
        )
    if result.shards_done_before:
        line += f" (resumed: {result.shards_done_before} shards were already done)"
    return line


def _image_source(
    source: str | None, files_from: Path | None, null: bool, root: Path | None
) -> Any:
    """A folder path, or an ImageList from stdin (``-``) or ``--files-from``."""
    if source is not None and files_from is not None:
        raise UsageError("SOURCE and --files-from both name the images: use one of them")
    if source is None and files_from is None:
        raise UsageError("missing SOURCE: an image folder, - for paths on stdin, or --files-from")
    if source not in (None, "-"):
        if root is not None:
            raise UsageError("--root applies to path lists (- or --files-from), not to a folder")
        return source
    if source == "-":
        if sys.stdin.isatty():
            raise UsageError("SOURCE is - but stdin is a terminal: pipe a list of paths in")
    data = read_input(files_from or "-", "--files-from" if files_from else "SOURCE", MAX_LIST_BYTES)
    from featx.data.worklist import read_path_list

    entries = [os.fsdecode(item) for item in data.split(b"\0" if null else b"\n")]
    return read_path_list(entries, str(root or Path.cwd()))  # --labels: applied by extract()


@app.command()
@reports_errors
def bench(
    source: Annotated[str, typer.Argument(help="An image folder (your own images).")],
    model: Model = None,
    layer: Layers = None,
    pool: Pool = None,
    image_size: ImageSize = None,
    batch_size: BatchSize = None,
    workers: Workers = None,
    device: Device = None,
    precision: Precision = None,
    decode: Decode = None,
    config: Config = None,
    limit: Annotated[int, typer.Option(help="Use at most this many images.")] = 256,
    as_json: Json = False,
) -> None:
    """Measure decode, model and end-to-end images/s on your images, and name the bottleneck.

    Random weights are used (throughput does not depend on them), so nothing is downloaded.
    Example: featx bench ./photos --model resnet18 --image-size 112 --json
    """
    flags = {
        "model": model,
        "layers": layer,
        "pool": pool,
        "image_size": image_size,
        "batch_size": batch_size,
        "workers": workers,
        "device": device,
        "precision": precision,
        "decode": decode,
    }
    options = settings(ExtractConfig, flags, config, "extract")

    from featx.bench import bench as run_bench

    report = run_bench(source, options, limit=limit)
    if as_json:
        emit(report)
        return
    rows = [
        ("decode per worker", report["decode_images_per_second_per_worker"]),
        (
            f"decode ceiling ({report['workers']} workers)",
            report["decode_ceiling_images_per_second"],
        ),
        ("GPU decode + resize", report["gpu_decode_images_per_second"]),
        ("model on pre-made tensors", report["model_images_per_second"]),
        ("end to end", report["end_to_end_images_per_second"]),
    ]
    show(
        f"{report['model']} {','.join(report['layers'])} on {report['device']} "
        f"({report['precision']}, batch {report['batch_size']}, {report['images']} images)"
    )
    for name, value in rows:
        if value is not None:
            show(f"  {name:<32} {value:>9.1f} img/s")
    show(f"  {'writer share of wall time':<32} {report['writer_share_of_wall_time']:>9.1%}")
    show(f"  {'peak RSS':<32} {report['peak_rss_mb']:>9.0f} MB")
    if report["peak_gpu_memory_mb"] is not None:
        show(f"  {'peak GPU memory':<32} {report['peak_gpu_memory_mb']:>9.0f} MB")
    show(f"  bottleneck: {report['bottleneck']}")


@app.command()
@reports_errors
def merge(
    output: Annotated[Path, typer.Argument(help="The file to assemble (its parts lie beside it).")],
    parts: Annotated[
        list[Path] | None, typer.Argument(help="Part files, if not found by name.")
    ] = None,
    virtual: Annotated[
        bool,
        typer.Option(
            "--virtual", help="An HDF5 virtual dataset over the parts: one view, no copy."
        ),
    ] = False,
    overwrite: Overwrite = None,
    as_json: Json = False,
) -> None:
    """Assemble the part files of `featx extract --shard K/N` runs into one file.

    Example: featx merge feats.h5 --virtual
    """
    from featx.store.merge import merge as run_merge

    result = run_merge(output, parts, virtual=virtual, overwrite=bool(overwrite))
    if as_json:
        emit(result)
    say(
        f"wrote {result['output']}: {result['images']} images from {result['parts']} parts"
        + (" (virtual)" if virtual else "")
    )
