"""One frozen dataclass per command: the single source of truth for options and their defaults.

The CLI, config files (``--config FILE.toml``) and the library all build these, so a default
lives here once.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from typing import Any

from featx.errors import UsageError

POOLS = ("avg", "max", "flatten", "none", "cls")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DTYPES = ("float32", "float16")
DECODES = ("cpu", "fast", "gpu")


def default_workers() -> int:
    """DataLoader processes: leave the cores to the model on small machines, feed it on big ones."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    # On 2 cores decoding is ~1% of ResNet-50's CPU time: one worker is plenty.
    return max(1, min(cores // 2, 8))


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that decides what `featx extract` computes and how.

    Example: ``ExtractConfig(model="resnet18", layers=("layer3",), pool="max")``
    """

    model: str = "resnet50"
    weights: str = "DEFAULT"
    layers: tuple[str, ...] = ()  # empty: the node that feeds the classifier
    pool: str = "avg"
    image_size: int | None = None  # crop size override; resize scales with it
    batch_size: int = 32
    workers: int | None = None  # None: default_workers()
    device: str = "auto"
    precision: str = "auto"
    dtype: str = "float32"
    shard_size: int = 1024
    decode: str = "cpu"  # cpu | fast (JPEG DCT scaling) | gpu (nvJPEG)
    compile: bool = False  # torch.compile with one fixed batch shape
    compression: str = "none"  # none | lzf (never gzip: ~21 MB/s caps a whole run)
    write_behind: bool = True  # write shards on a thread, overlapping compute
    background: tuple[int, int, int] = (255, 255, 255)  # alpha is composited onto this
    max_image_pixels: int | None = None  # None: Pillow's default decompression-bomb limit
    max_failures: str = "50%"
    labels_csv: str | None = None
    shard: tuple[int, int] | None = None  # (K, N): this process does part K of N
    overwrite: bool = False
    progress: bool | None = None  # None: only when stderr is a terminal

    def __post_init__(self) -> None:
        _check_choice("pool", self.pool, POOLS)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("decode", self.decode, DECODES)
        _check_choice("compression", self.compression, ("none", "lzf"))
        for name in ("batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.workers is not None and self.workers < 0:
            raise UsageError("--workers must be 0 or more")
        if self.image_size is not None and self.image_size < 8:
            raise UsageError("--image-size must be at least 8")
        parse_max_failures(self.max_failures)
        if self.shard is not None:
            k, n = self.shard
            if not (n >= 1 and 0 <= k < n):
                raise UsageError(f"--shard {k}/{n}: expected K/N with 0 <= K < N")

    @property
    def num_workers(self) -> int:
        return default_workers() if self.workers is None else self.workers

    def replace(self, **changes: Any) -> ExtractConfig:
        return dataclasses.replace(self, **changes)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"--{name} {value!r}: expected one of {', '.join(choices)}")


def parse_max_failures(spec: str) -> tuple[int | None, float | None]:
    """'10' → (10, None); '5%' → (None, 0.05); 'none' → no limit."""
    text = str(spec).strip()
    if text.lower() in ("none", "inf", ""):
        return None, None
    try:
        if text.endswith("%"):
            fraction = float(text[:-1]) / 100
            if not 0 <= fraction <= 1:
                raise ValueError
            return None, fraction
        count = int(text)
        if count < 0:
            raise ValueError
        return count, None
    except ValueError:
        raise UsageError(
            f"--max-failures {spec!r}: expected a count (10), a percentage (5%) or 'none'"
        ) from None


def too_many_failures(spec: str, failed: int, total: int) -> bool:
    count, fraction = parse_max_failures(spec)
    if count is not None:
        return failed > count
    if fraction is not None:
        return total > 0 and failed / total > fraction
    return False


def parse_shard(text: str) -> tuple[int, int]:
    """'3/16' → (3, 16)."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: expected K/N, e.g. 3/16") from None
    if not (n >= 1 and 0 <= k < n):
        raise UsageError(f"--shard {text!r}: expected K/N with 0 <= K < N")
    return k, n


def load_toml(path: str | os.PathLike[str], section: str) -> dict[str, Any]:
    """Options for one command from a TOML file: its ``[section]`` table, or the top level."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"--config {path}: not valid TOML ({error})") from None
    table = data.get(section, data)
    if not isinstance(table, dict):
        raise UsageError(f"--config {path}: [{section}] must be a table")
    # Sub-tables are other commands' sections; a plain ``head = "mlp"`` is train-head's option.
    return {
        key.replace("-", "_"): value for key, value in table.items() if not isinstance(value, dict)
    }


def config_fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls)}


def build(cls: type, values: dict[str, Any], source: str = "options") -> Any:
    """Make a config dataclass from a dict, refusing unknown keys with their names."""
    known = config_fields(cls)
    aliases = ({"layer"} if "layers" in known else set()) | (
        {"labels"} if "labels_csv" in known else set()
    )
    unknown = sorted(set(values) - set(known) - aliases)
    if unknown:
        raise UsageError(f"{source}: unknown option(s) {', '.join(unknown)}")
    converted = dict(values)
    if "layer" in converted and "layer" not in known:  # the CLI flag's name works too
        converted["layers"] = converted.pop("layer")
    if "labels" in converted and "labels_csv" in known:
        converted["labels_csv"] = converted.pop("labels")
    for key in ("layers",):
        if key in converted and isinstance(converted[key], (list, str)):
            value = converted[key]
            converted[key] = (value,) if isinstance(value, str) else tuple(value)
    if "background" in converted and isinstance(converted["background"], list):
        converted["background"] = tuple(converted["background"])
    if "shard" in converted and isinstance(converted["shard"], str):
        converted["shard"] = parse_shard(converted["shard"])
    _check_types(cls, converted, source)
    return cls(**converted)


_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "str", tuple: "tuple"}


def _check_types(cls: type, values: dict[str, Any], source: str) -> None:
    """A config file's ``batch-size = "32"`` is named, not left to fail somewhere later."""
    for field in dataclasses.fields(cls):
        if field.name not in values or values[field.name] is None:
            continue
        value = values[field.name]
        kind = type(value)
        wanted = str(field.type)  # annotations are strings here (from __future__ import)
        fits = _TYPE_NAMES.get(kind, "") in wanted or (kind is int and "float" in wanted)
        if kind is list:
            fits = "tuple" in wanted
        if not fits:
            raise UsageError(
                f"{source}: {field.name.replace('_', '-')} = {value!r}: expected "
                f"{wanted.replace(' | None', '')}"
            )


# --- train-head / predict / evaluate ----------------------------------------------------------

HEADS = ("linear", "mlp")
OPTIMIZERS = ("auto", "lbfgs", "adamw")
CLASS_WEIGHTS = ("none", "balanced")
_BYTE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(spec: str | int) -> int:
    """'2GB' → 2147483648; '512MB', '64K', '1.5G' or a plain count of bytes (powers of 1024)."""
    text = str(spec).strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (text[:-1], text[-1]) if text[-1:] in _BYTE_UNITS and text[-1:] else (text, "")
    try:
        value = int(float(number) * _BYTE_UNITS[unit])
    except (ValueError, OverflowError):  # 'x', 'inf'
        value = 0
    if value < 1:
        raise UsageError(f"--memory-budget {spec!r}: expected a size such as 512MB or 2GB")
    return value


@dataclass(frozen=True)
class HeadConfig:
    """Everything that decides what `featx train-head` trains and how.

    ``weight_decay`` is the L2 coefficient on the mean loss for L-BFGS (scikit-learn's
    ``C = 1 / (weight_decay * n_train)``; the default 1 / n_train is its default C=1) and
    AdamW's decoupled decay otherwise; biases are never decayed.
    Example: ``HeadConfig(head="mlp", hidden=256, dropout=0.3)``
    """

    head: str = "linear"  # linear: multinomial logistic regression; mlp: one hidden layer
    hidden: int = 512  # mlp only
    dropout: float = 0.2  # mlp only
    layer: str | None = None  # None: the file's only feature layer
    val_split: float = 0.2  # stratified fraction of each class held out, unless `val` is given
    val: str | None = None  # a features file of the same extraction to validate on instead
    optimizer: str = "auto"  # auto: lbfgs for linear (full batch, like sklearn), adamw for mlp
    epochs: int = 100  # lbfgs: one epoch is LBFGS_ITERATIONS iterations; adamw: one pass
    lr: float | None = None  # None: 1.0 for lbfgs (line search picks the step), 1e-3 for adamw
    weight_decay: float | None = None  # None: 1 / training rows (scikit-learn's C=1)
    batch_size: int = 256  # adamw minibatch
    patience: int = 10  # epochs without a better validation loss before stopping
    class_weight: str = "none"  # balanced: weight n / (classes * n_class), as sklearn
    seed: int = 0
    device: str = "auto"
    memory_budget: str = "2GB"  # features that fit are loaded whole; larger files stream in blocks
    overwrite: bool = False

    def __post_init__(self) -> None:
        _check_choice("head", self.head, HEADS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("class-weight", self.class_weight, CLASS_WEIGHTS)
        for name in ("hidden", "epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
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
        if self.optimizer != "auto":
            return self.optimizer
        return "lbfgs" if self.head == "linear" else "adamw"

    def decay(self, train_rows: int) -> float:
        """The weight decay for ``train_rows`` training rows."""
        return self.weight_decay if self.weight_decay is not None else 1.0 / max(train_rows, 1)

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1.0 if self.solver == "lbfgs" else 1e-3

    def replace(self, **changes: Any) -> HeadConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class PredictConfig:
    """How `featx predict` and `featx evaluate` run; what they compute comes from the head.

    Example: ``PredictConfig(top_k=5, device="cpu")``
    """

    top_k: int = 3  # classes per row in the CSV, best first
    device: str = "auto"
    batch_size: int | None = None  # images per forward pass; None: ExtractConfig's
    workers: int | None = None  # decode processes; None: ExtractConfig's
    memory_budget: str = "2GB"
    overwrite: bool = False
    progress: bool | None = None

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise UsageError("--top-k must be 0 or more")
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if self.workers is not None and self.workers < 0:
            raise UsageError("--workers must be 0 or more")
        parse_bytes(self.memory_budget)
