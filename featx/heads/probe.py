"""Which layer, which backbone: a linear and a kNN probe of every layer of every features file.

Each (file, layer) gets the standard linear-probe protocol on the user's own labels: stratified,
seeded k-fold cross-validation, and inside each training fold a second, inner cross-validation
that chooses scikit-learn's C from a small grid (widened at an edge: ``_probe_folds``); the head
refitted on the whole training fold with that C is scored on the held-out fold. The head is
train-head's linear head (standardised by the training rows' statistics only, L-BFGS on
``LogisticRegression``'s objective), so a probe's accuracy is what ``featx train-head`` would
reach. Folds are drawn over images: in a file extracted with ``--augment K`` the linear probe runs
twice, trained on the clean rows (``accuracy``) and on every view of the training images
(``accuracy_with_views``, its C chosen again), both scored on the clean rows of the held-out
images. The kNN protocol (``knn.py``) is scored on the same folds, and every row is compared with
the best on those folds (``tied_with_best``). Files must hold the same images.

A layer whose rows fit half the memory budget is read once and every fit of the nested
cross-validation reuses that read; a larger one is streamed from the file, fit by fit, within
the budget as train-head streams it. Files compared on the same images get the same folds.

Example::

    result = probe(["lite0.h5", "lite0-random.h5"], ProbeConfig(max_rows=2000))
    result.best.layer, result.train_head_command
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featx.config import HeadConfig, ProbeConfig, parse_bytes
from featx.errors import FeatxError, UsageError
from featx.heads._probe_folds import FoldScore, LayerRows, outer_fold, stratified_folds
from featx.heads.learning_curve import DRAWS, CurvePoint, check_per_class, learning_curve
from featx.heads.model import require_labels
from featx.heads.rows import stratified_split
from featx.runtime.device import pick_device
from featx.store.reader import FeatureFile


@dataclass(frozen=True)
class LayerProbe:
    """One (file, layer): its fold accuracies and what they average to."""

    file: str
    model: str
    weights: str  # the weights as --weights names them (a file by its name)
    layer: str
    depth: float | None  # position among the model's cut points: 0 the input, 1 the last
    dim: int
    rows: int  # rows probed (after --max-rows)
    # the linear probe (None when --protocol leaves it out)
    accuracy: float | None  # mean over the outer folds
    accuracy_std: float | None  # their standard deviation (ddof 0)
    balanced_accuracy: float | None  # mean over the outer folds
    fit_seconds: float  # the whole nested cross-validation of this layer
    file_reads: int  # HDF5 reads of this layer's rows: 1 when they fit the budget (small files)
    fold_accuracy: list[float] = field(default_factory=list)
    fold_balanced_accuracy: list[float] = field(default_factory=list)
    fold_c: list[float] = field(default_factory=list)  # the C each outer fold's inner CV chose
    c_at_grid_edge: bool = False  # some fold's C at (or, widened, beyond) an edge of --c-grid
    # the kNN protocol on the same folds (None when --protocol leaves it out)
    knn_accuracy: float | None = None
    knn_accuracy_std: float | None = None
    fold_knn_accuracy: list[float] = field(default_factory=list)
    # within one standard error of the paired fold differences to the best row (``tied``)
    tied_with_best: bool = False
    learning_curve: list[CurvePoint] = field(default_factory=list)
    # the linear probe trained on every view (clean + K) of the training images, scored on the
    # same clean rows (None in a file without augmented views)
    views_per_image: int = 1
    accuracy_with_views: float | None = None
    accuracy_with_views_std: float | None = None
    fold_accuracy_with_views: list[float] = field(default_factory=list)
    fold_c_with_views: list[float] = field(default_factory=list)

    @property
    def c(self) -> float | None:
        """The C chosen most often over the folds (the smaller one on a tie)."""
        return _most_chosen(self.fold_c)

    @property
    def score(self) -> float:
        """What rows are ranked by: the linear accuracy, or kNN's when only kNN ran."""
        return _mean_of(self.ranked_folds)

    @property
    def ranked_folds(self) -> list[float]:
        return self.fold_accuracy or self.fold_knn_accuracy


@dataclass(frozen=True)
class ProbeResult:
    """Every probe, best first, and how to train the best one's head."""

    probes: list[LayerProbe]
    config: ProbeConfig
    train_head_command: str | None  # None when the linear probe did not run

    @property
    def best(self) -> LayerProbe:
        return self.probes[0]

    def as_dict(self) -> dict[str, Any]:
        return {
            "protocol": {
                "folds": self.config.folds,
                "inner_folds": self.config.inner_folds,
                "c_grid": list(self.config.c_grid),
                "seed": self.config.seed,
                "max_rows": self.config.max_rows,
                "epochs": self.config.epochs,
                "protocols": list(self.config.protocol),
                "knn_k": self.config.knn_k,
                "knn_temperature": self.config.knn_temperature,
                "per_class": list(self.config.per_class),
                "per_class_draws": DRAWS,
                "ties": "within one standard error of the paired fold differences to the best",
            },
            "probes": [
                asdict(p) | {"c": p.c, "c_with_views": _most_chosen(p.fold_c_with_views)}
                for p in self.probes
            ],
            "best": {"file": self.best.file, "layer": self.best.layer, "c": self.best.c},
            "train_head_command": self.train_head_command,
        }


def probe(
    features: Sequence[str | os.PathLike[str]],
    config: ProbeConfig = ProbeConfig(),
) -> ProbeResult:
    """Probe every layer of every file (or ``config.layers``) by ``config.protocol``; best first.

    Example: ``probe(["feats.h5"], ProbeConfig(folds=5)).best.layer``
    """
    if not features:
        raise UsageError("probe needs at least one features file")
    check_same_images(features)
    budget = parse_bytes(config.memory_budget)
    device = pick_device(config.device)
    probes: list[LayerProbe] = []
    for path in features:
        with FeatureFile(path) as data:
            probes.extend(_probe_file(data, config, budget, device))
    probes.sort(key=lambda p: (-p.score, _std_of(p.ranked_folds), p.file, p.layer))
    best = probes[0].ranked_folds
    probes = [dataclasses.replace(p, tied_with_best=tied(p.ranked_folds, best)) for p in probes]
    command = train_head_command(probes[0]) if "linear" in config.protocol else None
    return ProbeResult(probes, config, command)


def tied(folds: Sequence[float], best: Sequence[float]) -> bool:
    """Whether a row is tied with the best on the same folds: the mean of the paired differences
    (best minus row, fold by fold) is at most one standard error of those differences (their
    sample standard deviation over the square root of the folds).

    Fold scores share most of their training rows, so they are not independent and a t-test's
    p-value would be miscalibrated (Dietterich 1998; Nadeau & Bengio 2003); the one-standard-
    error rule (as in Breiman et al.'s CART and glmnet's lambda.1se) claims no significance, it
    only says the difference is within the folds' own noise. Identical rows are tied.
    Example: ``tied([0.8, 0.7, 0.9], [0.8, 0.7, 0.9])`` is True
    """
    differences = np.asarray(best, dtype=np.float64) - np.asarray(folds, dtype=np.float64)
    if len(differences) < 2:
        return bool(differences.mean() <= 0)
    error = differences.std(ddof=1) / np.sqrt(len(differences))
    return bool(differences.mean() <= error + 1e-12)


def check_same_images(features: Sequence[str | os.PathLike[str]]) -> None:
    """A UsageError unless every file holds the same images (its ``files_sha256``, else its row
    paths): rows are compared fold by fold, and a ranking over different images means nothing.
    """
    first: tuple[str, object] | None = None
    for path in features:
        with FeatureFile(path) as data:
            digest = data.attrs.get("files_sha256")
            identity = (len(data), digest if digest else data.paths)
        if first is None:
            first = (str(path), identity)
        elif identity != first[1]:
            raise UsageError(
                f"{first[0]} and {path} hold different image sets (their files_sha256 or row "
                "paths differ); probe files extracted from the same images together"
            )


def train_head_command(best: LayerProbe) -> str:
    """The ``featx train-head`` command for ``best``'s layer at its C, on all rows of its file.

    train-head's weight decay is on the mean loss, so C becomes ``1 / (C * training rows)`` for
    the rows its default split trains on. train-head trains on every view of a file that has
    them, so there the C chosen with the views is used, over all their rows.
    """
    if best.c is None:
        raise ValueError("train_head_command: the linear probe did not run (--protocol knn)")
    c = _most_chosen(best.fold_c_with_views) or best.c
    with FeatureFile(best.file) as data:
        train, _ = stratified_split(data.labels, HeadConfig.val_split, HeadConfig.seed)
    rows = len(train) * best.views_per_image
    head = Path(best.file).with_suffix("").name + "." + best.layer.replace("/", "_") + ".head"
    words = ["featx", "train-head", best.file, "--layer", best.layer, "-o", head]
    words += ["--weight-decay", f"{1.0 / (c * rows):.6g}"]
    return shlex.join(words)


# --- one file -----------------------------------------------------------------------------------


def _probe_file(
    data: FeatureFile, config: ProbeConfig, budget: int, device: torch.device
) -> list[LayerProbe]:
    labels = data.labels
    keep = _kept_rows(data, labels, config)
    y = labels[keep]
    classes = max(len(data.class_names), int(y.max()) + 1)
    layers = [data.layer(name) for name in config.layers] if config.layers else data.layers
    depths = _depths(data.attrs.get("model"), data.layers)
    weights = _weights_label(data.attrs.get("weights"))
    probes = []
    for layer in sorted(layers, key=lambda name: depths.get(name) or 0.0):
        started = time.perf_counter()
        source = LayerRows(data, layer, keep, labels, budget)
        scores = [
            outer_fold(source, test, classes, config, device)
            for test in stratified_folds(y, config.folds, config.seed)
        ]
        accuracy = [s.accuracy for s in scores if s.accuracy is not None]
        balanced = [s.balanced_accuracy for s in scores if s.balanced_accuracy is not None]
        knn = [s.knn_accuracy for s in scores if s.knn_accuracy is not None]
        fold_c = [s.c for s in scores if s.c is not None]
        row = LayerProbe(
            file=str(data.path),
            model=str(data.attrs.get("model")),
            weights=weights,
            layer=layer,
            depth=depths.get(layer),
            dim=source.dim,
            rows=len(keep),
            accuracy=_mean_of(accuracy) if accuracy else None,
            accuracy_std=_std_of(accuracy) if accuracy else None,
            balanced_accuracy=_mean_of(balanced) if balanced else None,
            fit_seconds=0.0,
            file_reads=0,
            fold_accuracy=accuracy,
            fold_balanced_accuracy=balanced,
            fold_c=fold_c,
            c_at_grid_edge=any(s.c_at_grid_edge for s in scores),
            knn_accuracy=_mean_of(knn) if knn else None,
            knn_accuracy_std=_std_of(knn) if knn else None,
            fold_knn_accuracy=knn,
            **_with_views(scores, 1 + data.augmented_views),
        )
        c_views = _most_chosen(row.fold_c_with_views)
        curve = learning_curve(source, classes, row.c, config, device, c_views)
        seconds = round(time.perf_counter() - started, 3)
        probes.append(
            dataclasses.replace(
                row, learning_curve=curve, fit_seconds=seconds, file_reads=source.reads
            )
        )
    return probes


def _kept_rows(data: FeatureFile, labels: np.ndarray, config: ProbeConfig) -> np.ndarray:
    """The rows probed (all, or ``--max-rows`` of them), or a UsageError when their classes are
    too few or too small for the folds and the learning curve."""
    require_labels(data, labels, "probe")
    keep = np.arange(len(labels))
    if config.max_rows is not None and config.max_rows < len(labels):
        _, keep = stratified_split(labels, config.max_rows / len(labels), config.seed)
    counts = np.bincount(labels[keep])
    present = np.flatnonzero(counts)
    if len(present) < 2:
        raise UsageError(f"{data.path}: a probe needs at least two classes")
    smallest = int(counts[present].min())
    if smallest < config.folds:
        raise UsageError(
            f"{data.path}: the smallest class has {smallest} rows, too few for --folds "
            f"{config.folds}; lower --folds (at least 2) or raise --max-rows"
        )
    check_per_class(config.per_class, smallest, str(data.path))
    return keep


def _most_chosen(chosen: Sequence[float]) -> float | None:
    """The C chosen most often over the folds (the smaller one on a tie)."""
    counts = Counter(chosen)
    return min(counts, key=lambda c: (-counts[c], c)) if counts else None


def _with_views(scores: Sequence[FoldScore], views_per_image: int) -> dict[str, Any]:
    """``LayerProbe``'s fields of the linear probe trained on every view."""
    accuracy = [s.accuracy_with_views for s in scores if s.accuracy_with_views is not None]
    return {
        "views_per_image": views_per_image,
        "accuracy_with_views": _mean_of(accuracy) if accuracy else None,
        "accuracy_with_views_std": _std_of(accuracy) if accuracy else None,
        "fold_accuracy_with_views": accuracy,
        "fold_c_with_views": [s.c_with_views for s in scores if s.c_with_views is not None],
    }


def _mean_of(values: Sequence[float]) -> float:
    return float(np.mean(values))


def _std_of(values: Sequence[float]) -> float:
    return float(np.std(values))


def _depths(model: object, layers: list[str]) -> dict[str, float | None]:
    """Each layer's position among the model's cut points (0 first, 1 last), from its graph
    built on the meta device; None for all when the model cannot be built here."""
    from featx.models import load_backbone

    try:
        points = load_backbone(str(model), "none", shapes_only=True).cut_points()
    except (FeatxError, ImportError, RuntimeError):
        return dict.fromkeys(layers)
    last = max(len(points) - 1, 1)
    return {name: points.index(name) / last if name in points else None for name in layers}


def _weights_label(recorded: object) -> str:
    if not isinstance(recorded, dict):
        return str(recorded)
    if recorded.get("weights") == "file":
        return Path(str(recorded.get("file"))).name
    return str(recorded.get("weights"))
