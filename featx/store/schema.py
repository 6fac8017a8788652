"""The featx HDF5 format, declared once: dataset names, attributes, fingerprint keys, part names.

Everything that reads or writes a features file (shards, assembly, merge, the reader, heads,
predict) takes these names from here, so the layout cannot drift between them.

A features file::

    features/<layer>   [n, ...] float32|float16   one per cut point (each image's clean view)
    views/<layer>      [n, K, ...]                with ``--augment K`` only: K augmented views of
                                                  each image, row i's views of row i's image
    paths              [n] str                    relative to the source folder / --root
    labels             [n] int64                  class index, -1 when unlabelled
    failed/paths       [m] str                    files that could not be decoded ...
    failed/errors      [m] str                    ... and why (``ClassName: message``)
    root attributes    FINGERPRINT_KEYS + class_names, source, versions, created, complete, ...
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2  # 2: `weights` is a provenance dict (source, name, weights, file, sha256)

FEATURES = "features"
VIEWS = "views"  # with --augment K: [n, K, ...] per layer; the root attribute `augment` says how
PATHS = "paths"
LABELS = "labels"
FAILED_PATHS = "failed/paths"
FAILED_ERRORS = "failed/errors"
SHARD_INDEX = "index"  # in shard files: rows of the work list
SHARD_FAILED_INDEX = "failed/index"
# In shard files of archive inputs, which have no work list: every row's name (member) and
# label as JSON text, by row of the shard ("null": unlabelled).
SHARD_NAMES = "names"
SHARD_LABELS = "raw_labels"
SHARD_ARCHIVE = "archive"  # attribute: the archive's URL, size and ETag or mtime

# What a run computes: a resume must match every one of these, and merged parts must agree.
FINGERPRINT_KEYS = (
    "model",
    "weights",
    "layers",
    "pool",
    "transform",
    "dtype",
    "precision",
    "decode",
    "files",
    "files_sha256",
    "shapes",
    "augment",  # only with --augment K > 0: {"views": K, "seed": ..., "policy": ...}
)
# Attributes every part of a split run shares (`source` may differ: nodes mount data apart).
SAME_IN_EVERY_PART = (*FINGERPRINT_KEYS, "class_names", "featx_schema")
# What made one layer's features: a head trained on them must meet exactly these again.
EXTRACTION_KEYS = ("model", "weights", "layer", "pool", "transform")


def row_datasets(attrs: dict[str, Any]) -> list[str]:
    """A features file's (or its fingerprint's) datasets with one row per image, by name:
    ``features/<layer>``, then with ``--augment`` ``views/<layer>``."""
    layers = list(attrs["layers"])
    names = [f"{FEATURES}/{layer}" for layer in layers]
    return names + ([f"{VIEWS}/{layer}" for layer in layers] if attrs.get("augment") else [])


# `inputs` of a folder or path list: rows are the work list's files. Any other value (tar,
# parquet) is an archive source: one shard per archive, rows named and counted as it is read.
FILE_INPUTS = "files"


def shards_are_archives(inputs: str | None) -> bool:
    """Whether a file of these ``inputs`` was made one shard per archive: its ``rows_from`` and
    ``rows_to`` count archives, not rows, and it numbered its classes from the labels it read
    (so parts of one split may differ in ``class_names``). Files without ``inputs`` predate
    archives.

    Example: ``shards_are_archives("tar") is True``
    """
    return inputs is not None and inputs != FILE_INPUTS


_PART = re.compile(r"\.part-(\d+)-of-(\d+)$")


def part_path(out: Path, part: int, parts: int) -> Path:
    """Where ``--shard K/N`` writes its part: ``feats.h5`` → ``feats.part-03-of-16.h5``."""
    width = len(str(parts - 1))
    return out.with_name(f"{out.stem}.part-{part:0{width}d}-of-{parts}{out.suffix}")


def part_number(path: Path) -> tuple[int, int] | None:
    """``(K, N)`` of a part file's name, or None for any other name."""
    match = _PART.search(path.stem)
    return (int(match.group(1)), int(match.group(2))) if match else None


def find_parts(out: Path) -> list[Path]:
    """The part files next to ``out`` (``feats.part-3-of-16.h5`` for ``feats.h5``)."""
    return sorted(out.parent.glob(f"{out.stem}.part-*-of-*{out.suffix}"))


def class_order(name: str) -> tuple[int, int, str]:
    """How an archive's class names are numbered, the same in every process and in a merge:
    numbers in numeric order first (``2`` before ``10``), then other names in sorted order."""
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old → new`` for each value that differs, one line per leaf of nested dicts
    (``transform.crop: 224 → 64``), so a message names what changed and nothing else.

    Example: ``differences({"pool": "avg"}, {"pool": "max"}) == ["pool: 'avg' → 'max'"]``
    """
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += [f"{key}.{change}" for change in differences(a, b)]
        elif a != b:
            changes.append(f"{key}: {_short(a)} → {_short(b)}")
    return changes


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def encode_attr(value: Any) -> Any:
    """A root attribute as h5py stores it: lists and dicts as JSON text, None as ``null``."""
    if isinstance(value, (list, dict, tuple)):
        return json.dumps(value)
    if value is None:
        return "null"
    if isinstance(value, str):
        return str(value)  # str subclasses (torch.__version__) confuse h5py
    return value


def decode_attr(value: Any) -> Any:
    """The inverse of :func:`encode_attr` for a value h5py read back."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and (value[:1] in "[{" or value == "null"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy scalars
        return value.item()
    return value
