"""Every option declared once, as an ``Annotated`` alias that each command taking it reuses.

Parameters are named after the config dataclass fields they fill (``batch_size`` →
``ExtractConfig.batch_size``), so ``config.settings`` maps flags and TOML tables onto the
dataclass by name. Defaults are shown from the dataclasses, never repeated here; an option
left out is ``None``, so a config file's value stands unless a flag overrides it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from featx.config import POOLS, ExtractConfig, HeadConfig, PredictConfig, ProbeConfig

_E, _H, _P, _R = ExtractConfig, HeadConfig, PredictConfig, ProbeConfig
MODEL_HELP = "torchvision name, timm:NAME or efficientnet_lite0|1|2 (offline-ready)"

# --- what extract computes --------------------------------------------------------------------
Model = Annotated[str | None, typer.Option(help=f"{MODEL_HELP} [default: {_E.model}]")]
ModelName = Annotated[str, typer.Argument(help=MODEL_HELP)]
Weights = Annotated[
    str | None,
    typer.Option(
        help="DEFAULT, an enum name (IMAGENET1K_V2), none, or a .pth/.safetensors file "
        f"[default: {_E.weights}]"
    ),
]
Layers = Annotated[
    list[str] | None,
    typer.Option(
        "--layer",
        help="Node name to cut at; repeat for several (one forward pass). "
        "[default: the classifier's input]",
    ),
]
Pool = Annotated[str | None, typer.Option(help=f"{' | '.join(POOLS)} [default: {_E.pool}]")]
ImageSize = Annotated[
    int | None, typer.Option(help="Crop size override (resize keeps the weights' ratio).")
]
Precision = Annotated[
    str | None,
    typer.Option(
        help=f"auto | fp32 | fp16 | bf16 [default: {_E.precision}: fp32 on CPU, fp16 on CUDA]"
    ),
]
Dtype = Annotated[
    str | None, typer.Option(help=f"Storage dtype: float32 | float16 [default: {_E.dtype}]")
]
Decode = Annotated[
    str | None,
    typer.Option(
        help="cpu (full decode) | fast (JPEG DCT scaling for big photos) | gpu (nvJPEG) "
        f"[default: {_E.decode}]"
    ),
]
MaxImagePixels = Annotated[
    int | None,
    typer.Option(help="Decompression-bomb limit in pixels [default: Pillow's, 89478485]"),
]
MaxFileBytes = Annotated[
    str | None,
    typer.Option(
        help=f"Image files larger than this fail unread, e.g. 200MB [default: {_E.max_file_bytes}]"
    ),
]
Labels = Annotated[
    Path | None, typer.Option(help="CSV of path,label: labels for listed files or flat folders.")
]
LabelFrom = Annotated[
    str | None,
    typer.Option(
        help="Archives: labels from .cls members (cls), a field of .json members "
        f"(json:FIELD, dots for nested keys) or none [default: {_E.label_from}]"
    ),
]

# --- how extract runs -------------------------------------------------------------------------
BatchSize = Annotated[
    int | None, typer.Option(help="Images per forward pass [default: 256 on CUDA, else 32]")
]
Workers = Annotated[
    int | None,
    typer.Option(
        help="DataLoader decode processes [default: from the device, cores and ranks per node]"
    ),
]
Device = Annotated[
    str | None, typer.Option(help=f"auto | cpu | cuda | cuda:N | mps [default: {_E.device}]")
]
ShardSize = Annotated[
    int | None,
    typer.Option(help=f"Images per shard, the unit of resume [default: {_E.shard_size}]"),
]
Shard = Annotated[
    str | None,
    typer.Option(
        help="K/N: do part K of N (SLURM arrays, CI matrices); `featx merge` joins the parts."
    ),
]
MaxFailures = Annotated[
    str | None,
    typer.Option(
        help=f"Exit 3 when more images fail: a count, P% or none [default: {_E.max_failures}]"
    ),
]
Compile = Annotated[
    bool | None,
    typer.Option("--compile", help="torch.compile the cut model (fixed batch shape)."),
]
Compression = Annotated[str | None, typer.Option(help=f"none | lzf [default: {_E.compression}]")]

# --- shared by several commands ---------------------------------------------------------------
Config = Annotated[
    Path | None, typer.Option(help="TOML file with any of these options; flags override it.")
]
Overwrite = Annotated[bool | None, typer.Option("--overwrite", help="Replace an existing output.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Nothing on stderr but errors.")]
Progress = Annotated[
    bool | None,
    typer.Option(
        "--progress/--no-progress",
        help="Progress bar on stderr [default: when stderr is a terminal]",
    ),
]
Json = Annotated[bool, typer.Option("--json", help="JSON on stdout.")]
FeaturesFile = Annotated[Path, typer.Argument(help="A featx HDF5 features file.")]
FeatureLayer = Annotated[str | None, typer.Option(help="Feature layer [default: the only one].")]
MemoryBudget = Annotated[
    str | None,
    typer.Option(
        help=f"Features held in memory at once; larger files stream [default: {_P.memory_budget}]"
    ),
]
HeadFile = Annotated[Path, typer.Option(help="Head file written by featx train-head.")]
HeadDevice = Annotated[
    str | None, typer.Option(help=f"auto | cpu | cuda | cuda:N | mps [default: {_P.device}]")
]
HeadBatchSize = Annotated[
    int | None, typer.Option(help="Images per forward pass [default: extract's]")
]
HeadWorkers = Annotated[
    int | None, typer.Option(help="DataLoader decode processes [default: extract's]")
]
Seed = Annotated[
    int | None, typer.Option(help=f"Seeds the split, init and shuffling [default: {_H.seed}]")
]

# --- probe ------------------------------------------------------------------------------------
Folds = Annotated[
    int | None, typer.Option(help=f"Stratified cross-validation folds [default: {_R.folds}]")
]
InnerFolds = Annotated[
    int | None,
    typer.Option(help=f"Folds of the training rows that choose C [default: {_R.inner_folds}]"),
]
CGrid = Annotated[
    list[float] | None,
    typer.Option(
        help="A value of C (scikit-learn's inverse L2 strength) to choose from; repeat "
        f"[default: {', '.join(f'{c:g}' for c in _R.c_grid)}]"
    ),
]
ProbeLayers = Annotated[
    list[str] | None,
    typer.Option("--layer", help="A layer to probe; repeat [default: every layer of each file]"),
]
MaxRows = Annotated[
    int | None,
    typer.Option(help="Probe a stratified, seeded subsample of this many rows [default: all]"),
]
ProbeEpochs = Annotated[
    int | None,
    typer.Option(
        help=f"At most this many L-BFGS epochs (20 iterations) a fit [default: {_R.epochs}]"
    ),
]
