"""``featx train-head``, ``predict`` and ``evaluate``: classifier heads on features."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from featx.cli._app import app, emit, libraries_silenced, reports_errors, say
from featx.cli._options import (
    ClassWeight,
    Config,
    Dropout,
    Epochs,
    ErrorsCsv,
    ErrorsPng,
    FeatureLayer,
    FeaturesOut,
    Head,
    HeadBatchSize,
    HeadDevice,
    HeadFile,
    HeadWorkers,
    Hidden,
    Json,
    Lr,
    MemoryBudget,
    MinibatchSize,
    Optimizer,
    Overwrite,
    Patience,
    Progress,
    Quiet,
    Seed,
    TopK,
    Tta,
    Val,
    ValSplit,
    WeightDecay,
)
from featx.config import HeadConfig, PredictConfig, settings
from featx.errors import UsageError


@app.command("train-head")
@reports_errors
def train_head(
    features: Annotated[Path, typer.Argument(help="A featx HDF5 file whose rows have labels.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Head file to write (safetensors + JSON).")
    ],
    layer: FeatureLayer = None,
    head: Head = None,
    hidden: Hidden = None,
    dropout: Dropout = None,
    val_split: ValSplit = None,
    val: Val = None,
    optimizer: Optimizer = None,
    epochs: Epochs = None,
    lr: Lr = None,
    weight_decay: WeightDecay = None,
    batch_size: MinibatchSize = None,
    patience: Patience = None,
    class_weight: ClassWeight = None,
    seed: Seed = None,
    device: HeadDevice = None,
    memory_budget: MemoryBudget = None,
    config: Config = None,
    overwrite: Overwrite = None,
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    """Train a classifier head on a features file: the head, OUT.metrics.json, OUT.confusion.png.

    Example: featx train-head feats.h5 -o cats.head --head mlp --class-weight balanced
    """
    if val is not None and val_split is not None:
        raise UsageError("--val and --val-split both choose the validation rows: use one of them")
    flags = {
        "layer": layer,
        "head": head,
        "hidden": hidden,
        "dropout": dropout,
        "val_split": val_split,
        "val": val,
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
        "overwrite": overwrite,
    }
    options = settings(HeadConfig, flags, config, "train-head")
    _check_before_torch(features, output, options.overwrite)

    from featx.heads.reports import metrics_table
    from featx.heads.train import train_head as run_train

    result = run_train(features, output, options)
    if as_json:
        emit(result.metrics)
    metrics = result.metrics
    say(metrics_table(metrics), quiet)
    say(
        f"wrote {result.output}, {result.metrics_file}, {result.picture}: "
        f"{_trained_on(metrics)}, "
        f"{metrics['epochs_run']} epochs ({metrics['stopped']})",
        quiet,
    )


def _trained_on(metrics: dict[str, object]) -> str:
    views = metrics.get("trained_on_views", 1)
    if views == 1:
        return f"trained on {metrics['train_size']} rows, validated on {metrics['val_size']}"
    return (
        f"trained on {metrics['train_size']} images × {views} views, validated on "
        f"{metrics['val_size']} images' clean views only"
    )


def _check_before_torch(
    source: Path, output: Path, overwrite: bool, head: Path | None = None
) -> None:
    """Usage errors that need no model, before torch loads: they answer at once."""
    from featx.data.filesystem import filesystem_of
    from featx.store.durable import check_output

    named = os.fspath(source)
    remote = filesystem_of(named).remote
    if not source.exists() and not remote and "{" not in named:  # URLs: listed later
        raise UsageError(f"{source}: no such file or folder")
    if head is not None and not head.is_file():
        raise UsageError(f"head {head}: no such file")
    check_output(output, overwrite)


def _apply_flags(
    device: str | None,
    batch_size: int | None,
    workers: int | None,
    memory_budget: str | None,
    overwrite: bool | None,
    quiet: bool,
    progress: bool | None,
) -> dict[str, object]:
    """The ``PredictConfig`` flags predict and evaluate share (``--quiet`` silences progress)."""
    return {
        "device": device,
        "batch_size": batch_size,
        "workers": workers,
        "memory_budget": memory_budget,
        "overwrite": overwrite,
        "quiet": quiet,
        "progress": False if quiet else progress,
    }


def _report_failures(failed: list[dict[str, str]], quiet: bool) -> None:
    for item in failed[:20]:
        say(f"featx: skipped {item['path']}: {item['error']}", quiet)
    if len(failed) > 20:
        say(f"featx: ... and {len(failed) - 20} more images skipped (--json lists all)", quiet)


@app.command()
@reports_errors
def predict(
    source: Annotated[
        str,
        typer.Argument(
            help="Image folder, tars, parquet shards or img2dataset's files format (as for "
            "extract), or a featx HDF5 features file."
        ),
    ],
    head: HeadFile,
    output: Annotated[Path, typer.Option("--output", "-o", help="CSV file to write.")],
    top_k: TopK = None,
    tta: Tta = None,
    features_out: FeaturesOut = None,
    device: HeadDevice = None,
    batch_size: HeadBatchSize = None,
    workers: HeadWorkers = None,
    memory_budget: MemoryBudget = None,
    overwrite: Overwrite = None,
    quiet: Quiet = False,
    progress: Progress = None,
    as_json: Json = False,
) -> None:
    """Predict classes with a head: on an image folder (extracted as the head records) or features.

    CSV columns: path, predicted_class, probability, then top1_class, top1_probability, ...,
    then true_class when SOURCE is labelled (the accuracy goes to stderr).
    Example: featx predict ./new_photos --head cats.head -o predictions.csv --top-k 5
    """
    flags = _apply_flags(device, batch_size, workers, memory_budget, overwrite, quiet, progress)
    chosen = {"top_k": top_k, "tta": tta, "features_out": features_out}
    options = settings(PredictConfig, {**flags, **chosen})
    _check_before_torch(Path(source), output, options.overwrite, head)

    from featx.heads.apply import predict as run_predict

    with libraries_silenced(quiet):
        result = run_predict(source, head, output, options)
    if as_json:
        emit(result.as_dict())
    _report_failures(result.failed, quiet)
    say(
        f"wrote {result.output}: {result.rows} rows"
        + (
            f" (each the mean of {result.views_averaged} views)"
            if result.views_averaged > 1
            else ""
        )
        + (f", {len(result.failed)} images skipped" if result.failed else "")
        + (f"; features in {options.features_out}" if options.features_out else ""),
        quiet,
    )
    if result.accuracy is not None:
        say(f"accuracy {result.accuracy:.3f} on {result.labelled_rows} labelled rows", quiet)


@app.command()
@reports_errors
def evaluate(
    source: Annotated[
        str, typer.Argument(help="Labelled featx HDF5 features file, or class-folder images.")
    ],
    head: HeadFile,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Metrics JSON to write (the PNG goes beside it) "
            "[default: SOURCE.HEAD.metrics.json]",
        ),
    ] = None,
    errors: ErrorsCsv = None,
    errors_png: ErrorsPng = None,
    top_k: TopK = None,
    tta: Tta = None,
    device: HeadDevice = None,
    batch_size: HeadBatchSize = None,
    workers: HeadWorkers = None,
    memory_budget: MemoryBudget = None,
    overwrite: Overwrite = None,
    quiet: Quiet = False,
    progress: Progress = None,
    as_json: Json = False,
) -> None:
    """Measure a head on a labelled set: the same metrics JSON and confusion PNG as train-head.

    Example: featx evaluate test_feats.h5 --head cats.head --errors errors.csv
    """
    flags = _apply_flags(device, batch_size, workers, memory_budget, overwrite, quiet, progress)
    mistakes = {"errors": errors, "errors_png": errors_png, "top_k": top_k, "tta": tta}
    options = settings(PredictConfig, {**flags, **mistakes})

    from featx.heads.apply import evaluate as run_evaluate
    from featx.heads.reports import metrics_table

    result = run_evaluate(source, head, output, options)
    if as_json:
        emit(result.metrics)
    _report_failures(result.metrics["failed"], quiet)
    say(metrics_table(result.metrics), quiet)
    written = [result.metrics_file, result.picture, options.errors, options.errors_png]
    say(f"wrote {', '.join(str(path) for path in written if path)}", quiet)
