"""Every option as an ``Annotated`` alias that each command taking it reuses.

A config option's flag, help and default are declared once, on its dataclass field
(``featx.options.option``); ``_option`` turns that declaration into the ``typer.Option``, so
nothing is restated here but the type the command line parses. An option left out is ``None``,
so a config file's value stands unless a flag overrides it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from featx.config import ExtractConfig, HeadConfig, PredictConfig, ProbeConfig
from featx.options import declared

_E, _H, _P, _R = ExtractConfig, HeadConfig, PredictConfig, ProbeConfig


def _option(cls: type, name: str) -> Any:
    """The ``typer.Option`` of field ``name`` of ``cls``: its flags, its help and its default."""
    spec = declared(cls, name)
    return typer.Option(*spec.decls, help=spec.help)


# --- what extract computes --------------------------------------------------------------------
Model = Annotated[str | None, _option(_E, "model")]
ModelName = Annotated[str, typer.Argument(help=declared(_E, "model").text)]
Weights = Annotated[str | None, _option(_E, "weights")]
Layers = Annotated[list[str] | None, _option(_E, "layers")]
Pool = Annotated[str | None, _option(_E, "pool")]
ImageSize = Annotated[int | None, _option(_E, "image_size")]
Precision = Annotated[str | None, _option(_E, "precision")]
Dtype = Annotated[str | None, _option(_E, "dtype")]
Decode = Annotated[str | None, _option(_E, "decode")]
Augment = Annotated[int | None, _option(_E, "augment")]
AugmentSeed = Annotated[int | None, _option(_E, "augment_seed")]
MaxImagePixels = Annotated[int | None, _option(_E, "max_image_pixels")]
MaxFileBytes = Annotated[str | None, _option(_E, "max_file_bytes")]
Labels = Annotated[Path | None, _option(_E, "labels_csv")]
LabelFrom = Annotated[str | None, _option(_E, "label_from")]
ClassNames = Annotated[Path | None, _option(_E, "class_names_file")]

# --- how extract runs -------------------------------------------------------------------------
BatchSize = Annotated[int | None, _option(_E, "batch_size")]
Workers = Annotated[int | None, _option(_E, "workers")]
Device = Annotated[str | None, _option(_E, "device")]
ShardSize = Annotated[int | None, _option(_E, "shard_size")]
Shard = Annotated[str | None, _option(_E, "shard")]
MaxFailures = Annotated[str | None, _option(_E, "max_failures")]
Compile = Annotated[bool | None, _option(_E, "compile")]
Compression = Annotated[str | None, _option(_E, "compression")]

# --- shared by several commands ---------------------------------------------------------------
Config = Annotated[
    Path | None, typer.Option(help="TOML file with any of these options; flags override it.")
]
Overwrite = Annotated[bool | None, _option(_E, "overwrite")]
Quiet = Annotated[bool, _option(_E, "quiet")]
Progress = Annotated[bool | None, _option(_E, "progress")]
Json = Annotated[bool, typer.Option("--json", help="JSON on stdout.")]
FeaturesOut = Annotated[Path | None, _option(_P, "features_out")]
ErrorsCsv = Annotated[Path | None, _option(_P, "errors")]
ErrorsPng = Annotated[Path | None, _option(_P, "errors_png")]
FeaturesFile = Annotated[Path, typer.Argument(help="A featx HDF5 features file.")]
MemoryBudget = Annotated[str | None, _option(_P, "memory_budget")]
HeadFile = Annotated[Path, typer.Option(help="Head file written by featx train-head.")]
HeadDevice = Annotated[str | None, _option(_P, "device")]

# --- train-head -------------------------------------------------------------------------------
FeatureLayer = Annotated[str | None, _option(_H, "layer")]
Head = Annotated[str | None, _option(_H, "head")]
Hidden = Annotated[int | None, _option(_H, "hidden")]
Dropout = Annotated[float | None, _option(_H, "dropout")]
ValSplit = Annotated[float | None, _option(_H, "val_split")]
Val = Annotated[Path | None, _option(_H, "val")]
Optimizer = Annotated[str | None, _option(_H, "optimizer")]
Epochs = Annotated[int | None, _option(_H, "epochs")]
Lr = Annotated[float | None, _option(_H, "lr")]
WeightDecay = Annotated[float | None, _option(_H, "weight_decay")]
MinibatchSize = Annotated[int | None, _option(_H, "batch_size")]
Patience = Annotated[int | None, _option(_H, "patience")]
ClassWeight = Annotated[str | None, _option(_H, "class_weight")]
Seed = Annotated[int | None, _option(_H, "seed")]

# --- predict, evaluate ------------------------------------------------------------------------
TopK = Annotated[int | None, _option(_P, "top_k")]
Tta = Annotated[bool | None, _option(_P, "tta")]
HeadBatchSize = Annotated[int | None, _option(_P, "batch_size")]
HeadWorkers = Annotated[int | None, _option(_P, "workers")]

# --- probe ------------------------------------------------------------------------------------
Folds = Annotated[int | None, _option(_R, "folds")]
InnerFolds = Annotated[int | None, _option(_R, "inner_folds")]
CGrid = Annotated[list[float] | None, _option(_R, "c_grid")]
ProbeLayers = Annotated[list[str] | None, _option(_R, "layers")]
MaxRows = Annotated[int | None, _option(_R, "max_rows")]
ProbeEpochs = Annotated[int | None, _option(_R, "epochs")]
ProbeSeed = Annotated[int | None, _option(_R, "seed")]
Protocol = Annotated[str | None, _option(_R, "protocol")]
KnnK = Annotated[int | None, _option(_R, "knn_k")]
KnnTemperature = Annotated[float | None, _option(_R, "knn_temperature")]
PerClass = Annotated[str | None, _option(_R, "per_class")]
