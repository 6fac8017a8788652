"""Join the part files of ``featx extract --shard K/N`` runs into one file (or one virtual view).

A merge refuses to guess: every part 0..N-1 must be there, all made with the same settings and
the same file list, and their row ranges must tile the work list exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from featx.errors import UsageError
from featx.store import schema
from featx.store.durable import atomic_output, check_output, writing_hdf5
from featx.store.features_file import FeaturesWriter
from featx.store.reader import FeatureFile


def merge(
    out: str | Path, parts: list[Path] | None = None, virtual: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Check the parts and write ``out``; ``virtual`` maps features without copying them.

    Example: ``merge("feats.h5")`` after ``featx extract ... --shard K/3`` for K = 0, 1, 2
    """
    out = Path(out)
    check_output(out, overwrite)
    parts = [Path(p) for p in parts] if parts else schema.find_parts(out)
    if not parts:
        raise UsageError(f"no part files like {out.stem}.part-K-of-N{out.suffix} next to {out}")
    ordered, parts_read = _check_parts(parts)
    total_rows = sum(meta.rows for meta in parts_read)
    class_names = merged_classes([meta.attrs.get("class_names") or [] for meta in parts_read])
    attrs = _merged_attrs(ordered, parts_read, class_names, virtual)
    with atomic_output(out, overwrite) as temporary:
        # Copies go through writing_hdf5 (a full disk is one clean error); a virtual view is
        # written directly, so HDF5 knows its real path to resolve the parts against.
        opened = h5py.File(temporary, "w", track_order=True) if virtual else writing_hdf5(temporary)
        with opened as dst:
            writer = FeaturesWriter(dst, attrs)
            for name in schema.row_datasets(attrs):
                _features(writer, name, ordered, parts_read, total_rows, virtual, out.parent)
            writer.finish(*_rows(ordered, parts_read, class_names))
    return {
        "output": str(out),
        "parts": len(ordered),
        "images": total_rows,
        "failed": sum(m.failed for m in parts_read),
        "virtual": virtual,
    }


@dataclass(frozen=True)
class _Part:
    attrs: dict[str, Any]
    rows: int
    failed: int

    @property
    def archives(self) -> bool:
        """Its rows come from archives: it numbered its own classes, and its row range counts
        archives (their rows are counted as they are read)."""
        return schema.shards_are_archives(self.attrs.get("inputs"))


def _check_parts(parts: list[Path]) -> tuple[list[Path], list[_Part]]:
    """The parts in order and what each holds; UsageError unless they are every part of one
    split run, complete, and cover the work list exactly once."""
    ordered = _in_order(parts)
    parts_read: list[_Part] = []
    for path in ordered:
        with FeatureFile(path) as f:
            parts_read.append(_Part(f.attrs, len(f), len(f.failed)))
    first = parts_read[0]
    # Archive parts number their own classes (from the labels they saw): merged below.
    same = [k for k in schema.SAME_IN_EVERY_PART if not (first.archives and k == "class_names")]
    covered = 0
    for path, meta in zip(ordered, parts_read, strict=True):
        different = [k for k in same if meta.attrs.get(k) != first.attrs.get(k)]
        if different:
            raise UsageError(
                f"{path.name} was made with other settings than {ordered[0].name} "
                f"({', '.join(different)} differ): its fingerprint does not match"
            )
        covered = _covered(path, meta, covered)
    if covered != first.attrs.get("files"):
        raise UsageError(f"the parts cover {covered} of {first.attrs.get('files')} files")
    return ordered, parts_read


def _in_order(parts: list[Path]) -> list[Path]:
    """Parts 0..N-1 of one split, by the numbers in their names; UsageError naming any missing."""
    numbered: dict[int, Path] = {}
    counts = set()
    for path in parts:
        number = schema.part_number(path)
        if number is None:
            raise UsageError(f"{path}: not a part file (expected NAME.part-K-of-N.h5)")
        numbered[number[0]] = path
        counts.add(number[1])
    if len(counts) != 1:
        raise UsageError(f"parts of different splits: N = {', '.join(map(str, sorted(counts)))}")
    (count,) = counts
    missing = [k for k in range(count) if k not in numbered]
    if missing:
        raise UsageError(
            f"parts missing: {', '.join(f'{k}/{count}' for k in missing)} "
            f"(run featx extract --shard K/{count} for them)"
        )
    return [numbered[k] for k in range(count)]


def _covered(path: Path, meta: _Part, expected_from: int) -> int:
    """Where the work list's coverage ends with this part, which must be complete and start
    where the parts before it ended."""
    attrs = meta.attrs
    if not attrs.get("complete"):
        raise UsageError(f"{path.name} is not complete")
    start, stop = attrs.get("rows_from"), attrs.get("rows_to")
    counted = meta.archives or meta.rows + meta.failed == (stop or 0) - (start or 0)
    if start != expected_from or stop is None or not counted:
        raise UsageError(
            f"{path.name} covers files {start}..{stop}, expected to start at "
            f"{expected_from} and to account for each of its files once"
        )
    return int(stop)


def _merged_attrs(
    ordered: list[Path], parts_read: list[_Part], class_names: list[str], virtual: bool
) -> dict[str, Any]:
    """The first part's attributes, for the whole work list and the classes of all parts."""
    attrs = {k: v for k, v in parts_read[0].attrs.items() if k not in ("part", "created")}
    attrs.update(
        class_names=class_names,
        complete=True,
        rows_from=0,
        rows_to=parts_read[-1].attrs["rows_to"],
        created=min(m.attrs["created"] for m in parts_read),
    )
    if virtual:
        attrs["virtual_parts"] = [p.name for p in ordered]
    return attrs


def _rows(
    ordered: list[Path], parts_read: list[_Part], class_names: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Paths, labels (in the merged class numbering), failed paths and errors of all parts."""
    names = (schema.PATHS, schema.LABELS, schema.FAILED_PATHS, schema.FAILED_ERRORS)
    pieces: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for path, meta in zip(ordered, parts_read, strict=True):
        with h5py.File(path, "r") as src:
            for name in names:
                pieces[name].append(src[name][()])
        old = meta.attrs.get("class_names") or []
        pieces[schema.LABELS][-1] = _relabel(pieces[schema.LABELS][-1], old, class_names)
    paths, labels, failed_paths, failed_errors = (np.concatenate(pieces[n]) for n in names)
    return paths, labels, failed_paths, failed_errors


def merged_classes(per_part: list[list[str]]) -> list[str]:
    """The classes of all parts: integer classes ("0", "1", …) up to the largest any part saw,
    else the sorted union of names (as each archive part numbered its own)."""
    if all(part == per_part[0] for part in per_part):
        return per_part[0] if per_part else []
    names = {name for part in per_part for name in part}
    if all(part == [str(i) for i in range(len(part))] for part in per_part):
        return [str(i) for i in range(max((len(part) for part in per_part), default=0))]
    return sorted(names, key=schema.class_order)


def _relabel(labels: np.ndarray, old: list[str], new: list[str]) -> np.ndarray:
    """A part's class indices in the merged numbering (-1 stays -1)."""
    if old == new[: len(old)]:
        return labels
    index = {name: i for i, name in enumerate(new)}
    table = np.asarray([index[name] for name in old] + [-1], dtype=np.int64)
    return table[np.where(labels < 0, len(old), labels)]


def _features(
    writer: FeaturesWriter,
    name: str,
    parts: list[Path],
    parts_read: list[_Part],
    total: int,
    virtual: bool,
    folder: Path,
) -> None:
    with h5py.File(parts[0], "r") as f:
        row_shape, dtype = f[name].shape[1:], f[name].dtype
    if virtual:
        layout = h5py.VirtualLayout(shape=(total, *row_shape), dtype=dtype)
        offset = 0
        for path, meta in zip(parts, parts_read, strict=True):
            rows = meta.rows
            if rows:
                # Relative names: the view keeps working when the folder moves as a whole.
                source = h5py.VirtualSource(_relative(path, folder), name, shape=(rows, *row_shape))
                layout[offset : offset + rows] = source
            offset += rows
        writer.view(name, layout)
        return
    writer.features(name, total, row_shape, dtype)
    for path in parts:
        with h5py.File(path, "r") as src:
            writer.copy(name, src[name])


def _relative(path: Path, folder: Path) -> str:
    try:
        return str(path.resolve().relative_to(folder.resolve()))
    except ValueError:
        return str(path.resolve())
