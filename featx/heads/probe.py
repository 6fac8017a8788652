"""Which layer, which backbone: a linear probe of every layer of every features file.

Each (file, layer) gets the standard linear-probe protocol on the user's own labels: stratified,
seeded k-fold cross-validation, and inside each training fold a second, inner cross-validation
that chooses scikit-learn's C from a small grid; the head refitted on the whole training fold
with that C is scored on the held-out fold. The head is train-head's linear head (standardised
by the training rows' statistics only, L-BFGS on ``LogisticRegression``'s objective), so a
probe's accuracy is what ``featx train-head`` would reach.

A layer whose rows fit half the memory budget is read once and every fit of the nested
cross-validation reuses that read; a larger one is streamed from the file, fit by fit, within
the budget as train-head streams it. Files compared on the same images get the same folds.

Example::

    result = probe(["lite0.h5", "lite0-random.h5"], ProbeConfig(max_rows=2000))
    result.best.layer, result.train_head_command
"""

from __future__ import annotations

import contextlib
import os
import shlex
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featx.config import HeadConfig, ProbeConfig, parse_bytes
from featx.errors import FeatxError, UsageError
from featx.heads.model import require_labels
from featx.heads.reports import classification_metrics
from featx.heads.rows import FeatureRows, stratified_split
from featx.heads.train import fit_linear, predicted
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
    accuracy: float  # mean over the outer folds
    accuracy_std: float  # their standard deviation (ddof 0)
    balanced_accuracy: float  # mean over the outer folds
    fit_seconds: float  # the whole nested cross-validation of this layer
    file_reads: int  # HDF5 reads of this layer's rows: 1 when they fit the budget (small files)
    fold_accuracy: list[float] = field(default_factory=list)
    fold_balanced_accuracy: list[float] = field(default_factory=list)
    fold_c: list[float] = field(default_factory=list)  # the C each outer fold's inner CV chose

    @property
    def c(self) -> float:
        """The C chosen most often over the folds (the smaller one on a tie)."""
        counts = Counter(self.fold_c)
        return min(counts, key=lambda c: (-counts[c], c))


@dataclass(frozen=True)
class ProbeResult:
    """Every probe, best first, and how to train the best one's head."""

    probes: list[LayerProbe]
    config: ProbeConfig
    train_head_command: str

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
            },
            "probes": [asdict(p) | {"c": p.c} for p in self.probes],
            "best": {"file": self.best.file, "layer": self.best.layer, "c": self.best.c},
            "train_head_command": self.train_head_command,
        }


def probe(
    features: Sequence[str | os.PathLike[str]],
    config: ProbeConfig = ProbeConfig(),
) -> ProbeResult:
    """Linear-probe every layer of every file (or ``config.layers``); best first.

    Example: ``probe(["feats.h5"], ProbeConfig(folds=5)).best.layer``
    """
    if not features:
        raise UsageError("probe needs at least one features file")
    budget = parse_bytes(config.memory_budget)
    device = pick_device(config.device)
    probes: list[LayerProbe] = []
    for path in features:
        with FeatureFile(path) as data:
            probes.extend(_probe_file(data, config, budget, device))
    probes.sort(key=lambda p: (-p.accuracy, p.accuracy_std, p.file, p.layer))
    return ProbeResult(probes, config, train_head_command(probes[0]))


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """The held-out rows of each of ``folds`` folds (sorted): every class dealt round the folds
    in a seeded random order, so each fold holds its share of every class.

    Example: ``for test in stratified_folds(f.labels, 5, seed=0): train = np.setdiff1d(...)``
    """
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(labels), dtype=np.int64)
    dealt = 0  # carried over classes, so that fold sizes differ by one row at most
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        fold_of[rows] = (np.arange(len(rows)) + dealt) % folds
        dealt += len(rows)
    return [np.flatnonzero(fold_of == k) for k in range(folds)]


def train_head_command(best: LayerProbe) -> str:
    """The ``featx train-head`` command for ``best``'s layer at its C, on all rows of its file.

    train-head's weight decay is on the mean loss, so C becomes ``1 / (C * training rows)`` for
    the rows its default split trains on.
    """
    with FeatureFile(best.file) as data:
        train, _ = stratified_split(data.labels, HeadConfig.val_split, HeadConfig.seed)
    head = Path(best.file).with_suffix("").name + "." + best.layer.replace("/", "_") + ".head"
    words = ["featx", "train-head", best.file, "--layer", best.layer, "-o", head]
    words += ["--weight-decay", f"{1.0 / (best.c * len(train)):.6g}"]
    return shlex.join(words)


def probe_table(result: ProbeResult) -> str:
    """The plain-text table, best first: one line per (file, layer)."""
    names = [f"{Path(p.file).name} ({p.model}, {p.weights})" for p in result.probes]
    width = max(len("file (model, weights)"), *(len(n) for n in names))
    layer_width = max(len("layer"), *(len(p.layer) for p in result.probes))
    lines = [
        f"{'file (model, weights)':<{width}}  {'layer':<{layer_width}}     dim  "
        "accuracy (mean ± std)  balanced acc       C  fit s"
    ]
    for name, p in zip(names, result.probes, strict=True):
        lines.append(
            f"{name:<{width}}  {p.layer:<{layer_width}}  {p.dim:6d}  "
            f"{p.accuracy:8.3f} ± {p.accuracy_std:.3f}        {p.balanced_accuracy:12.3f}  "
            f"{p.c:6g}  {p.fit_seconds:5.1f}"
        )
    config = result.config
    lines.append(
        f"{config.folds}-fold stratified cross-validation (seed {config.seed}); C from "
        f"{', '.join(f'{c:g}' for c in config.c_grid)} by {config.inner_folds}-fold "
        "cross-validation inside each training fold"
    )
    return "\n".join(lines)


# --- one file -----------------------------------------------------------------------------------


def _probe_file(
    data: FeatureFile, config: ProbeConfig, budget: int, device: torch.device
) -> list[LayerProbe]:
    labels = data.labels
    require_labels(data, labels, "probe")
    layers = [data.layer(name) for name in config.layers] if config.layers else data.layers
    keep = np.arange(len(labels))
    if config.max_rows is not None and config.max_rows < len(labels):
        _, keep = stratified_split(labels, config.max_rows / len(labels), config.seed)
    y = labels[keep]
    counts = np.bincount(y)
    present = np.flatnonzero(counts)
    if len(present) < 2:
        raise UsageError(f"{data.path}: a probe needs at least two classes")
    smallest = int(counts[present].min())
    if smallest < config.folds:
        raise UsageError(
            f"{data.path}: the smallest class has {smallest} rows, too few for --folds "
            f"{config.folds}; lower --folds (at least 2) or raise --max-rows"
        )
    classes = max(len(data.class_names), int(y.max()) + 1)
    depths = _depths(data.attrs.get("model"), data.layers)
    weights = _weights_label(data.attrs.get("weights"))
    probes = []
    for layer in sorted(layers, key=lambda name: depths.get(name) or 0.0):
        started = time.perf_counter()
        source = _Layer(data, layer, keep, labels, budget)
        scores = [
            _outer_fold(source, test, classes, config, device)
            for test in stratified_folds(y, config.folds, config.seed)
        ]
        accuracy = [s[0] for s in scores]
        balanced = [s[1] for s in scores]
        probes.append(
            LayerProbe(
                file=str(data.path),
                model=str(data.attrs.get("model")),
                weights=weights,
                layer=layer,
                depth=depths.get(layer),
                dim=source.dim,
                rows=len(keep),
                accuracy=float(np.mean(accuracy)),
                accuracy_std=float(np.std(accuracy)),
                balanced_accuracy=float(np.mean(balanced)),
                fit_seconds=round(time.perf_counter() - started, 3),
                file_reads=source.reads,
                fold_accuracy=accuracy,
                fold_balanced_accuracy=balanced,
                fold_c=[s[2] for s in scores],
            )
        )
    return probes


class _Layer:
    """One layer's probed rows, addressed by position 0..len(keep)-1: held in memory after one
    read when they fit half the budget, otherwise read from the file by each fit."""

    def __init__(
        self, data: FeatureFile, layer: str, keep: np.ndarray, labels: np.ndarray, budget: int
    ) -> None:
        dataset = data.features(layer)
        whole = FeatureRows(dataset, keep, budget // 2)
        self.dim = whole.dim
        self.budget = budget
        self.read = [whole]  # what has read the file, for ``reads``
        self.in_memory = whole.in_memory
        if whole.in_memory:
            self.base: Any = whole.load()  # FeatureRows reads it like a dataset
            if not np.isfinite(self.base).all():
                raise UsageError(
                    f"{data.path}: {layer} features contain NaN or infinity (float16 overflow?); "
                    "re-extract with --dtype float32"
                )
            self.budget -= self.base.nbytes
            self.file_row = np.arange(len(keep))
            self.labels = labels[keep]
        else:
            self.base, self.file_row, self.labels = dataset, keep, labels

    @property
    def reads(self) -> int:
        return sum(rows.reads for rows in self.read)

    def labels_at(self, positions: np.ndarray) -> np.ndarray:
        return self.labels[self.file_row[positions]]

    def rows(self, positions: np.ndarray, share: float) -> FeatureRows:
        rows = FeatureRows(self.base, self.file_row[positions], max(1, int(self.budget * share)))
        if not self.in_memory:
            self.read.append(rows)  # streamed: every fit reads the file again
        return rows

    def fit_and_predict(
        self,
        train: np.ndarray,
        test: np.ndarray,
        c: float,
        classes: int,
        config: ProbeConfig,
        device: torch.device,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(true, predicted) labels of ``test`` by the head fitted on ``train`` with C ``c``."""
        share = len(train) / (len(train) + len(test))
        train_rows = self.rows(train, share)
        head = HeadConfig(weight_decay=1.0 / (c * len(train)), epochs=config.epochs)
        with _threads_for(len(train) * train_rows.dim, device):
            module = fit_linear(train_rows, self.labels, classes, head, device)
            return predicted(module, self.rows(test, 1 - share), self.labels, device)


SMALL_FIT = 1 << 22  # rows x dim below which one CPU thread fits faster than several


@contextlib.contextmanager
def _threads_for(size: int, device: torch.device) -> Iterator[None]:
    """One torch thread for a small CPU fit: the many tiny L-BFGS steps of a probe of a few
    thousand rows spend more time waking threads than computing (3-10x slower measured here)."""
    if device.type != "cpu" or size >= SMALL_FIT:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _outer_fold(
    source: _Layer, test: np.ndarray, classes: int, config: ProbeConfig, device: torch.device
) -> tuple[float, float, float]:
    """(accuracy, balanced accuracy, chosen C) on one held-out fold."""
    train = np.setdiff1d(np.arange(len(source.file_row)), test)
    c = _choose_c(source, train, classes, config, device)
    truth, guess = source.fit_and_predict(train, test, c, classes, config, device)
    metrics = classification_metrics(truth, guess, [str(i) for i in range(classes)])
    return metrics["accuracy"], metrics["balanced_accuracy"], c


def _choose_c(
    source: _Layer, train: np.ndarray, classes: int, config: ProbeConfig, device: torch.device
) -> float:
    """The C of the grid with the best mean accuracy over inner folds of ``train`` alone (as
    scikit-learn's ``GridSearchCV`` scores it); a tie goes to the smaller C."""
    if len(config.c_grid) == 1:
        return config.c_grid[0]
    inner = stratified_folds(source.labels_at(train), config.inner_folds, config.seed)
    best_c, best = config.c_grid[0], -1.0
    for c in sorted(config.c_grid):
        scores = []
        for held in inner:
            fit = np.setdiff1d(train, train[held])
            truth, guess = source.fit_and_predict(fit, train[held], c, classes, config, device)
            scores.append(float((truth == guess).mean()))
        if np.mean(scores) > best:
            best_c, best = c, float(np.mean(scores))
    return best_c


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
