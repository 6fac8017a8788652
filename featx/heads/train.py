"""Train a head on a features file: the head file, its metrics JSON and its confusion PNG.

Training reads features through :class:`featx.heads.rows.FeatureRows`: whole when they fit the
memory budget, in row blocks otherwise, so a file larger than memory still trains. The linear
head is multinomial logistic regression fitted by full-batch L-BFGS on the same objective as
scikit-learn's ``LogisticRegression``; the MLP head trains with AdamW on shuffled minibatches
(the loop: ``_fit.py``). In a file extracted with ``--augment K`` the split is drawn over images
(:func:`head_split`): a head trains on every view of its training images and validates on the
clean views of the others.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featx import __version__
from featx.config import HeadConfig, parse_bytes
from featx.errors import UsageError
from featx.heads._fit import DeviceRows, class_weights, fit, seeded
from featx.heads.model import (
    FORMAT,
    FORMAT_VERSION,
    Head,
    HeadModule,
    check_same_extraction,
    label_map,
    require_labels,
)
from featx.heads.reports import classification_metrics, report_paths, write_reports
from featx.heads.rows import (
    SCALE_FLOOR,
    SCALE_RULE,
    FeatureRows,
    standardisation,
    stratified_split,
)
from featx.heads.views import layer_views, row_labels, rows_of
from featx.runtime.device import pick_device
from featx.store.durable import check_output
from featx.store.reader import FeatureFile


@dataclass(frozen=True)
class TrainResult:
    """What ``train_head`` wrote and measured; ``featx train-head --json`` prints ``metrics``."""

    output: str
    metrics_file: str
    picture: str
    metrics: dict[str, Any]


def train_head(
    features: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: HeadConfig = HeadConfig(),
) -> TrainResult:
    """Train a head on a features file and write it, its metrics JSON and confusion PNG.

    Example: ``train_head("feats.h5", "cats.head", HeadConfig(class_weight="balanced"))``
    """
    out = Path(out)
    check_output(out, config.overwrite)
    budget = parse_bytes(config.memory_budget)
    device = pick_device(config.device)
    with contextlib.ExitStack() as files:
        data = files.enter_context(FeatureFile(features))
        layer = data.layer(config.layer)
        labels = data.labels
        require_labels(data, labels, "train-head")
        names = data.class_names or [str(i) for i in range(int(labels.max(initial=-1)) + 1)]
        held, held_labels, evaluated_on = _validation(data, layer, names, config, files)
        part = head_split(labels, data.augmented_views, config, len(held) if config.val else None)
        if len(np.unique(labels[part.train_images])) < 2 or not len(part.val_images):
            raise UsageError(
                f"{data.path}: a head needs at least two classes with two or more rows each"
            )
        # The budget is shared: both splits fit whole when, together, they fit it.
        share = budget * len(part.train_rows) // (len(part.train_rows) + len(part.val_images))
        train_rows = FeatureRows(layer_views(data, layer), part.train_rows, share)
        val_rows = FeatureRows(held.features(layer), part.val_images, budget - share)
        mean, std = standardisation(train_rows)
        extraction = data.extraction(layer)
        train_labels = row_labels(labels, data.augmented_views)

        with seeded(config.seed, device):
            module = HeadModule(
                train_rows.dim, len(names), config.head, config.hidden, config.dropout
            )
            module.mean.copy_(torch.from_numpy(mean))
            module.std.copy_(torch.from_numpy(std))
            module.to(device)
            train = DeviceRows(train_rows, train_labels[train_rows.index], module, device)
            val = DeviceRows(val_rows, held_labels[val_rows.index], module, device)
            weights = class_weights(
                train_labels[part.train_rows], len(names), config.class_weight, device
            )
            fitted = fit(module.net, train, val, config, weights)
            y_true, y_pred = val.predictions(module.net)

    sizes = {
        "train_size": len(part.train_images),
        "val_size": len(part.val_images),
        "trained_on_views": part.views,
        **asdict(fitted),
    }
    metrics = {
        "head": str(out),
        "features": str(features),
        "layer": layer,
        "evaluated_on": evaluated_on,
        **sizes,
        **classification_metrics(y_true, y_pred, names),
    }
    training = {
        "features": str(features),
        "config": asdict(config),
        **sizes,
        "accuracy": metrics["accuracy"],
        "device": str(device),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "featx_version": __version__,
        "torch_version": str(torch.__version__),
    }
    header = _header(config, names, train_rows.dim, extraction, training)
    Head(module.cpu().eval(), header, out).save(out, config.overwrite)
    metrics_path, picture_path = report_paths(out)
    write_reports(
        metrics, metrics_path, picture_path, f"{out.name}: {evaluated_on}", overwrite=True
    )
    return TrainResult(str(out), str(metrics_path), str(picture_path), metrics)


@dataclass(frozen=True)
class HeadSplit:
    """What train-head trains and validates on, drawn over images: the training images and
    every row of theirs (clean and augmented views, numbered as :mod:`featx.heads.views`), and
    the held-out images whose clean rows alone it validates on (all of ``--val``'s file)."""

    train_images: np.ndarray
    val_images: np.ndarray
    train_rows: np.ndarray
    views: int  # rows per training image: 1 + K


def head_split(
    labels: np.ndarray, augmented_views: int, config: HeadConfig, val_rows: int | None = None
) -> HeadSplit:
    """train-head's split of a file with these ``labels`` and ``augmented_views`` per image:
    ``config.val_split`` of each class's images held out (seeded), or, given ``val_rows`` (the
    rows of ``--val``'s file), every image trained on.

    Example: ``head_split(f.labels, f.augmented_views, HeadConfig(val_split=0.2)).train_rows``
    """
    if val_rows is None:
        train, val = stratified_split(labels, config.val_split, config.seed)
    else:
        train, val = np.arange(len(labels)), np.arange(val_rows)
    rows = rows_of(train, len(labels), augmented_views)
    return HeadSplit(train, val, rows, 1 + augmented_views)


def _validation(
    data: FeatureFile,
    layer: str,
    names: list[str],
    config: HeadConfig,
    files: contextlib.ExitStack,
) -> tuple[FeatureFile, np.ndarray, str]:
    """The file the validation rows come from, their labels in the head's classes, and what
    the metrics say they are."""
    if not config.val:
        where = f"{config.val_split:.0%} of each class held out (seed {config.seed})"
        if data.augmented_views:
            where += f", clean views only; trained on all {1 + data.augmented_views} of the rest"
        return data, data.labels, where
    held = files.enter_context(FeatureFile(config.val))
    check_same_extraction(
        data.extraction(layer),
        held,
        layer,
        made_for=f"training on {data.path}",
        remedy="--val must come from the same extraction",
    )
    require_labels(held, held.labels, "--val")
    return held, label_map(held, names)[held.labels], str(config.val)


def fit_linear(
    rows: FeatureRows, labels: np.ndarray, classes: int, config: HeadConfig, device: torch.device
) -> HeadModule:
    """A linear head solved on ``rows`` alone: standardised by their own statistics, then
    train-head's L-BFGS on scikit-learn's objective (``C = 1 / (config.decay(n) * n)``) until it
    converges or ``config.epochs`` are spent; no validation rows, no early stopping.

    ``labels`` holds one label per file row of ``rows.dataset``. ``featx probe`` fits this way.
    Example: ``fit_linear(rows, f.labels, 10, HeadConfig(weight_decay=1e-3), torch.device("cpu"))``
    """
    mean, std = standardisation(rows)
    with seeded(config.seed, device):
        module = HeadModule(rows.dim, classes, "linear", 1, 0.0)
        module.mean.copy_(torch.from_numpy(mean))
        module.std.copy_(torch.from_numpy(std))
        module.to(device)
        train = DeviceRows(rows, labels[rows.index], module, device)
        fit(module.net, train, None, config.replace(head="linear"), None)
    return module.eval()


def predicted(
    module: HeadModule, rows: FeatureRows, labels: np.ndarray, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """(true labels, predicted labels) of ``rows`` in file order; ``labels`` as in fit_linear."""
    return DeviceRows(rows, labels[rows.index], module, device).predictions(module.net)


def _header(
    config: HeadConfig,
    names: list[str],
    dim: int,
    extraction: dict[str, Any],
    training: dict[str, Any],
) -> dict[str, Any]:
    """The JSON header of a head file: all ``load_head`` and ``Head.check`` need."""
    mlp = config.head == "mlp"
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "class_names": names,
        "layer": extraction["layer"],
        "dim": dim,
        "head": {
            "kind": config.head,
            "hidden": config.hidden if mlp else None,
            "dropout": config.dropout if mlp else 0.0,
        },
        "standardisation": f"tensors mean and std ({SCALE_RULE}), from the training rows only",
        "scale_floor": SCALE_FLOOR,
        "extraction": extraction,
        "training": training,
    }
