"""Train a head on a features file: the head file, its metrics JSON and its confusion PNG.

Training reads features through :class:`featx.heads.rows.FeatureRows`: whole when they fit the
memory budget, in row blocks otherwise, so a file larger than memory still trains. The linear
head is multinomial logistic regression fitted by full-batch L-BFGS on the same objective as
scikit-learn's ``LogisticRegression``; the MLP head trains with AdamW on shuffled minibatches.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from featx import __version__
from featx.config import HeadConfig, parse_bytes
from featx.errors import FeatxError, UsageError
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
from featx.runtime.device import pick_device
from featx.store.durable import check_output
from featx.store.reader import FeatureFile

LBFGS_ITERATIONS = 20  # L-BFGS iterations per epoch, i.e. between two validation checks
FULL_BATCH_ROWS = 65536  # the full-batch loss is summed in chunks of this many rows


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
        if config.val:
            held = files.enter_context(FeatureFile(config.val))
            check_same_extraction(
                data.extraction(layer),
                held,
                layer,
                made_for=f"training on {data.path}",
                remedy="--val must come from the same extraction",
            )
            require_labels(held, held.labels, "--val")
            held_labels = label_map(held, names)[held.labels]
            train_index, val_index = np.arange(len(data)), np.arange(len(held))
            evaluated_on = str(config.val)
        else:
            held, held_labels = data, labels
            train_index, val_index = stratified_split(labels, config.val_split, config.seed)
            evaluated_on = f"{config.val_split:.0%} of each class held out (seed {config.seed})"
        if len(np.unique(labels[train_index])) < 2 or not len(val_index):
            raise UsageError(
                f"{data.path}: a head needs at least two classes with two or more rows each"
            )
        # The budget is shared: both splits fit whole when, together, they fit it.
        share = budget * len(train_index) // (len(train_index) + len(val_index))
        train_rows = FeatureRows(data.features(layer), train_index, share)
        val_rows = FeatureRows(held.features(layer), val_index, budget - share)
        mean, std = standardisation(train_rows)
        extraction = data.extraction(layer)

        with _seeded(config.seed, device):
            module = HeadModule(
                train_rows.dim, len(names), config.head, config.hidden, config.dropout
            )
            module.mean.copy_(torch.from_numpy(mean))
            module.std.copy_(torch.from_numpy(std))
            module.to(device)
            train = _DeviceRows(train_rows, labels[train_rows.index], module, device)
            val = _DeviceRows(val_rows, held_labels[val_rows.index], module, device)
            weights = _class_weights(labels[train_index], len(names), config.class_weight, device)
            fit = _fit(module.net, train, val, config, weights)
            y_true, y_pred = val.predictions(module.net)

    sizes = {"train_size": len(train_index), "val_size": len(val_index), **asdict(fit)}
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
    with _seeded(config.seed, device):
        module = HeadModule(rows.dim, classes, "linear", 1, 0.0)
        module.mean.copy_(torch.from_numpy(mean))
        module.std.copy_(torch.from_numpy(std))
        module.to(device)
        train = _DeviceRows(rows, labels[rows.index], module, device)
        _fit(module.net, train, None, config.replace(head="linear"), None)
    return module.eval()


def predicted(
    module: HeadModule, rows: FeatureRows, labels: np.ndarray, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """(true labels, predicted labels) of ``rows`` in file order; ``labels`` as in fit_linear."""
    return _DeviceRows(rows, labels[rows.index], module, device).predictions(module.net)


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


@dataclass(frozen=True)
class _Fit:
    epochs_run: int
    best_epoch: int
    val_loss: float
    stopped: str  # converged | patience | epochs


def _fit(
    net: nn.Module,
    train: _DeviceRows,
    val: _DeviceRows | None,
    config: HeadConfig,
    weights: torch.Tensor | None,
) -> _Fit:
    """The training loop: one epoch, one validation loss, keep the best; stop early.

    Without ``val`` (``featx probe``, which measures on held-out folds itself) it solves the
    objective: it runs until L-BFGS converges or ``config.epochs`` are spent, and keeps the end.
    """
    run_epoch = _epoch_runner(net, train, config, weights)
    best, best_epoch, best_state, waited, stopped = math.inf, 0, None, 0, "epochs"
    epoch = 0
    for epoch in range(1, config.epochs + 1):
        net.train()
        converged = run_epoch()
        net.eval()
        val_loss = val.mean_loss(net, weights) if val is not None else -float(epoch)
        if val_loss < best:
            best, best_epoch, waited = val_loss, epoch, 0
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        else:
            waited += 1
        if converged:
            stopped = "converged"
            break
        if waited >= config.patience:
            stopped = "patience"
            break
    if best_state is None:
        raise FeatxError("training diverged (the validation loss is not a number); lower --lr")
    net.load_state_dict(best_state)
    return _Fit(epoch, best_epoch, round(best, 6) if val is not None else math.nan, stopped)


def _epoch_runner(
    net: nn.Module, train: _DeviceRows, config: HeadConfig, weights: torch.Tensor | None
) -> Callable[[], bool]:
    """One epoch of ``config.solver`` over ``train`` at each call; True once it has converged."""
    decayed = [p for p in net.parameters() if p.ndim > 1]  # weights; biases are not decayed
    decay = config.decay(len(train))
    if config.solver == "lbfgs":
        return _lbfgs_epochs(net, train, weights, decayed, decay, config.learning_rate)
    biases = [p for p in net.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [
            {"params": decayed, "weight_decay": decay},
            {"params": biases, "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
    )
    rng = np.random.default_rng(config.seed)

    def epoch() -> bool:
        for x, y in train.batches(config.batch_size, rng):
            optimizer.zero_grad(set_to_none=True)
            batch_loss = F.cross_entropy(net(x), y, weight=weights, reduction="sum") / len(y)
            batch_loss.backward()
            optimizer.step()
        return False

    return epoch


def _lbfgs_epochs(
    net: nn.Module,
    train: _DeviceRows,
    weights: torch.Tensor | None,
    decayed: list[nn.Parameter],
    decay: float,
    learning_rate: float,
) -> Callable[[], bool]:
    """Full-batch L-BFGS, ``LBFGS_ITERATIONS`` iterations per call; True once converged."""
    optimizer = torch.optim.LBFGS(
        net.parameters(),
        lr=learning_rate,
        max_iter=LBFGS_ITERATIONS,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def full_batch_loss() -> float:
        # sklearn's objective on the mean scale: mean weighted loss + λ/2 ‖W‖².
        optimizer.zero_grad()
        total = torch.zeros((), device=decayed[0].device)
        for x, y in train.batches(FULL_BATCH_ROWS):
            loss = F.cross_entropy(net(x), y, weight=weights, reduction="sum") / len(train)
            loss.backward()
            total += loss.detach()
        penalty = 0.5 * decay * torch.stack([(p * p).sum() for p in decayed]).sum()
        penalty.backward()
        return float(total + penalty.detach())

    def epoch() -> bool:
        before = optimizer.state[decayed[0]].get("n_iter", 0)
        optimizer.step(full_batch_loss)
        # L-BFGS returns before its iteration budget only when it has converged.
        return bool(optimizer.state[decayed[0]]["n_iter"] - before < LBFGS_ITERATIONS)

    return epoch


class _DeviceRows:
    """Standardised rows on the device: held whole when they fit the budget, else streamed."""

    def __init__(
        self, rows: FeatureRows, labels: np.ndarray, module: HeadModule, device: torch.device
    ) -> None:
        self.rows = rows
        self.labels = np.asarray(labels, dtype=np.int64)  # one per position in rows.index
        self.mean, self.std, self.device = module.mean, module.std, device
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        if rows.in_memory:
            self.x = self._standardised(rows.load())
            self.y = torch.from_numpy(self.labels).to(device)

    def __len__(self) -> int:
        return len(self.rows)

    def _standardised(self, x: np.ndarray) -> torch.Tensor:
        # In place: x is a fresh float32 array of ours, so no second copy on the CPU.
        return torch.from_numpy(x).to(self.device).sub_(self.mean).div_(self.std)

    def batches(
        self, size: int, rng: np.random.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) batches over every row once; shuffled when given ``rng``."""
        if self.x is not None and self.y is not None:
            if rng is None:
                for start in range(0, len(self.x), size):
                    yield self.x[start : start + size], self.y[start : start + size]
                return
            order = torch.from_numpy(rng.permutation(len(self.x))).to(self.device)
            for start in range(0, len(self.x), size):
                chosen = order[start : start + size]
                yield self.x[chosen], self.y[chosen]
            return
        for positions, block in self.rows.blocks(rng):
            x = self._standardised(block)
            y = torch.from_numpy(self.labels[positions]).to(self.device)
            for start in range(0, len(x), size):
                yield x[start : start + size], y[start : start + size]

    @torch.no_grad()
    def mean_loss(self, net: nn.Module, weights: torch.Tensor | None) -> float:
        total = 0.0
        for x, y in self.batches(FULL_BATCH_ROWS):
            total += float(F.cross_entropy(net(x), y, weight=weights, reduction="sum"))
        return total / max(len(self), 1)

    @torch.no_grad()
    def predictions(self, net: nn.Module) -> tuple[np.ndarray, np.ndarray]:
        """(true labels, predicted labels) in file order."""
        truth, predicted = [], []
        for x, y in self.batches(FULL_BATCH_ROWS):
            truth.append(y.cpu().numpy())
            predicted.append(net(x).argmax(dim=1).cpu().numpy())
        return np.concatenate(truth), np.concatenate(predicted)


def _class_weights(
    labels: np.ndarray, classes: int, how: str, device: torch.device
) -> torch.Tensor | None:
    """``balanced``: n / (classes present * n_class), as sklearn; absent classes weigh 0."""
    if how == "none":
        return None
    counts = np.bincount(labels, minlength=classes).astype(np.float64)
    weights = np.zeros(classes)
    present = counts > 0
    weights[present] = len(labels) / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32, device=device)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch for initialisation and dropout without disturbing the caller's RNG."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
