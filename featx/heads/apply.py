"""Apply a head to a features file, or to an image folder through the extraction it records.

On an image folder, the backbone, weights, layer, pool and transform come from the head
(``models.weights_spec`` turns the recorded provenance back into a ``--weights`` value), the
features go to a hidden file beside the output (``scratch_features``: an interrupted run resumes
there), and the rest is the same as on a features
file. Either way :meth:`featx.heads.model.Head.check` refuses features of another extraction,
and rows are read in blocks within the memory budget.
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featx.config import ExtractConfig, PredictConfig, parse_bytes
from featx.errors import HeadMismatch, UsageError
from featx.heads.mistakes import Mistake, mistakes_of, write_contact_sheet, write_errors_csv
from featx.heads.model import Head, label_map, load_head, require_labels
from featx.heads.reports import classification_metrics, report_paths, write_reports
from featx.heads.rows import FeatureRows
from featx.safe_text import csv_cell, public_url
from featx.store import schema
from featx.store.durable import atomic_output, check_output
from featx.store.reader import FeatureFile


def extraction_config(head: Head, config: PredictConfig = PredictConfig()) -> ExtractConfig:
    """The ``ExtractConfig`` that makes the features ``head`` was trained on.

    The crop size is always passed: the resize keeps the weights' ratio, so at the default crop
    it reproduces the default transform, and ``Head.check`` compares the result anyway.
    Example: ``extract("new/", "f.h5", extraction_config(load_head("cats.head")))``
    """
    from featx.models import weights_spec

    recorded = head.extraction
    transform = recorded.get("transform") or {}
    return ExtractConfig(
        model=str(recorded["model"]),
        weights=weights_spec(recorded["weights"]),
        layers=(head.layer,),
        pool=str(recorded["pool"]),
        image_size=transform.get("crop"),
        batch_size=config.batch_size,
        workers=config.workers,
        device=config.device,
        max_failures="none",  # bad images are reported, never fatal
        progress=config.progress,
    )


@dataclass(frozen=True)
class Features:
    """The features a command reads, and whether this run extracted them: only then is the
    file's list of failed images this run's news."""

    path: Path
    extracted: bool


@contextlib.contextmanager
def features_of(
    source: str | os.PathLike[str], head: Head, config: PredictConfig, out: Path
) -> Iterator[Features]:
    """The features of ``source``: itself, or extracted from images (a folder, archives) into
    :func:`scratch_features` of ``out``, removed once used, or kept as
    ``config.features_out`` when the command succeeds. An interrupted extraction keeps its
    finished shards there, so running the same command again resumes it."""
    from featx.data.archives import is_archive_source
    from featx.pipeline import extract

    path = Path(source)
    archives = is_archive_source(os.fspath(source))  # tars, parquet shards, a URL
    if path.is_file() and not archives:
        if config.features_out:
            raise UsageError(
                f"--features-out keeps the features of images; {source} is a features file already"
            )
        yield Features(path, extracted=False)
        return
    if not path.is_dir() and not archives:
        raise UsageError(f"source {source}: no such file or folder")
    if config.features_out:
        check_output(Path(config.features_out), config.overwrite)
    # overwrite: a leftover file, or an unfinished run of other settings, is replaced; an
    # unfinished run of these settings is resumed.
    settings = extraction_config(head, config).replace(overwrite=True, quiet=config.quiet)
    scratch = scratch_features(out)
    try:
        extract(os.fspath(source), scratch, settings, label=f"features of {path.name or source}")
        with FeatureFile(scratch) as data:
            changes = schema.differences(head.extraction, data.extraction(head.layer))
        if changes:  # e.g. another torchvision version preprocesses differently
            raise HeadMismatch(
                f"{source}: extracting with the settings head {head.path} records did not "
                f"reproduce its features ({'; '.join(changes)})"
            )
        yield Features(scratch, extracted=True)
        if config.features_out:
            with atomic_output(config.features_out, config.overwrite) as temporary:
                shutil.move(scratch, temporary)
    finally:
        scratch.unlink(missing_ok=True)


def scratch_features(out: Path) -> Path:
    """Where predict/evaluate on images keep the features on the way to ``out``: a hidden file
    beside it, the same for the same command, so an interrupted run resumes."""
    return out.with_name(f".{out.name}.features.h5")


def probabilities(
    head: Head, data: FeatureFile, config: PredictConfig
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(rows, probabilities)`` for every row of ``data``, in order, block by block: of each
    image's clean view, or with ``config.tta`` the mean over its views (clean + K augmented).
    """
    layer = head.check(data)
    views = data.views(layer) if config.tta else None
    if config.tta and views is None:
        raise UsageError(_NO_VIEWS.format(data.path))
    per_image = 1 + (views.shape[1] if views is not None else 0)
    rows = FeatureRows(
        data.features(layer), np.arange(len(data)), parse_bytes(config.memory_budget) // per_image
    )
    device = str(_device(config.device))
    for positions, x in rows.blocks():
        probs = head.probabilities(x, device)
        if views is not None:  # unshuffled blocks are contiguous runs of rows
            block = views[int(positions[0]) : int(positions[-1]) + 1]
            each = head.probabilities(block.reshape(len(x) * block.shape[1], -1), device)
            probs = (probs + each.reshape(len(x), block.shape[1], -1).sum(axis=1)) / per_image
        yield positions, probs


_NO_VIEWS = (
    "{}: --tta averages over augmented views and this file has none (extract with --augment K)"
)


def check_tta(source: str | os.PathLike[str], config: PredictConfig) -> int:
    """Views each prediction averages over: 1, or with ``config.tta`` 1 + K of ``source``, a
    features file extracted with ``--augment K`` (anything else is a UsageError, before work).

    Example: ``check_tta("aug.h5", PredictConfig(tta=True))`` is 1 + K
    """
    if not config.tta:
        return 1
    from featx.data.archives import is_archive_source

    if not Path(source).is_file() or is_archive_source(os.fspath(source)):
        raise UsageError(
            f"--tta averages over a features file's augmented views; {source} is images: "
            "extract it with --augment K, then predict on that file"
        )
    with FeatureFile(source) as data:
        if not data.augmented_views:
            raise UsageError(_NO_VIEWS.format(data.path))
        return 1 + data.augmented_views


def _device(spec: str) -> Any:
    from featx.runtime.device import pick_device

    return pick_device(spec)


def _failures(data: FeatureFile, features: Features) -> list[dict[str, str]]:
    """Images this run could not use, as its extraction recorded them (a features file given
    as the source holds old news)."""
    if not features.extracted:
        return []
    return [{"path": path, "error": error} for path, error in data.failed]


def _paths(data: FeatureFile, positions: np.ndarray) -> list[str]:
    # Unshuffled blocks are contiguous runs of rows, so one slice reads their paths.
    return data.paths_between(int(positions[0]), int(positions[-1]) + 1)


# --- predict --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictResult:
    """What ``predict`` wrote; ``featx predict --json`` prints it."""

    output: str
    rows: int
    class_counts: dict[str, int]
    failed: list[dict[str, str]] = field(default_factory=list)  # images that could not be used
    labelled_rows: int = 0  # rows with a true class (the CSV's true_class column)
    accuracy: float | None = None  # of the predicted class on those rows
    views_averaged: int = 1  # views per image the probabilities are the mean of (--tta)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def csv_columns(top_k: int, labelled: bool = True) -> list[str]:
    """``path, predicted_class, probability, top1_class, top1_probability, …``, then
    ``true_class`` when the input is labelled (class folders, ``--labels``, ``.cls``)."""
    columns = ["path", "predicted_class", "probability"]
    for rank in range(1, top_k + 1):
        columns += [f"top{rank}_class", f"top{rank}_probability"]
    return columns + ["true_class"] if labelled else columns


class _PredictionRows:
    """predict's CSV rows, the predicted class counts and, on labelled rows, the accuracy."""

    def __init__(self, data: FeatureFile, names: list[str], top_k: int) -> None:
        self.data, self.names, self.top_k = data, names, top_k
        self.cells = [csv_cell(name) for name in names]  # from anyone's head file
        self.labels = data.labels
        self.labelled = bool((self.labels >= 0).any())
        own = data.class_names or [str(i) for i in range(int(self.labels.max(initial=-1)) + 1)]
        self.truth = [csv_cell(name) for name in own]
        self.counts = np.zeros(len(names), dtype=np.int64)
        self.right = 0

    def of(self, positions: np.ndarray, probs: np.ndarray) -> Iterator[list[str]]:
        best = np.argsort(-probs, axis=1, kind="stable")[:, : max(self.top_k, 1)]
        self.counts += np.bincount(best[:, 0], minlength=len(self.names))
        rows = zip(_paths(self.data, positions), probs, best, positions, strict=True)
        for row_path, p, order, position in rows:
            row = [csv_cell(row_path), self.cells[order[0]], f"{p[order[0]]:.6g}"]
            for index in order[: self.top_k]:
                row += [self.cells[index], f"{p[index]:.6g}"]
            if self.labelled:
                label = int(self.labels[position])
                row.append(self.truth[label] if label >= 0 else "")
                self.right += label >= 0 and self.truth[label] == self.cells[order[0]]
            yield row

    def accuracy(self) -> float | None:
        labelled = int((self.labels >= 0).sum())
        return round(self.right / labelled, 6) if labelled else None


def predict(
    source: str | os.PathLike[str],
    head: str | os.PathLike[str] | Head,
    out: str | os.PathLike[str],
    config: PredictConfig = PredictConfig(),
) -> PredictResult:
    """Predict a class for every image of ``source`` (an image folder or a features file) and
    write a CSV (``csv_columns``); images that cannot be decoded are listed, not fatal.

    Example: ``predict("new_photos/", "cats.head", "predictions.csv")``
    """
    views = check_tta(source, config)
    head = head if isinstance(head, Head) else load_head(head)
    out = Path(out)
    names = head.class_names
    top_k = min(config.top_k, len(names))
    with atomic_output(out, config.overwrite) as temporary:
        with (
            features_of(source, head, config, out) as features,
            FeatureFile(features.path) as data,
            open(temporary, "w", newline="", encoding="utf-8") as handle,
        ):
            failed = _failures(data, features)
            table = _PredictionRows(data, names, top_k)
            writer = csv.writer(handle)
            writer.writerow(csv_columns(top_k, table.labelled))
            for positions, probs in probabilities(head, data, config):
                writer.writerows(table.of(positions, probs))
            rows, labelled = len(data), int((data.labels >= 0).sum())
    counts = {n: int(c) for n, c in zip(names, table.counts, strict=True)}
    return PredictResult(str(out), rows, counts, failed, labelled, table.accuracy(), views)


# --- evaluate -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluateResult:
    """What ``evaluate`` measured and wrote; ``featx evaluate --json`` prints ``metrics``."""

    metrics_file: str
    picture: str
    metrics: dict[str, Any]


def evaluation_path(source: str | os.PathLike[str], head: str | os.PathLike[str]) -> Path:
    """Default metrics file of ``evaluate``: ``test.h5`` + ``cats.head`` →
    ``test.cats.metrics.json`` beside the source (``photos/`` → ``photos.cats.metrics.json``)."""
    data = Path(source)
    base = data.with_suffix("") if data.is_file() else data
    return Path(f"{base}.{Path(head).stem}.metrics.json")


def evaluate(
    source: str | os.PathLike[str],
    head: str | os.PathLike[str] | Head,
    out: str | os.PathLike[str] | None = None,
    config: PredictConfig = PredictConfig(),
) -> EvaluateResult:
    """Predict on a labelled set and measure: the same metrics JSON and confusion PNG as
    ``train_head`` writes (an existing metrics file is refused unless ``config.overwrite``;
    see ``evaluation_path``).

    Example: ``evaluate("test_feats.h5", "cats.head").metrics["accuracy"]``
    """
    views = check_tta(source, config)
    head = head if isinstance(head, Head) else load_head(head)
    metrics_path = Path(out) if out else evaluation_path(source, head.path or "head")
    for path in (metrics_path, config.errors, config.errors_png):
        if path:
            check_output(Path(path), config.overwrite)
    if config.errors_png:
        from featx.plot import pyplot

        pyplot("--errors-png")  # refused now, not after the extraction
    picture_path = report_paths(metrics_path)[1]
    with (
        features_of(source, head, config, metrics_path) as features,
        FeatureFile(features.path) as data,
    ):
        head.check(data)
        require_labels(data, data.labels, "evaluate")
        truth = label_map(data, head.class_names)[data.labels]
        predicted = np.empty(len(data), dtype=np.int64)
        wrong: list[Mistake] = []
        for positions, probs in probabilities(head, data, config):
            predicted[positions] = probs.argmax(axis=1)
            wrong += mistakes_of(_paths(data, positions), truth[positions], probs)
        failed = _failures(data, features)
        root = str(data.attrs.get("source", ""))
    metrics = {
        "head": str(head.path),
        "source": public_url(str(source)),
        "layer": head.layer,
        "failed": failed,
        "views_averaged": views,
        **classification_metrics(truth, predicted, head.class_names),
    }
    title = f"{Path(str(head.path)).name} on {public_url(str(source))}"
    write_reports(metrics, metrics_path, picture_path, title, config.overwrite)
    if config.errors:
        write_errors_csv(config.errors, wrong, head.class_names, config.top_k, config.overwrite)
    if config.errors_png:
        write_contact_sheet(config.errors_png, wrong, head.class_names, root, config.overwrite)
    return EvaluateResult(str(metrics_path), str(picture_path), metrics)
