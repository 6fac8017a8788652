"""How many labels do I need: ``featx probe --per-class N[,N...]``, a learning curve.

For each N, ``DRAWS`` seeded draws take exactly N rows of every class (seed ``seed + draw``),
train on them alone and score on every other row. The linear head uses the C the probe chose
for the layer (chosen with all rows: a small optimistic bias, the same for every N); kNN uses
``k = min(--knn-k, rows drawn)``.

Example: ``train, rest = per_class_draw(f.labels, 5, seed=0)``
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from featx.config import ProbeConfig
from featx.errors import UsageError
from featx.heads._probe_folds import LayerRows

DRAWS = 5  # draws per N: their spread is the curve's error bar
VIEWS_PROTOCOL = "linear+views"  # with --augment: the linear head trained on every view


@dataclass(frozen=True)
class CurvePoint:
    """One protocol at N labelled rows per class: the mean and spread over the draws."""

    protocol: str  # linear | knn
    per_class: int
    accuracy: float  # mean over the draws, each scored on the rows not drawn
    accuracy_std: float  # ddof 0
    draw_accuracy: list[float] = field(default_factory=list)


def per_class_draw(labels: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(drawn, rest), sorted positions: exactly ``n`` rows of each class, seeded, and the others.

    Example: ``drawn, rest = per_class_draw(np.array([0, 0, 1, 1]), 1, seed=3)``
    """
    rng = np.random.default_rng(seed)
    drawn = [rng.permutation(np.flatnonzero(labels == c))[:n] for c in np.unique(labels)]
    chosen = np.sort(np.concatenate(drawn))
    return chosen, np.setdiff1d(np.arange(len(labels)), chosen)


def check_per_class(per_class: tuple[int, ...], smallest: int, where: str) -> None:
    """Every N leaves at least one row of the smallest class to score, or a UsageError."""
    if per_class and max(per_class) >= smallest:
        raise UsageError(
            f"{where}: --per-class {max(per_class)} leaves no row of the smallest class "
            f"({smallest} rows) to score; use fewer than {smallest} per class"
        )


def learning_curve(
    source: LayerRows,
    classes: int,
    c: float | None,
    config: ProbeConfig,
    device: torch.device,
    c_views: float | None = None,
) -> list[CurvePoint]:
    """Every (protocol, N) of ``config``: ``DRAWS`` seeded draws of N images per class each;
    on a file with augmented views also :data:`VIEWS_PROTOCOL` (the linear head trained on
    every view of the drawn images with C ``c_views``), scored on the same clean rows."""
    labels = source.labels_at(np.arange(len(source)))
    protocols = list(config.protocol)
    if source.k and c_views is not None and "linear" in protocols:
        protocols.append(VIEWS_PROTOCOL)
    points = []
    for n in config.per_class:
        scores: dict[str, list[float]] = {protocol: [] for protocol in protocols}
        for draw in range(DRAWS):
            train, rest = per_class_draw(labels, n, config.seed + draw)
            for protocol in protocols:
                fit_c = c_views if protocol == VIEWS_PROTOCOL else c
                scores[protocol].append(
                    _draw_accuracy(source, protocol, fit_c, train, rest, classes, config, device)
                )
        points += [
            CurvePoint(protocol, n, float(np.mean(s)), float(np.std(s)), s)
            for protocol, s in scores.items()
        ]
    return points


def _draw_accuracy(
    source: LayerRows,
    protocol: str,
    c: float | None,
    train: np.ndarray,
    rest: np.ndarray,
    classes: int,
    config: ProbeConfig,
    device: torch.device,
) -> float:
    if protocol in ("linear", VIEWS_PROTOCOL) and c is not None:
        views = protocol == VIEWS_PROTOCOL
        truth, guess = source.fit_and_predict(train, rest, c, classes, config, device, views)
    else:
        truth, guess = source.knn(train, rest, classes, config, device)
    return float((truth == guess).mean())


def curve_protocols(points: list[CurvePoint]) -> list[str]:
    """The protocols a learning curve holds, in the order it was made."""
    return list(dict.fromkeys(point.protocol for point in points))
