"""The ``featx`` command: parse arguments, call one library function, map errors to exit codes.

torch and h5py are imported inside the commands, so ``featx --help`` answers at once.
Exit codes: 0 done, 1 failed, 2 usage error, 3 too many failed images, 130/143 interrupted,
141 stdout closed early (``| head``) after the work completed.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from featx.config import (
    POOLS,
    ExtractConfig,
    HeadConfig,
    PredictConfig,
    build,
    load_toml,
    parse_shard,
)
from featx.errors import EXIT_BROKEN_PIPE, EXIT_SIGINT, FeatxError, TooManyFailures, UsageError

app = typer.Typer(
    name="featx",
    help="Extract features of image folders with a cut pretrained backbone, into HDF5.\n\n"
    "Example: featx extract ./photos -o feats.h5 --model resnet50 --layer layer3",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

F = TypeVar("F", bound=Callable[..., Any])
RESUME_HINT = "finished shards are kept: run the same command again to resume"


def _terminated(signum: int, _frame: Any) -> None:
    """SIGTERM outside the extraction loop (start-up, assembly): the same one line and 143
    as inside it, where pipeline.py's own handler lets the batch in flight finish first."""
    from featx.errors import Interrupted

    raise Interrupted(f"interrupted by SIGTERM; {RESUME_HINT}", signum)


def reports_errors(command: F) -> F:
    """One place where library exceptions become one line on stderr and an exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except FeatxError as error:
            typer.echo(f"featx: error: {error}", err=True)
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            typer.echo(f"featx: interrupted by SIGINT; {RESUME_HINT}", err=True)
            raise typer.Exit(EXIT_SIGINT) from None
        except BrokenPipeError:
            # The reader of stdout went away (`| head -1`): nothing to report, nothing lost.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(EXIT_BROKEN_PIPE) from None

    return wrapper  # type: ignore[return-value]


def emit(data: Any) -> None:
    """Machine output: JSON on stdout, one document."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def say(message: str, quiet: bool = False) -> None:
    """Human output: stderr."""
    if not quiet:
        typer.echo(message, err=True)


# --- extract --------------------------------------------------------------------------------

_D = ExtractConfig  # defaults are read from the dataclass, never repeated here


@app.command()
@reports_errors
def extract(
    ctx: typer.Context,
    source: Annotated[
        str | None,
        typer.Argument(
            help="Image folder (class subfolders become labels), or - to read paths from stdin."
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
    labels: Annotated[
        Path | None,
        typer.Option(help="CSV of path,label: labels for listed files or flat folders."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help=f"torchvision name, timm:NAME or efficientnet_lite0 [default: {_D.model}]"
        ),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help=f"DEFAULT, an enum name (IMAGENET1K_V2), none, or a .pth/.safetensors file [default: {_D.weights}]"
        ),
    ] = None,
    layer: Annotated[
        list[str] | None,
        typer.Option(
            help="Node name to cut at; repeat for several (one forward pass). [default: the classifier's input]"
        ),
    ] = None,
    pool: Annotated[
        str | None, typer.Option(help=f"avg | max | flatten | none | cls [default: {_D.pool}]")
    ] = None,
    image_size: Annotated[
        int | None, typer.Option(help="Crop size override (resize keeps the weights' ratio).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help=f"Images per forward pass [default: {_D.batch_size}]")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="DataLoader decode processes [default: from the core count]")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help=f"auto | cpu | cuda | cuda:N | mps [default: {_D.device}]")
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            help=f"auto | fp32 | fp16 | bf16 [default: {_D.precision}: fp32 on CPU, fp16 on CUDA]"
        ),
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help=f"Storage dtype: float32 | float16 [default: {_D.dtype}]")
    ] = None,
    shard_size: Annotated[
        int | None,
        typer.Option(help=f"Images per shard, the unit of resume [default: {_D.shard_size}]"),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            help="K/N: do part K of N (SLURM arrays, CI matrices); `featx merge` joins the parts."
        ),
    ] = None,
    max_failures: Annotated[
        str | None,
        typer.Option(
            help=f"Exit 3 when more images fail: a count, P% or none [default: {_D.max_failures}]"
        ),
    ] = None,
    max_image_pixels: Annotated[
        int | None,
        typer.Option(help="Decompression-bomb limit in pixels [default: Pillow's, 89478485]"),
    ] = None,
    decode: Annotated[
        str | None,
        typer.Option(
            help="cpu (full decode) | fast (JPEG DCT scaling for big photos) | gpu (nvJPEG) [default: cpu]"
        ),
    ] = None,
    compile_model: Annotated[
        bool, typer.Option("--compile", help="torch.compile the cut model (fixed batch shape).")
    ] = False,
    compression: Annotated[str | None, typer.Option(help="none | lzf [default: none]")] = None,
    config: Annotated[
        Path | None, typer.Option(help="TOML file with any of these options; flags override it.")
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace an existing output (and discard an unfinished run)."
        ),
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar, no summary on stderr.")
    ] = False,
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress",
            help="Progress bar on stderr [default: when stderr is a terminal]",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON summary on stdout.")
    ] = False,
) -> None:
    """Extract features of every image under SOURCE into an HDF5 file.

    Example: featx extract ./photos -o feats.h5 --model resnet18 --layer layer3 --pool max
    """
    from featx.pipeline import extract as run_extract

    values: dict[str, Any] = load_toml(config, "extract") if config else {}
    given = {
        "model": model,
        "weights": weights,
        "layers": tuple(layer) if layer else None,
        "pool": pool,
        "image_size": image_size,
        "batch_size": batch_size,
        "workers": workers,
        "device": device,
        "precision": precision,
        "dtype": dtype,
        "shard_size": shard_size,
        "shard": parse_shard(shard) if shard else None,
        "max_failures": max_failures,
        "max_image_pixels": max_image_pixels,
        "decode": decode,
        "compression": compression,
    }
    values.update({key: value for key, value in given.items() if value is not None})
    if overwrite:
        values["overwrite"] = True
    if compile_model:
        values["compile"] = True
    values["progress"] = False if quiet else progress
    if labels:
        values["labels_csv"] = str(labels)
    settings = build(ExtractConfig, values, source=str(config) if config else "options")
    if output is None:
        raise UsageError("missing option -o / --output: the HDF5 file to write")
    try:
        result = run_extract(_image_source(source, files_from, null, root), output, settings)
    except TooManyFailures as error:  # the file was written: its summary still goes to stdout
        if as_json and error.result is not None:
            emit(error.result.as_dict())
        raise
    if as_json:
        emit(result.as_dict())
    say(
        f"wrote {result.output}: {result.images} images, {result.failed} failed, "
        f"{result.images_per_second:.1f} img/s",
        quiet,
    )


def _image_source(
    source: str | None, files_from: Path | None, null: bool, root: Path | None
) -> Any:
    """A folder path, or an ImageList from stdin (``-``) or ``--files-from``."""
    from featx.images import read_path_list

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
        data = sys.stdin.buffer.read()
    else:
        try:
            data = Path(files_from).read_bytes()
        except OSError as error:
            raise UsageError(f"--files-from {files_from}: {error.strerror}") from None
    entries = [os.fsdecode(item) for item in data.split(b"\0" if null else b"\n")]
    return read_path_list(entries, str(root or Path.cwd()))  # --labels: applied by extract()


# --- layers / info / models -------------------------------------------------------------------


@app.command()
@reports_errors
def layers(
    model: Annotated[str, typer.Argument(help="torchvision name, timm:NAME or efficientnet_lite0")],
    pool: Annotated[str, typer.Option(help="Pool used for the dim column.")] = _D.pool,
    image_size: Annotated[int | None, typer.Option(help="Crop size override.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
) -> None:
    """List every cut point: node name, output shape, pooled dim, MB per 1,000 images.

    Example: featx layers resnet50 | grep layer4
    """
    from featx.backbone import describe_layers, load_backbone

    if pool not in POOLS:
        raise UsageError(f"--pool {pool!r}: expected one of {', '.join(POOLS)}")
    backbone = load_backbone(model, "none", image_size)
    infos = describe_layers(backbone, pool)
    default = backbone.default_layer()
    if as_json:
        emit(
            {
                "model": model,
                "default": default,
                "pool": pool,
                "input": backbone.transform["crop"],
                "layers": [i.as_dict() for i in infos],
            }
        )
        return
    width = max(len(info.name) for info in infos)
    print(f"{'layer':<{width}}  {'shape':<18} {'dim':>9} {'MB/1k img':>10}")
    for info in infos:
        mark = "  (default)" if info.name == default else ""
        shape = "x".join(str(v) for v in info.shape)
        print(f"{info.name:<{width}}  {shape:<18} {info.dim:>9} {info.mb_per_1000:>10.2f}{mark}")


@app.command()
@reports_errors
def info(
    path: Annotated[Path, typer.Argument(help="A featx HDF5 file.")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
) -> None:
    """Show what a features file holds: counts, layers, dims, model, weights, transform, failures.

    Example: featx info feats.h5 --json
    """
    from featx.reader import FeatureFile

    with FeatureFile(path) as f:
        summary = f.summary()
        failed = f.failed
    if as_json:
        emit({**summary, "failed_files": [{"path": p, "error": e} for p, e in failed]})
        return
    print(
        f"{path}: {summary['images']} images, {summary['failed']} failed, "
        f"complete={summary.get('complete')}"
    )
    print(
        f"model {summary.get('model')}  weights {summary.get('weights')}  pool {summary.get('pool')}"
    )
    for name, shape in summary["feature_shapes"].items():
        print(
            f"  features/{name}: {summary['images']} x {' x '.join(map(str, shape))} "
            f"{summary['dtype']}"
        )
    if summary["class_counts"]:
        counts = ", ".join(f"{k} {v}" for k, v in summary["class_counts"].items())
        print(
            f"classes: {counts}"
            + (f", unlabelled {summary['unlabelled']}" if summary["unlabelled"] else "")
        )
    print(f"transform: {json.dumps(summary.get('transform'))}")
    print(
        f"created {summary.get('created')} by featx {summary.get('featx_version')}, "
        f"torch {summary.get('torch_version')}, torchvision {summary.get('torchvision_version')}"
    )
    for p, e in failed[:20]:
        print(f"  failed: {p}: {e}")
    if len(failed) > 20:
        print(f"  ... and {len(failed) - 20} more (featx info --json lists all)")


@app.command()
@reports_errors
def models(
    pattern: Annotated[str | None, typer.Argument(help="Only names containing this.")] = None,
    timm_models: Annotated[
        bool, typer.Option("--timm", help="List timm's models instead.")
    ] = False,
) -> None:
    """List model names featx accepts.

    Example: featx models resnet
    """
    if timm_models:
        from featx.timm_models import require_timm

        names = [f"timm:{n}" for n in require_timm().list_models()]
    else:
        from featx.backbone import torchvision_models

        names = [*torchvision_models(), "efficientnet_lite0"]
    for name in sorted(names):
        if pattern is None or pattern in name:
            print(name)


@app.command()
@reports_errors
def bench(
    source: Annotated[str, typer.Argument(help="An image folder (your own images).")],
    model: Annotated[str, typer.Option(help="Model name.")] = _D.model,
    layer: Annotated[
        list[str] | None, typer.Option(help="Cut point(s) [default: the classifier's input].")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = _D.batch_size,
    workers: Annotated[
        int | None, typer.Option(help="Decode processes [default: from the core count].")
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps")] = _D.device,
    precision: Annotated[str, typer.Option(help="auto | fp32 | fp16 | bf16")] = _D.precision,
    image_size: Annotated[int | None, typer.Option(help="Crop size override.")] = None,
    decode: Annotated[str, typer.Option(help="cpu | fast | gpu")] = _D.decode,
    limit: Annotated[int, typer.Option(help="Use at most this many images.")] = 256,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
) -> None:
    """Measure decode, model and end-to-end images/s on your images, and name the bottleneck.

    Random weights are used (throughput does not depend on them), so nothing is downloaded.
    Example: featx bench ./photos --model resnet50 --batch-size 32 --json
    """
    from featx.bench import bench as run_bench

    settings = ExtractConfig(
        model=model,
        weights="none",
        layers=tuple(layer or ()),
        batch_size=batch_size,
        workers=workers,
        device=device,
        precision=precision,
        image_size=image_size,
        decode=decode,
    )
    report = run_bench(source, settings, limit=limit)
    if as_json:
        emit(report)
        return
    rows = [
        ("decode per worker", report["decode_images_per_second_per_worker"]),
        (
            f"decode ceiling ({report['workers']} workers)",
            report["decode_ceiling_images_per_second"],
        ),
        ("model on pre-made tensors", report["model_images_per_second"]),
        ("end to end", report["end_to_end_images_per_second"]),
    ]
    print(
        f"{report['model']} {','.join(report['layers'])} on {report['device']} "
        f"({report['precision']}, batch {report['batch_size']}, {report['images']} images)"
    )
    for name, value in rows:
        print(f"  {name:<32} {value:>9.1f} img/s")
    print(f"  {'writer share of wall time':<32} {report['writer_share_of_wall_time']:>9.1%}")
    print(f"  {'peak RSS':<32} {report['peak_rss_mb']:>9.0f} MB")
    print(f"  bottleneck: {report['bottleneck']}")


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
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON summary on stdout.")] = False,
) -> None:
    """Assemble the part files of `featx extract --shard K/N` runs into one file.

    Example: featx merge feats.h5 --virtual
    """
    from featx.merge import merge as run_merge

    result = run_merge(output, parts, virtual=virtual, overwrite=overwrite)
    if as_json:
        emit(result)
    say(
        f"wrote {result['output']}: {result['images']} images from {result['parts']} parts"
        + (" (virtual)" if virtual else "")
    )


@app.command()
@reports_errors
def plot(
    path: Annotated[Path, typer.Argument(help="A featx HDF5 file.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG file to write.")],
    layer: Annotated[
        str | None, typer.Option(help="Feature layer [default: the only one].")
    ] = None,
    max_points: Annotated[
        int, typer.Option(help="Draw at most this many rows (a seeded sample).")
    ] = 5000,
    width: Annotated[int, typer.Option(help="Picture width in pixels.")] = 800,
    height: Annotated[int, typer.Option(help="Picture height in pixels.")] = 600,
) -> None:
    """Draw a 2-D PCA scatter of the features, coloured by class, to see if a layer separates them.

    Example: featx plot feats.h5 -o features.png
    """
    from featx.plot import plot_features

    result = plot_features(path, output, layer, max_points, (width, height))
    say(f"wrote {result['output']}: {result['points']} points of {result['layer']}")


weights_app = typer.Typer(
    help="Fetch pretrained weights for offline use; list the cache.\n\n"
    "Example: featx weights fetch resnet50 --weights IMAGENET1K_V2",
    no_args_is_help=True,
)
app.add_typer(weights_app, name="weights")


@weights_app.command("fetch")
@reports_errors
def weights_fetch(
    model: Annotated[str, typer.Argument(help="torchvision name, timm:NAME or efficientnet_lite0")],
    weights: Annotated[str, typer.Option(help="DEFAULT or an enum name / timm tag.")] = "DEFAULT",
) -> None:
    """Download weights into the standard torch/timm cache and print where the file went.

    Example: featx weights fetch resnet50 --weights IMAGENET1K_V2
    """
    from featx.weights import fetch

    print(fetch(model, weights))


@weights_app.command("list")
@reports_errors
def weights_list(
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
) -> None:
    """List cached weight files with their sizes.

    Example: featx weights list
    """
    from featx.weights import cached_files

    files = cached_files()
    if as_json:
        emit([{"path": str(path), "bytes": size} for path, size in files])
        return
    for path, size in files:
        print(f"{size / 1e6:10.1f} MB  {path}")
    if not files:
        say("no cached weights (featx weights fetch MODEL downloads some)")


# --- train-head / predict / evaluate --------------------------------------------------------

_H = HeadConfig  # defaults are read from the dataclasses, never repeated here
_P = PredictConfig

# Options predict and evaluate share, declared once.
HeadDevice = Annotated[
    str | None, typer.Option(help=f"auto | cpu | cuda | cuda:N | mps [default: {_P.device}]")
]
HeadBatchSize = Annotated[
    int | None, typer.Option(help="Images per forward pass [default: extract's]")
]
HeadWorkers = Annotated[
    int | None, typer.Option(help="DataLoader decode processes [default: extract's]")
]
HeadMemoryBudget = Annotated[
    str | None, typer.Option(help=f"Features held in memory at once [default: {_P.memory_budget}]")
]


@app.command("train-head")
@reports_errors
def train_head(
    features: Annotated[Path, typer.Argument(help="A featx HDF5 file whose rows have labels.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Head file to write (safetensors + JSON).")
    ],
    layer: Annotated[
        str | None, typer.Option(help="Feature layer [default: the file's only one]")
    ] = None,
    head: Annotated[
        str | None,
        typer.Option(help=f"linear (multinomial logistic) | mlp [default: {_H.head}]"),
    ] = None,
    hidden: Annotated[
        int | None, typer.Option(help=f"MLP hidden units [default: {_H.hidden}]")
    ] = None,
    dropout: Annotated[
        float | None, typer.Option(help=f"MLP dropout [default: {_H.dropout}]")
    ] = None,
    val_split: Annotated[
        float | None,
        typer.Option(help=f"Stratified fraction held out to validate [default: {_H.val_split}]"),
    ] = None,
    val: Annotated[
        Path | None,
        typer.Option(help="Validate on this features file (same extraction) instead of a split."),
    ] = None,
    optimizer: Annotated[
        str | None,
        typer.Option(help="auto | lbfgs | adamw [default: auto: lbfgs for linear, adamw for mlp]"),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(
            help=f"At most this many epochs (lbfgs: 20 iterations each) [default: {_H.epochs}]"
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(help="Learning rate [default: 1.0 for lbfgs (line search), 1e-3 for adamw]"),
    ] = None,
    weight_decay: Annotated[
        float | None,
        typer.Option(
            help="L2 on the weights (lbfgs), decoupled decay (adamw) [default: 1/training rows, sklearn's C=1]"
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help=f"adamw minibatch rows [default: {_H.batch_size}]")
    ] = None,
    patience: Annotated[
        int | None,
        typer.Option(
            help=f"Stop after this many epochs without a better val loss [default: {_H.patience}]"
        ),
    ] = None,
    class_weight: Annotated[
        str | None,
        typer.Option(help=f"none | balanced (for skewed classes) [default: {_H.class_weight}]"),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help=f"Seeds the split, init and shuffling [default: {_H.seed}]")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help=f"auto | cpu | cuda | cuda:N | mps [default: {_H.device}]")
    ] = None,
    memory_budget: Annotated[
        str | None,
        typer.Option(
            help=f"Features held in memory at once; larger files stream [default: {_H.memory_budget}]"
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="TOML file ([train-head] table) with any of these options; flags override it."
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing head file.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary on stderr.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics on stdout.")] = False,
) -> None:
    """Train a classifier head on a features file: the head, OUT.metrics.json, OUT.confusion.png.

    Example: featx train-head feats.h5 -o cats.head --head mlp --class-weight balanced
    """
    from featx.head import train_head as run_train
    from featx.metrics import metrics_table

    values: dict[str, Any] = load_toml(config, "train-head") if config else {}
    given = {
        "layer": layer,
        "head": head,
        "hidden": hidden,
        "dropout": dropout,
        "val_split": val_split,
        "val": str(val) if val else None,
        "optimizer": optimizer,
        "epochs": epochs,
        "lr": lr,
        "weight_decay": weight_decay,
        "batch_size": batch_size,
        "patience": patience,
        "class_weight": class_weight,
        "seed": seed,
        "device": device,
        "memory_budget": memory_budget,
    }
    values.update({key: value for key, value in given.items() if value is not None})
    if values.get("val") and "val_split" in values:
        raise UsageError("--val and --val-split both choose the validation rows: use one of them")
    if overwrite:
        values["overwrite"] = True
    settings = build(HeadConfig, values, source=str(config) if config else "options")
    result = run_train(features, output, settings)
    if as_json:
        emit(result.metrics)
    metrics = result.metrics
    say(metrics_table(metrics), quiet)
    say(
        f"wrote {result.output}, {result.metrics_file}, {result.picture}: trained on "
        f"{metrics['train_size']} rows, validated on {metrics['val_size']}, "
        f"{metrics['epochs_run']} epochs ({metrics['stopped']})",
        quiet,
    )


def _predict_config(values: dict[str, Any], quiet: bool, progress: bool | None) -> Any:
    values = {key: value for key, value in values.items() if value is not None}
    values["progress"] = False if quiet else progress
    return build(PredictConfig, values)


def _report_failures(failed: list[dict[str, str]], quiet: bool) -> None:
    for item in failed[:20]:
        say(f"featx: skipped {item['path']}: {item['error']}", quiet)
    if len(failed) > 20:
        say(f"featx: ... and {len(failed) - 20} more images skipped (--json lists all)", quiet)


@app.command()
@reports_errors
def predict(
    source: Annotated[str, typer.Argument(help="Image folder, or a featx HDF5 features file.")],
    head: Annotated[Path, typer.Option(help="Head file written by featx train-head.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="CSV file to write.")],
    top_k: Annotated[
        int | None, typer.Option(help=f"Best classes listed per row [default: {_P.top_k}]")
    ] = None,
    device: HeadDevice = None,
    batch_size: HeadBatchSize = None,
    workers: HeadWorkers = None,
    memory_budget: HeadMemoryBudget = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing CSV.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Nothing on stderr.")] = False,
    progress: Annotated[
        bool | None,
        typer.Option("--progress/--no-progress", help="Progress bar while extracting images."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON summary on stdout.")] = False,
) -> None:
    """Predict classes with a head: on an image folder (extracted as the head records) or features.

    CSV columns: path, predicted_class, probability, then top1_class, top1_probability, ...
    Example: featx predict ./new_photos --head cats.head -o predictions.csv --top-k 5
    """
    from featx.predict import predict as run_predict

    settings = _predict_config(
        {
            "top_k": top_k,
            "device": device,
            "batch_size": batch_size,
            "workers": workers,
            "memory_budget": memory_budget,
            "overwrite": overwrite,
        },
        quiet,
        progress,
    )
    result = run_predict(source, head, output, settings)
    if as_json:
        emit(result.as_dict())
    _report_failures(result.failed, quiet)
    say(
        f"wrote {result.output}: {result.rows} rows"
        + (f", {len(result.failed)} images skipped" if result.failed else ""),
        quiet,
    )


@app.command()
@reports_errors
def evaluate(
    source: Annotated[
        str, typer.Argument(help="Labelled featx HDF5 features file, or class-folder images.")
    ],
    head: Annotated[Path, typer.Option(help="Head file written by featx train-head.")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Metrics JSON to write (the PNG goes beside it) [default: SOURCE.HEAD.metrics.json]",
        ),
    ] = None,
    device: HeadDevice = None,
    batch_size: HeadBatchSize = None,
    workers: HeadWorkers = None,
    memory_budget: HeadMemoryBudget = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Nothing on stderr.")] = False,
    progress: Annotated[
        bool | None,
        typer.Option("--progress/--no-progress", help="Progress bar while extracting images."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics on stdout.")] = False,
) -> None:
    """Measure a head on a labelled set: the same metrics JSON and confusion PNG as train-head.

    Example: featx evaluate test_feats.h5 --head cats.head --json
    """
    from featx.metrics import metrics_table
    from featx.predict import evaluate as run_evaluate

    settings = _predict_config(
        {
            "device": device,
            "batch_size": batch_size,
            "workers": workers,
            "memory_budget": memory_budget,
        },
        quiet,
        progress,
    )
    result = run_evaluate(source, head, output, settings)
    if as_json:
        emit(result.metrics)
    _report_failures(result.metrics["failed"], quiet)
    say(metrics_table(result.metrics), quiet)
    say(f"wrote {result.metrics_file}, {result.picture}", quiet)


def main() -> None:
    """Entry point of the ``featx`` script."""
    import signal

    # Past a file-size limit (`ulimit -f`) the kernel sends SIGXFSZ, which kills at once. Ignored,
    # the write fails with EFBIG instead and is reported like a full disk, shards kept.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _terminated)
    try:
        app()
    finally:
        # Block-buffered stdout is flushed here, not at interpreter exit, so a reader that left
        # early (`| head -1`) costs a quiet exit 141 instead of an "Exception ignored" trace.
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(EXIT_BROKEN_PIPE) from None
