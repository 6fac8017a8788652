"""``featx probe``: which layer of which backbone, measured by a linear and a kNN probe on the
labels, and how many labels it takes (``--per-class``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from featx.cli._app import app, emit, reports_errors, say
from featx.cli._options import (
    CGrid,
    Config,
    Folds,
    HeadDevice,
    InnerFolds,
    Json,
    KnnK,
    KnnTemperature,
    MaxRows,
    MemoryBudget,
    Overwrite,
    PerClass,
    ProbeEpochs,
    ProbeLayers,
    ProbeSeed,
    Protocol,
    Quiet,
)
from featx.config import ProbeConfig, settings


@app.command()
@reports_errors
def probe(
    features: Annotated[
        list[Path],
        typer.Argument(help="featx HDF5 files with labels: one per backbone and weights."),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="PNG: accuracy by layer depth, one line per file (and the learning curve).",
        ),
    ] = None,
    layer: ProbeLayers = None,
    protocol: Protocol = None,
    folds: Folds = None,
    inner_folds: InnerFolds = None,
    c_grid: CGrid = None,
    max_rows: MaxRows = None,
    epochs: ProbeEpochs = None,
    knn_k: KnnK = None,
    knn_temperature: KnnTemperature = None,
    per_class: PerClass = None,
    seed: ProbeSeed = None,
    device: HeadDevice = None,
    memory_budget: MemoryBudget = None,
    config: Config = None,
    overwrite: Overwrite = None,
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    """Linear- and kNN-probe every layer of every file (stratified cross-validation); best first.

    Prints the table (rows tied with the best marked), the best (file, layer) and the train-head
    command for it; --per-class 1,5,10 adds a learning curve.
    Example: featx probe lite0.h5 lite0-random.h5 --max-rows 5000 -o probe.png
    """
    flags = {
        "layers": layer,
        "protocol": protocol,
        "knn_k": knn_k,
        "knn_temperature": knn_temperature,
        "per_class": per_class,
        "folds": folds,
        "inner_folds": inner_folds,
        "c_grid": c_grid,
        "max_rows": max_rows,
        "epochs": epochs,
        "seed": seed,
        "device": device,
        "memory_budget": memory_budget,
    }
    options = settings(ProbeConfig, flags, config, "probe")

    from featx.heads.probe import probe as run_probe
    from featx.heads.probe_png import probe_picture
    from featx.heads.probe_text import curve_table, probe_table
    from featx.store.durable import check_output

    if output is not None:
        check_output(output, bool(overwrite))
    result = run_probe(features, options)
    if output is not None:
        probe_picture(result, output, bool(overwrite))
    if as_json:
        emit(result.as_dict())
    say(probe_table(result), quiet)
    if options.per_class:
        say(curve_table(result), quiet)
    best = result.best
    if result.train_head_command is None:
        say(f"best: {best.file} {best.layer} (knn accuracy {best.score:.3f})", quiet)
    else:
        say(f"best: {best.file} {best.layer} (accuracy {best.score:.3f}); its head:", quiet)
        say(f"  {result.train_head_command}", quiet)
    if output is not None:
        say(f"wrote {output}", quiet)
