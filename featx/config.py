"""One frozen dataclass per command: the single source of truth for options and their defaults.

The CLI, config files (``--config FILE.toml``) and the library all build these, so a default
lives here once.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import tomllib

from featx.errors import UsageError

POOLS = ("avg", "max", "flatten", "none", "cls")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DTYPES = ("float32", "float16")
DECODES = ("cpu", "gpu")


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
    decode: str = "cpu"
    compile: bool = False
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
    return {key.replace("-", "_"): value for key, value in table.items() if key != "head"}


def config_fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls)}


def build(cls: type, values: dict[str, Any], source: str = "options") -> Any:
    """Make a config dataclass from a dict, refusing unknown keys with their names."""
    known = config_fields(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UsageError(f"{source}: unknown option(s) {', '.join(unknown)}")
    converted = dict(values)
    for key in ("layers",):
        if key in converted and isinstance(converted[key], (list, str)):
            value = converted[key]
            converted[key] = (value,) if isinstance(value, str) else tuple(value)
    if "background" in converted and isinstance(converted["background"], list):
        converted["background"] = tuple(converted["background"])
    if "shard" in converted and isinstance(converted["shard"], str):
        converted["shard"] = parse_shard(converted["shard"])
    return cls(**converted)
