"""One frozen dataclass per command: the single source of truth for options and their defaults.

The CLI, config files (``--config FILE.toml``) and the library all build these, so a default
lives here once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from featx import defaults
from featx.data.archives import check_label_from
from featx.defaults import available_cores, default_workers
from featx.errors import UsageError
from featx.options import listed, load_toml, option, settings
from featx.values import (
    check_choice,
    check_range,
    parse_bytes,
    parse_max_failures,
    parse_shard,
    too_many_failures,
)

__all__ = [
    "ExtractConfig",
    "HeadConfig",
    "PredictConfig",
    "ProbeConfig",
    "available_cores",
    "check_range",
    "default_workers",
    "load_toml",
    "option",
    "parse_bytes",
    "parse_max_failures",
    "parse_shard",
    "settings",
    "too_many_failures",
]

POOLS = ("avg", "max", "flatten", "none", "cls")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DTYPES = ("float32", "float16")
DECODES = ("cpu", "fast", "gpu")
PROTOCOLS = ("linear", "knn")
# Upper bounds of the size options: far above any real use, far below what exhausts memory
# (an --image-size of 100000 would allocate 240 GB for one batch).
MAX_IMAGE_SIZE = 4096
MAX_BATCH_SIZE = 1 << 16
MAX_AUGMENT = 64  # views per image: 64 already multiplies a run's cost by 65
MAX_SHARD_SIZE = 1 << 22
MAX_WORKERS = 512
MODEL_HELP = "torchvision name, timm:NAME or efficientnet_lite0|1|2 (offline-ready)"


# Options several commands share, declared once each.
def _device() -> Any:
    return option("auto", "auto | cpu | cuda | cuda:N | mps")


def _memory_budget() -> Any:
    return option("2GB", "Features held in memory at once; larger files stream")


def _overwrite() -> Any:
    return option(False, "Replace an existing output.")


def _quiet() -> Any:
    return option(False, "Nothing on stderr but errors.", short="-q")


def _progress() -> Any:
    return option(
        None,
        "Progress bar on stderr",
        flag="--progress/--no-progress",
        shown="when stderr is a terminal",
    )


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that decides what `featx extract` computes (the first group: recorded in the
    file's fingerprint and checked on resume) and how it runs (the second: free to change
    between runs of the same output).

    Example: ``ExtractConfig(model="resnet18", layers=("layer3",), pool="max")``
    """

    # What is computed.
    model: str = option("resnet50", MODEL_HELP)
    weights: str = option(
        "DEFAULT", "DEFAULT, an enum name (IMAGENET1K_V2), none, or a .pth/.safetensors file"
    )
    layers: tuple[str, ...] = option(
        (),
        "Node name to cut at; repeat for several (one forward pass).",
        flag="--layer",
        shown="the classifier's input",
    )
    pool: str = option("avg", " | ".join(POOLS))
    image_size: int | None = option(None, "Crop size override (resize keeps the weights' ratio).")
    precision: str = option("auto", " | ".join(PRECISIONS), auto=defaults.precision_for)
    dtype: str = option("float32", "Storage dtype: " + " | ".join(DTYPES))
    decode: str = option(
        "cpu", "cpu (full decode) | fast (JPEG DCT scaling for big photos) | gpu (nvJPEG)"
    )
    background: tuple[int, int, int] = (255, 255, 255)  # alpha is composited onto this
    max_image_pixels: int | None = option(
        None, "Decompression-bomb limit in pixels", shown="Pillow's"
    )
    max_file_bytes: int | str = option(
        "1GB",  # no real photo comes near; a padded or sparse file does
        "Image files larger than this fail unread, e.g. 200MB",
    )
    augment: int = option(
        0,
        "Also extract K augmented views of each image (random resized crop + flip; "
        "views/<layer> in the file), for heads trained on views",
    )
    augment_seed: int = option(0, "Seed of the views: each depends on (seed, image, view) only")
    labels_csv: str | None = option(
        None, "CSV of path,label: labels for listed files or flat folders.", flag="--labels"
    )
    class_names_file: str | None = option(
        None,
        "Archives: a file of class names, one per line; line i names .cls class i.",
        flag="--class-names",
    )
    label_from: str = option(
        "cls",
        "Archives: labels from .cls members (cls), a field of .json members "
        "(json:FIELD, dots for nested keys) or none",
    )
    # How it runs.
    # The unit of resume: an interrupted run loses at most the shard in flight.
    shard_size: int | None = option(
        None, "Images per shard, the unit of resume", auto=defaults.shard_size_for
    )
    batch_size: int | None = option(None, "Images per forward pass", auto=defaults.batch_size_for)
    workers: int | None = option(None, "DataLoader decode processes", auto=defaults.workers_for)
    device: str = _device()
    compile: bool = option(False, "torch.compile the cut model (fixed batch shape).")
    compression: str = option("none", "none | lzf")  # never gzip: ~21 MB/s caps a whole run
    write_behind: bool = True  # write shards in a writer process, overlapping compute
    max_failures: int | str = option("50%", "Exit 3 when more images fail: a count, P% or none")
    shard: tuple[int, int] | None = option(
        None,
        "K/N: do part K of N (SLURM arrays, CI matrices); `featx merge` joins the parts.",
        parse=parse_shard,
        expects="K/N or a list of two ints",
    )
    overwrite: bool = _overwrite()
    progress: bool | None = _progress()
    quiet: bool = _quiet()

    def __post_init__(self) -> None:
        check_choice("pool", self.pool, POOLS)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("decode", self.decode, DECODES)
        check_choice("compression", self.compression, ("none", "lzf"))
        check_range("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        check_range("shard_size", self.shard_size, 1, MAX_SHARD_SIZE)
        check_range("workers", self.workers, 0, MAX_WORKERS)
        check_range("image_size", self.image_size, 8, MAX_IMAGE_SIZE)
        check_range("augment", self.augment, 0, MAX_AUGMENT)
        check_range("augment_seed", self.augment_seed, 0, (1 << 63) - 1)
        check_range("max_image_pixels", self.max_image_pixels, 1, 1 << 40)
        parse_bytes(self.max_file_bytes, "--max-file-bytes")
        if len(self.background) != 3 or not all(0 <= v <= 255 for v in self.background):
            raise UsageError(
                f"background {list(self.background)}: expected three values from 0 to 255"
            )
        parse_max_failures(self.max_failures)
        check_label_from(self.label_from)
        if self.shard is not None:
            k, n = self.shard
            if not (n >= 1 and 0 <= k < n):
                raise UsageError(f"--shard {k}/{n}: expected K/N with 0 <= K < N")

    def replace(self, **changes: Any) -> ExtractConfig:
        return dataclasses.replace(self, **changes)


# --- train-head / predict / evaluate ----------------------------------------------------------

HEADS = ("linear", "mlp")
OPTIMIZERS = ("auto", "lbfgs", "adamw")
CLASS_WEIGHTS = ("none", "balanced")


@dataclass(frozen=True)
class HeadConfig:
    """Everything that decides what `featx train-head` trains and how.

    ``weight_decay`` is the L2 coefficient on the mean loss for L-BFGS (scikit-learn's
    ``C = 1 / (weight_decay * n_train)``; the default 1 / n_train is its default C=1) and
    AdamW's decoupled decay otherwise; biases are never decayed.
    Example: ``HeadConfig(head="mlp", hidden=256, dropout=0.3)``
    """

    head: str = option("linear", "linear (multinomial logistic) | mlp")
    hidden: int = option(512, "MLP hidden units")
    dropout: float = option(0.2, "MLP dropout")
    layer: str | None = option(None, "Feature layer", shown="the only one")
    val_split: float = option(0.2, "Stratified fraction held out to validate")
    val: str | None = option(
        None, "Validate on this features file (same extraction) instead of a split."
    )
    optimizer: str = option("auto", " | ".join(OPTIMIZERS), auto=defaults.solver_for)
    # lbfgs: one epoch is LBFGS_ITERATIONS iterations; adamw: one pass
    epochs: int = option(100, "At most this many epochs (lbfgs: 20 iterations each)")
    lr: float | None = option(None, "Learning rate", auto=defaults.learning_rate_for)
    weight_decay: float | None = option(
        None,
        "L2 on the weights (lbfgs), decoupled decay (adamw)",
        auto=defaults.weight_decay_for,
    )
    batch_size: int = option(256, "adamw minibatch rows")
    patience: int = option(10, "Stop after this many epochs without a better val loss")
    # balanced: weight n / (classes * n_class), as sklearn
    class_weight: str = option("none", "none | balanced (for skewed classes)")
    seed: int = option(0, "Seeds the split, init and shuffling")
    device: str = _device()
    memory_budget: str = _memory_budget()
    overwrite: bool = _overwrite()

    def __post_init__(self) -> None:
        check_choice("head", self.head, HEADS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("class-weight", self.class_weight, CLASS_WEIGHTS)
        check_range("hidden", self.hidden, 1, 1 << 16)
        check_range("epochs", self.epochs, 1, 1 << 24)
        check_range("batch_size", self.batch_size, 1, 1 << 24)
        check_range("patience", self.patience, 1, 1 << 24)
        if not 0 <= self.dropout < 1:
            raise UsageError("--dropout must be in [0, 1)")
        if not 0 < self.val_split < 1:
            raise UsageError("--val-split must be between 0 and 1 (or validate on --val FILE)")
        if self.lr is not None and not self.lr > 0:
            raise UsageError("--lr must be positive")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise UsageError("--weight-decay must be 0 or more")
        if self.optimizer == "lbfgs" and self.head != "linear":
            raise UsageError("--optimizer lbfgs is for --head linear; --head mlp trains with adamw")
        parse_bytes(self.memory_budget)

    @property
    def solver(self) -> str:
        return self.optimizer if self.optimizer != "auto" else defaults.solver_for(self.head)

    def decay(self, train_rows: int) -> float:
        """The weight decay for ``train_rows`` training rows."""
        if self.weight_decay is not None:
            return self.weight_decay
        return defaults.weight_decay_for(train_rows)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else defaults.learning_rate_for(self.solver)

    def replace(self, **changes: Any) -> HeadConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ProbeConfig:
    """How `featx probe` measures every layer of every file: nested, stratified cross-validation
    of the linear head (train-head's L-BFGS on scikit-learn's objective).

    Each of ``folds`` outer folds is held out in turn; C is chosen from ``c_grid`` by mean
    accuracy over ``inner_folds`` folds of the other rows alone, refitted on all of them with
    that C, then scored on the held-out fold. Standardisation comes from the training rows of
    each fit only.
    Example: ``ProbeConfig(folds=5, max_rows=5000, layers=("layer3", "flatten"))``
    """

    folds: int = option(5, "Stratified cross-validation folds")
    inner_folds: int = option(3, "Folds of the training rows that choose C")
    c_grid: tuple[float, ...] = option(  # scikit-learn's C: 1 / (λ · rows)
        (0.01, 0.1, 1.0, 10.0),
        "A value of C (scikit-learn's inverse L2 strength) to choose from; repeat",
    )
    layers: tuple[str, ...] = option(
        (), "A layer to probe; repeat", flag="--layer", shown="every layer of each file"
    )
    max_rows: int | None = option(
        None, "Probe a stratified, seeded subsample of this many rows", shown="all"
    )
    # 100 iterations at most per fit at the default: scikit-learn's max_iter
    epochs: int = option(5, "At most this many L-BFGS epochs (20 iterations) a fit")
    seed: int = option(0, "Seeds the folds and the subsample")
    protocol: tuple[str, ...] = option(
        PROTOCOLS, "linear and/or knn", parse=listed(str, "--protocol")
    )
    knn_k: int = option(20, "kNN: training rows that vote (DINO's 20)")
    knn_temperature: float = option(0.07, "kNN: a neighbour's vote is exp(similarity / T)")
    per_class: tuple[int, ...] = option(
        (),
        "Learning curve: N[,N...] labelled rows per class, 5 draws each",
        parse=listed(int, "--per-class"),
    )
    device: str = _device()
    # a layer that fits is read once; larger ones stream per fit
    memory_budget: str = _memory_budget()

    def __post_init__(self) -> None:
        if not self.protocol or not set(self.protocol) <= set(PROTOCOLS):
            raise UsageError(f"--protocol {','.join(self.protocol)}: expected linear and/or knn")
        if self.knn_k < 1 or not self.knn_temperature > 0 or min(self.per_class, default=1) < 1:
            raise UsageError("--knn-k and each --per-class N: at least 1; --knn-temperature: > 0")
        if self.folds < 2:
            raise UsageError("--folds must be at least 2")
        if self.inner_folds < 2:
            raise UsageError("--inner-folds must be at least 2")
        if not self.c_grid or not all(c > 0 for c in self.c_grid):
            raise UsageError("--c-grid: expected one or more positive values of C")
        if self.max_rows is not None and self.max_rows < 2:
            raise UsageError("--max-rows must be at least 2")
        if self.epochs < 1:
            raise UsageError("--epochs must be at least 1")
        parse_bytes(self.memory_budget)

    def replace(self, **changes: Any) -> ProbeConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class PredictConfig:
    """How `featx predict` and `featx evaluate` run; what they compute comes from the head.

    Example: ``PredictConfig(top_k=5, device="cpu")``
    """

    top_k: int = option(3, "Best classes listed per row")  # in the CSV, best first
    features_out: str | None = option(
        None, "predict on images: keep their features in this HDF5 file (evaluate reads it)"
    )
    tta: bool = option(
        False,
        "Average the head's probabilities over each image's views (clean + --augment K); "
        "a features file extracted with --augment only",
    )
    errors: str | None = option(None, "evaluate: CSV of the misclassified rows")
    errors_png: str | None = option(
        None, "evaluate: contact sheet of the misclassified images (needs featx[plot])"
    )
    device: str = _device()
    batch_size: int | None = option(None, "Images per forward pass", shown="extract's")
    workers: int | None = option(None, "DataLoader decode processes", shown="extract's")
    memory_budget: str = _memory_budget()
    overwrite: bool = _overwrite()
    progress: bool | None = _progress()
    quiet: bool = _quiet()

    def __post_init__(self) -> None:
        check_range("top_k", self.top_k, 0, 1 << 20)
        check_range("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        check_range("workers", self.workers, 0, MAX_WORKERS)
        parse_bytes(self.memory_budget)
