"""One layer of the probe, fold by fold: its rows within the budget, the nested choice of C (the
grid widened by a decade while the best C sits strictly best at its edge), the linear head and
the kNN vote, each scored on the same held-out rows.

Folds are drawn over images. In a file with augmented views the linear head is also trained on
every view of the training images (C chosen again, on inner folds of images); either way it is
scored on the clean rows of the held-out images alone (:meth:`LayerRows.split_rows`)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from featx.config import HeadConfig, ProbeConfig
from featx.errors import UsageError
from featx.heads.knn import knn_predict
from featx.heads.reports import classification_metrics
from featx.heads.rows import FeatureRows
from featx.heads.train import fit_linear, predicted
from featx.heads.views import image_of, layer_views, row_labels, rows_of
from featx.store.reader import FeatureFile

MAX_WIDENINGS = 3  # decades added beyond an edge of --c-grid, at most, per outer fold
SMALL_FIT = 1 << 22  # rows x dim below which one CPU thread fits faster than several


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


@dataclass(frozen=True)
class FoldScore:
    """One outer fold: each protocol's accuracy on it (None when not run) and the chosen C."""

    accuracy: float | None = None
    balanced_accuracy: float | None = None
    c: float | None = None
    c_at_grid_edge: bool = False
    knn_accuracy: float | None = None
    accuracy_with_views: float | None = None  # the linear head trained on every view too
    c_with_views: float | None = None


class LayerRows:
    """One layer's probed images, addressed by position 0..len(keep)-1, and their rows (clean,
    and augmented views where the file has them, numbered as :mod:`featx.heads.views`): held in
    memory after one read when they fit half the budget, otherwise read from the file by each
    fit. ``keep`` is sorted."""

    def __init__(
        self, data: FeatureFile, layer: str, keep: np.ndarray, labels: np.ndarray, budget: int
    ) -> None:
        dataset = layer_views(data, layer)
        self.k = data.augmented_views
        self.keep = keep
        whole = FeatureRows(dataset, rows_of(keep, len(data), self.k), budget // 2)
        self.dim = whole.dim
        self.budget = budget
        self.read = [whole]  # what has read the file, for ``reads``
        self.in_memory = whole.in_memory
        if whole.in_memory:
            # Loaded in row order: clean rows of ``keep``, then their views, so the array is
            # numbered as a file of len(keep) images.
            self.base: Any = whole.load()  # FeatureRows reads it like a dataset
            if not np.isfinite(self.base).all():
                raise UsageError(
                    f"{data.path}: {layer} features contain NaN or infinity (float16 overflow?); "
                    "re-extract with --dtype float32"
                )
            self.budget -= self.base.nbytes
            self.file_row = np.arange(len(keep))
            self.images = len(keep)
            self.labels = row_labels(labels[keep], self.k)
        else:
            self.base, self.file_row = dataset, keep
            self.images, self.labels = len(data), row_labels(labels, self.k)

    def __len__(self) -> int:
        return len(self.file_row)

    @property
    def reads(self) -> int:
        return sum(rows.reads for rows in self.read)

    def labels_at(self, positions: np.ndarray) -> np.ndarray:
        return self.labels[self.file_row[positions]]

    def split_rows(
        self, train: np.ndarray, test: np.ndarray, views: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """The rows a fit on images ``train`` trains on (with ``views``: every view of them)
        and the rows it is scored on (the clean rows of images ``test``)."""
        images = self.file_row[train]
        trained = rows_of(images, self.images, self.k) if views else images
        return trained, self.file_row[test]

    def images_of(self, rows: np.ndarray) -> np.ndarray:
        """The file row of the image each of ``rows`` belongs to."""
        images = image_of(rows, self.images, self.k)
        return self.keep[images] if self.in_memory else images

    def rows(self, positions: np.ndarray, share: float) -> FeatureRows:
        return self._rows(self.file_row[positions], share)

    def _rows(self, index: np.ndarray, share: float) -> FeatureRows:
        rows = FeatureRows(self.base, index, max(1, int(self.budget * share)))
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
        views: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(true, predicted) labels of ``test``'s clean rows by the head fitted on ``train``'s
        rows (every view of them with ``views``) with C ``c``."""
        trained, scored = self.split_rows(train, test, views)
        share = len(trained) / (len(trained) + len(scored))
        train_rows = self._rows(trained, share)
        head = HeadConfig(weight_decay=1.0 / (c * len(trained)), epochs=config.epochs)
        with _threads_for(len(trained) * train_rows.dim, device):
            module = fit_linear(train_rows, self.labels, classes, head, device)
            return predicted(module, self._rows(scored, 1 - share), self.labels, device)

    def knn(
        self,
        train: np.ndarray,
        test: np.ndarray,
        classes: int,
        config: ProbeConfig,
        device: torch.device,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(true, predicted) labels of ``test`` by the kNN vote of ``train``: a third of the
        budget for each side's blocks, a third for one block of similarities."""
        third = 1 / 3
        return knn_predict(
            self.rows(train, third),
            self.rows(test, third),
            self.labels,
            classes,
            config.knn_k,
            config.knn_temperature,
            device,
            max(1, int(self.budget * third)),
        )


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


def outer_fold(
    source: LayerRows, test: np.ndarray, classes: int, config: ProbeConfig, device: torch.device
) -> FoldScore:
    """Every protocol of ``config.protocol`` trained on the other rows, scored on ``test``."""
    train = np.setdiff1d(np.arange(len(source)), test)
    score = FoldScore()
    if "linear" in config.protocol:
        c, at_edge = choose_c(source, train, classes, config, device)
        truth, guess = source.fit_and_predict(train, test, c, classes, config, device)
        metrics = classification_metrics(truth, guess, [str(i) for i in range(classes)])
        score = FoldScore(metrics["accuracy"], metrics["balanced_accuracy"], c, at_edge)
    if "linear" in config.protocol and source.k:
        c, _ = choose_c(source, train, classes, config, device, views=True)
        truth, guess = source.fit_and_predict(train, test, c, classes, config, device, views=True)
        score = dataclasses.replace(
            score, accuracy_with_views=float((truth == guess).mean()), c_with_views=c
        )
    if "knn" in config.protocol:
        truth, guess = source.knn(train, test, classes, config, device)
        score = dataclasses.replace(score, knn_accuracy=float((truth == guess).mean()))
    return score


def choose_c(
    source: LayerRows,
    train: np.ndarray,
    classes: int,
    config: ProbeConfig,
    device: torch.device,
    views: bool = False,
) -> tuple[float, bool]:
    """The C with the best mean accuracy over inner folds of ``train`` alone (as scikit-learn's
    ``GridSearchCV`` scores it; a tie goes to the smaller C), and whether it sits at or beyond an
    edge of ``config.c_grid``.

    While the best C is at an edge of the grid searched and strictly better than its neighbour,
    the grid grows by one decade beyond that edge (``MAX_WIDENINGS`` times at most). With
    ``views`` every fit trains on every view of its images (inner folds are folds of images).
    """
    if len(set(config.c_grid)) == 1:
        return config.c_grid[0], False
    inner = stratified_folds(source.labels_at(train), config.inner_folds, config.seed)

    def inner_accuracy(c: float) -> float:
        scores = []
        for held in inner:
            fit = np.setdiff1d(train, train[held])
            truth, guess = source.fit_and_predict(
                fit, train[held], c, classes, config, device, views
            )
            scores.append(float((truth == guess).mean()))
        return float(np.mean(scores))

    scores = {c: inner_accuracy(c) for c in sorted(set(config.c_grid))}
    for _ in range(MAX_WIDENINGS):
        wider = _beyond_edge(scores)
        if wider is None:
            break
        scores[wider] = inner_accuracy(wider)
    best = _best_c(scores)
    return best, best <= min(config.c_grid) or best >= max(config.c_grid)


def _best_c(scores: dict[float, float]) -> float:
    return min(scores, key=lambda c: (-scores[c], c))


def _beyond_edge(scores: dict[float, float]) -> float | None:
    """The next decade outside the grid when its best C is strictly best at an edge, else None."""
    grid, best = sorted(scores), _best_c(scores)
    if best == grid[0] and scores[grid[0]] > scores[grid[1]]:
        return grid[0] / 10
    if best == grid[-1]:  # ties go to the smaller C: the largest is best only when strictly so
        return grid[-1] * 10
    return None
