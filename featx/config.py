"""One frozen dataclass per command: the single source of truth for options and their defaults.

The CLI, config files (``--config FILE.toml``) and the library all build these, so a default
lives here once.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

from featx.data.archives import check_label_from
from featx.errors import UsageError

C = TypeVar("C")

POOLS = ("avg", "max", "flatten", "none", "cls")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DTYPES = ("float32", "float16")
DECODES = ("cpu", "fast", "gpu")
# Upper bounds of the size options: far above any real use, far below what exhausts memory
# (an --image-size of 100000 would allocate 240 GB for one batch).
MAX_IMAGE_SIZE = 4096
MAX_BATCH_SIZE = 1 << 16
MAX_SHARD_SIZE = 1 << 22
MAX_WORKERS = 512
DEFAULT_MAX_FILE_BYTES = "1GB"  # no real photo comes near; a padded or sparse file does


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a SLURM allocation)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


def default_workers() -> int:
    """DataLoader processes on a CPU: leave the cores to the model on small machines, feed it on
    big ones (runtime.device.feed adds the rule for CUDA and for ranks sharing a node)."""
    # On 2 cores decoding is ~1% of ResNet-50's CPU time: one worker is plenty.
    return max(1, min(available_cores() // 2, 8))


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that decides what `featx extract` computes (the first group: recorded in the
    file's fingerprint and checked on resume) and how it runs (the second: free to change
    between runs of the same output).

    Example: ``ExtractConfig(model="resnet18", layers=("layer3",), pool="max")``
    """

    # What is computed.
    model: str = "resnet50"
    weights: str = "DEFAULT"
    layers: tuple[str, ...] = ()  # empty: the node that feeds the classifier
    pool: str = "avg"
    image_size: int | None = None  # crop size override; resize scales with it
    precision: str = "auto"
    dtype: str = "float32"
    decode: str = "cpu"  # cpu | fast (JPEG DCT scaling) | gpu (nvJPEG)
    background: tuple[int, int, int] = (255, 255, 255)  # alpha is composited onto this
    max_image_pixels: int | None = None  # None: Pillow's decompression-bomb limit
    max_file_bytes: int | str = DEFAULT_MAX_FILE_BYTES  # larger image files fail unread
    labels_csv: str | None = None
    label_from: str = "cls"  # archives: cls | json:FIELD | none
    # How it runs.
    # The unit of resume: an interrupted run loses at most the shard in flight, about a minute
    # of ResNet-50 on a slow 2-core CPU (4-9 img/s); a resume keeps the size it started with.
    shard_size: int = 256
    batch_size: int | None = None  # None: 256 on CUDA, 32 elsewhere (runtime.device.feed)
    workers: int | None = None  # None: from the device, cores and ranks (runtime.device.feed)
    device: str = "auto"
    compile: bool = False  # torch.compile with one fixed batch shape
    compression: str = "none"  # none | lzf (never gzip: ~21 MB/s caps a whole run)
    write_behind: bool = True  # write shards on a thread, overlapping compute
    max_failures: int | str = "50%"  # a count, a percentage ("5%") or "none"
    shard: tuple[int, int] | None = None  # (K, N): this process does part K of N
    overwrite: bool = False
    progress: bool | None = None  # None: only when stderr is a terminal
    quiet: bool = False  # no notes on stderr (what is read, resume, interrupt): errors only

    def __post_init__(self) -> None:
        _check_choice("pool", self.pool, POOLS)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("decode", self.decode, DECODES)
        _check_choice("compression", self.compression, ("none", "lzf"))
        check_range("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        check_range("shard_size", self.shard_size, 1, MAX_SHARD_SIZE)
        check_range("workers", self.workers, 0, MAX_WORKERS)
        check_range("image_size", self.image_size, 8, MAX_IMAGE_SIZE)
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

    @property
    def max_file_size(self) -> int:
        """``max_file_bytes`` in bytes."""
        return parse_bytes(self.max_file_bytes, "--max-file-bytes")

    def replace(self, **changes: Any) -> ExtractConfig:
        return dataclasses.replace(self, **changes)


def check_range(name: str, value: int | None, low: int, high: int) -> None:
    """UsageError unless ``value`` (when given) lies in ``[low, high]``."""
    flag = "--" + name.replace("_", "-")
    if value is not None and value < low:
        raise UsageError(f"{flag} must be at least {low}")
    if value is not None and value > high:
        raise UsageError(f"{flag} must be at most {high}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"--{name} {value!r}: expected one of {', '.join(choices)}")


def parse_max_failures(spec: int | str) -> tuple[int | None, float | None]:
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


def too_many_failures(spec: int | str, failed: int, total: int) -> bool:
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
    from featx.inputs import MAX_CONFIG_BYTES, read_input

    text = read_input(path, "--config", MAX_CONFIG_BYTES)
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"--config {path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"--config {path}: not valid TOML ({error})") from None
    table = data.get(section, data)
    if not isinstance(table, dict):
        raise UsageError(f"--config {path}: [{section}] must be a table")
    # Sub-tables are other commands' sections; a plain ``head = "mlp"`` is train-head's option.
    return {key: value for key, value in table.items() if not isinstance(value, dict)}


# Flag names that differ from their field's name (the CLI's --layer fills ``layers``).
ALIASES = {"layer": "layers", "labels": "labels_csv", "compile_model": "compile"}


def settings(
    cls: type[C],
    flags: dict[str, Any],
    config_file: str | os.PathLike[str] | None = None,
    section: str = "",
) -> C:
    """The config dataclass ``cls`` from a TOML file's ``[section]`` and command-line flags.

    Both are matched to fields by name (``batch-size`` and ``batch_size`` alike); flags given
    (not None) override the file; keys that are not fields of ``cls`` are ignored in ``flags``
    (the command's other parameters) and refused in the file. Every value is checked against
    the field's real type hint, then by the dataclass's own validators, so a bad value is one
    line whether it came from a flag or a file.

    Example: ``settings(ExtractConfig, {"batch_size": 8}, "run.toml", "extract")``
    """
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    if config_file is not None:
        source = f"--config {config_file}"
        for key, value in load_toml(config_file, section).items():
            name = key.replace("-", "_")
            name = name if name in names else ALIASES.get(name, name)
            if name not in names:
                raise UsageError(f"{source}: unknown option {key!r}")
            values[name] = _checked(cls, name, value, f"{source}: {key} = {value!r}")
    for key, value in flags.items():
        name = key if key in names else ALIASES.get(key, key)
        if name in names and value is not None:
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            flag = "--" + key.replace("_", "-")
            values[name] = _checked(cls, name, value, f"{flag} {value!r}")
    return cls(**values)


def _checked(cls: type, name: str, value: Any, where: str) -> Any:
    """``value`` made to fit field ``name``'s type hint, or a UsageError that says what fits."""
    hint = typing.get_type_hints(cls)[name]
    converted = _convert(hint, value)
    if converted is _NO_FIT:
        raise UsageError(f"{where}: expected {_describe(hint)}")
    return converted


_NO_FIT = object()


def _convert(hint: Any, value: Any) -> Any:
    """``value`` as an instance of ``hint`` (int, float, bool, str, unions, tuples), or _NO_FIT.

    The only conversions are the lossless ones a user means: an int where a float is wanted, a
    list (TOML has no tuples) where a tuple is, a lone string for a tuple of strings, and
    ``"K/N"`` for a pair of ints (``--shard 3/16``).
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        for option in args:
            converted = _convert(option, value)
            if converted is not _NO_FIT:
                return converted
        return _NO_FIT
    if hint is type(None):
        return None if value is None else _NO_FIT
    if hint is bool:
        return value if isinstance(value, bool) else _NO_FIT
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO_FIT
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return float(value) if ok else _NO_FIT
    if hint is str:
        return value if isinstance(value, str) else _NO_FIT
    if origin is tuple:
        if isinstance(value, str) and args == (int, int) and "/" in value:
            return parse_shard(value)
        if isinstance(value, str) and args == (str, ...):
            return (value,)
        if not isinstance(value, (list, tuple)):
            return _NO_FIT
        kinds = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(kinds) != len(value):
            return _NO_FIT
        items = tuple(_convert(kind, item) for kind, item in zip(kinds, value, strict=True))
        return _NO_FIT if any(item is _NO_FIT for item in items) else items
    return _NO_FIT


_SINGULAR = {int: "an int", float: "a number", bool: "true or false", str: "a string"}
_PLURAL = {int: "ints", float: "numbers", bool: "booleans", str: "strings"}


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_PLURAL[args[0]]}"
        if args == (int, int):
            return "K/N or a list of two ints"
        return f"a list of {len(args)} {_PLURAL[args[0]]}"
    return _SINGULAR.get(hint, str(hint))


# --- train-head / predict / evaluate ----------------------------------------------------------

HEADS = ("linear", "mlp")
OPTIMIZERS = ("auto", "lbfgs", "adamw")
CLASS_WEIGHTS = ("none", "balanced")
_BYTE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(spec: str | int, option: str = "--memory-budget") -> int:
    """'2GB' → 2147483648; '512MB', '64K', '1.5G' or a plain count of bytes (powers of 1024)."""
    text = str(spec).strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (text[:-1], text[-1]) if text[-1:] in _BYTE_UNITS and text[-1:] else (text, "")
    try:
        value = int(float(number) * _BYTE_UNITS[unit])
    except (ValueError, OverflowError):  # 'x', 'inf'
        value = 0
    if value < 1:
        raise UsageError(f"{option} {spec!r}: expected a size such as 512MB or 2GB")
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
class ProbeConfig:
    """How `featx probe` measures every layer of every file: nested, stratified cross-validation
    of the linear head (train-head's L-BFGS on scikit-learn's objective).

    Each of ``folds`` outer folds is held out in turn; C is chosen from ``c_grid`` by mean
    accuracy over ``inner_folds`` folds of the other rows alone, refitted on all of them with
    that C, then scored on the held-out fold. Standardisation comes from the training rows of
    each fit only.
    Example: ``ProbeConfig(folds=5, max_rows=5000, layers=("layer3", "flatten"))``
    """

    folds: int = 5
    inner_folds: int = 3  # folds of the training rows that choose C
    c_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)  # scikit-learn's C: 1 / (λ · rows)
    layers: tuple[str, ...] = ()  # empty: every layer of every file
    max_rows: int | None = None  # a stratified, seeded subsample of each file for a quick look
    epochs: int = 5  # L-BFGS epochs of 20 iterations: 100 at most per fit, scikit-learn's max_iter
    seed: int = 0  # the folds and the subsample
    device: str = "auto"
    memory_budget: str = "2GB"  # a layer that fits is read once; larger ones stream per fit

    def __post_init__(self) -> None:
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

    top_k: int = 3  # classes per row in the CSV, best first
    device: str = "auto"
    batch_size: int | None = None  # images per forward pass; None: ExtractConfig's
    workers: int | None = None  # decode processes; None: ExtractConfig's
    memory_budget: str = "2GB"
    overwrite: bool = False
    progress: bool | None = None
    quiet: bool = False  # no notes on stderr: errors only

    def __post_init__(self) -> None:
        check_range("top_k", self.top_k, 0, 1 << 20)
        check_range("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        check_range("workers", self.workers, 0, MAX_WORKERS)
        parse_bytes(self.memory_budget)
