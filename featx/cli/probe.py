"""``featx probe``: which layer of which backbone, measured by a linear probe on the labels."""

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
    MaxRows,
    MemoryBudget,
    Overwrite,
    ProbeEpochs,
    ProbeLayers,
    ProbeSeed,
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
        typer.Option("--output", "-o", help="PNG: accuracy by layer depth, one line per file."),
    ] = None,
    layer: ProbeLayers = None,
    folds: Folds = None,
    inner_folds: InnerFolds = None,
    c_grid: CGrid = None,
    max_rows: MaxRows = None,
    epochs: ProbeEpochs = None,
    seed: ProbeSeed = None,
    device: HeadDevice = None,
    memory_budget: MemoryBudget = None,
    config: Config = None,
    overwrite: Overwrite = None,
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    """Linear-probe every layer of every file (nested stratified cross-validation); best first.

    Prints the table, the best (file, layer) and the train-head command for it.
    Example: featx probe lite0.h5 lite0-random.h5 --max-rows 5000 -o probe.png
    """
    flags = {
        "layers": layer,
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
    from featx.heads.probe import probe_table
    from featx.heads.probe_png import probe_picture
    from featx.store.durable import check_output

    if output is not None:
        check_output(output, bool(overwrite))
    result = run_probe(features, options)
    if output is not None:
        probe_picture(result, output, bool(overwrite))
    if as_json:
        emit(result.as_dict())
    say(probe_table(result), quiet)
    best = result.best
    say(f"best: {best.file} {best.layer} (accuracy {best.accuracy:.3f}); its head:", quiet)
    say(f"  {result.train_head_command}", quiet)
    if output is not None:
        say(f"wrote {output}", quiet)
