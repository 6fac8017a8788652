"""The training loop under train-head and probe: one epoch at a time (full-batch L-BFGS on
scikit-learn's objective, or AdamW on shuffled minibatches), one validation loss per epoch, the
best epoch kept, early stopping; rows standardised on the device, whole or streamed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from featx.config import HeadConfig
from featx.errors import FeatxError
from featx.heads.model import HeadModule
from featx.heads.rows import FeatureRows

LBFGS_ITERATIONS = 20  # L-BFGS iterations per epoch, i.e. between two validation checks
FULL_BATCH_ROWS = 65536  # the full-batch loss is summed in chunks of this many rows


@dataclass(frozen=True)
class Fit:
    epochs_run: int
    best_epoch: int
    val_loss: float
    stopped: str  # converged | patience | epochs


def fit(
    net: nn.Module,
    train: DeviceRows,
    val: DeviceRows | None,
    config: HeadConfig,
    weights: torch.Tensor | None,
) -> Fit:
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
    return Fit(epoch, best_epoch, round(best, 6) if val is not None else math.nan, stopped)


def _epoch_runner(
    net: nn.Module, train: DeviceRows, config: HeadConfig, weights: torch.Tensor | None
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
    train: DeviceRows,
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


class DeviceRows:
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


def class_weights(
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
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch for initialisation and dropout without disturbing the caller's RNG."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
