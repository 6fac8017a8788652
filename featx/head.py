"""Classifier heads on saved features: train, save and load (safetensors + JSON), apply.

A head file is a safetensors file holding the weights and the standardisation (tensors
``mean`` and ``std``, computed on the training rows only), with a JSON header in its metadata
(key ``featx_head``): class names, feature layer and dim, head config, training summary, and
the extraction fingerprint (model, weights, layer, pool, transform) of the features it was
trained on. Nothing is pickled, so loading a head never runs code, and a head refuses features
of any other extraction (:meth:`Head.check`).

Training reads features through :class:`featx.rows.FeatureRows`: whole when they fit the memory
budget, in row blocks otherwise, so a file larger than memory still trains. The linear head is
multinomial logistic regression fitted by full-batch L-BFGS on the same objective as
scikit-learn's ``LogisticRegression``; the MLP head trains with AdamW on shuffled minibatches.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
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
from featx.errors import FeatxError, HeadMismatch, UsageError
from featx.metrics import classification_metrics
from featx.reader import FeatureFile
from featx.rows import FeatureRows, standardisation, stratified_split
from featx.runtime import pick_device
from featx.store import check_writable, publish, temporary_name

FORMAT = "featx-head"
FORMAT_VERSION = 1
HEADER_KEY = "featx_head"
LBFGS_ITERATIONS = 20  # L-BFGS iterations per epoch, i.e. between two validation checks
FULL_BATCH_ROWS = 65536  # the full-batch loss is summed in chunks of this many rows


class HeadModule(nn.Module):
    """Raw feature vectors → standardised → logits; the standardisation travels with the head."""

    def __init__(self, dim: int, classes: int, kind: str, hidden: int, dropout: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        if kind == "linear":
            self.net = nn.Sequential(nn.Linear(dim, classes))
            # sklearn's L-BFGS starts from zero too; any start reaches the same optimum.
            nn.init.zeros_(self.net[0].weight)
            nn.init.zeros_(self.net[0].bias)
        else:
            self.net = nn.Sequential(
                nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, classes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


@dataclass
class Head:
    """A trained head: its module and its header. ``load_head`` makes one from a file.

    Example: ``probabilities = load_head("cats.head").probabilities(features)``
    """

    module: HeadModule
    header: dict[str, Any]
    path: Path | None = None

    @property
    def class_names(self) -> list[str]:
        return list(self.header["class_names"])

    @property
    def layer(self) -> str:
        return str(self.header["layer"])

    @property
    def dim(self) -> int:
        return int(self.header["dim"])

    @property
    def extraction(self) -> dict[str, Any]:
        return dict(self.header["extraction"])

    def check(self, features: FeatureFile) -> str:
        """The layer of ``features`` this head applies to, or HeadMismatch when those features
        come from another extraction (model, weights, layer, pool or transform)."""
        name = self.path or "the head"
        trained_on = _describe(self.extraction)
        if self.layer not in features.layers:
            raise HeadMismatch(
                f"{features.path} has no layer {self.layer!r} (it has "
                f"{', '.join(features.layers)}); head {name} was trained on {trained_on}"
            )
        changes = extraction_differences(self.extraction, features.extraction(self.layer))
        if changes:
            raise HeadMismatch(
                f"{features.path} holds other features than head {name} was trained on "
                f"({'; '.join(changes)[:400]}); extract with the head's settings "
                f"(featx predict IMAGE_FOLDER --head does)"
            )
        row = features.features(self.layer).shape[1:]
        if int(np.prod(row, dtype=np.int64)) != self.dim:
            raise HeadMismatch(f"{features.path}: rows of {row} do not make {self.dim} features")
        return self.layer

    @torch.no_grad()
    def probabilities(self, x: np.ndarray | torch.Tensor, device: str = "cpu") -> np.ndarray:
        """Class probabilities ``[n, classes]`` (float32) for raw feature rows ``[n, dim]``."""
        module = self.module.to(device).eval()
        rows = torch.as_tensor(x, dtype=torch.float32).reshape(len(x), -1).to(device)
        return torch.softmax(module(rows), dim=1).cpu().numpy()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the head (temporary name, then rename). Example: ``head.save("cats.head")``"""
        from safetensors.torch import save_file

        out = Path(path)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        temporary = temporary_name(out)
        try:
            save_file(tensors, str(temporary), metadata={HEADER_KEY: json.dumps(self.header)})
            publish(temporary, out)
        finally:
            temporary.unlink(missing_ok=True)
        return out


def load_head(path: str | os.PathLike[str]) -> Head:
    """Read a head file written by ``train_head``; never unpickles anything.

    Example: ``head = load_head("cats.head"); head.class_names``
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"head {path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises several unrelated types
        raise UsageError(f"head {path}: not a safetensors file ({error})") from None
    try:
        header = json.loads(metadata[HEADER_KEY])
        if header.get("format") != FORMAT:
            raise KeyError(HEADER_KEY)
    except (KeyError, json.JSONDecodeError):
        raise UsageError(f"head {path}: a safetensors file, but not a featx head") from None
    if header.get("version", 0) > FORMAT_VERSION:
        raise UsageError(f"head {path}: written by a newer featx (format {header['version']})")
    kind = header["head"]
    module = HeadModule(
        header["dim"],
        len(header["class_names"]),
        kind["kind"],
        kind.get("hidden") or 1,
        kind.get("dropout", 0.0),
    )
    try:
        module.load_state_dict(tensors)
    except RuntimeError as error:
        raise UsageError(f"head {path}: weights do not fit its header ({error})") from None
    return Head(module.eval(), header, path)


def report_paths(out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Where the metrics JSON and the confusion PNG of ``out`` go: ``cats.head`` →
    ``cats.metrics.json`` and ``cats.confusion.png``; ``x.metrics.json`` → itself and
    ``x.confusion.png``."""
    out = Path(out)
    if out.name.endswith(".metrics.json"):
        base = out.with_name(out.name[: -len(".metrics.json")])
    else:
        base = out.with_suffix("") if out.suffix else out
    return Path(f"{base}.metrics.json"), Path(f"{base}.confusion.png")


def write_reports(
    metrics: dict[str, Any], metrics_path: Path, picture_path: Path, title: str
) -> None:
    """The metrics JSON (temporary name, then rename) and the confusion-matrix PNG."""
    from featx.picture import confusion_png

    temporary = temporary_name(metrics_path)
    temporary.write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(temporary, metrics_path)
    confusion_png(metrics["confusion_matrix"], metrics["class_names"], picture_path, title)


# --- training -------------------------------------------------------------------------------


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
    check_writable(out)
    if out.exists() and not config.overwrite:
        raise UsageError(f"output {out} exists; pass --overwrite to replace it")
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
            _check_same_extraction(data, held, layer)
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
    Head(module.cpu().eval(), header, out).save(out)
    metrics_path, picture_path = report_paths(out)
    write_reports(metrics, metrics_path, picture_path, f"{out.name}: {evaluated_on}")
    return TrainResult(str(out), str(metrics_path), str(picture_path), metrics)


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
        "standardisation": "tensors mean and std, from the training rows only",
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
    val: _DeviceRows,
    config: HeadConfig,
    weights: torch.Tensor | None,
) -> _Fit:
    """The training loop: one epoch, one validation loss, keep the best; stop early."""
    decayed = [p for p in net.parameters() if p.ndim > 1]  # weights; biases are not decayed
    decay = config.decay(len(train))
    biases = [p for p in net.parameters() if p.ndim <= 1]
    rng = np.random.default_rng(config.seed)
    lbfgs = config.solver == "lbfgs"
    if lbfgs:
        optimizer: torch.optim.Optimizer = torch.optim.LBFGS(
            net.parameters(),
            lr=config.learning_rate,
            max_iter=LBFGS_ITERATIONS,
            history_size=20,
            line_search_fn="strong_wolfe",
        )
    else:
        optimizer = torch.optim.AdamW(
            [
                {"params": decayed, "weight_decay": decay},
                {"params": biases, "weight_decay": 0.0},
            ],
            lr=config.learning_rate,
        )

    def full_batch_loss() -> torch.Tensor:
        # sklearn's objective on the mean scale: mean weighted loss + λ/2 ‖W‖².
        optimizer.zero_grad()
        total = torch.zeros((), device=decayed[0].device)
        for x, y in train.batches(FULL_BATCH_ROWS):
            loss = F.cross_entropy(net(x), y, weight=weights, reduction="sum") / len(train)
            loss.backward()
            total += loss.detach()
        penalty = 0.5 * decay * sum((p * p).sum() for p in decayed)
        penalty.backward()
        return total + penalty.detach()

    best, best_epoch, best_state, waited, stopped = math.inf, 0, None, 0, "epochs"
    epoch = 0
    for epoch in range(1, config.epochs + 1):
        net.train()
        converged = False
        if lbfgs:
            state = optimizer.state[decayed[0]]
            before = state.get("n_iter", 0)
            optimizer.step(full_batch_loss)
            # L-BFGS returns before its iteration budget only when it has converged.
            converged = optimizer.state[decayed[0]]["n_iter"] - before < LBFGS_ITERATIONS
        else:
            for x, y in train.batches(config.batch_size, rng):
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(net(x), y, weight=weights, reduction="sum") / len(y)
                loss.backward()
                optimizer.step()
        net.eval()
        loss = val.mean_loss(net, weights)
        if loss < best:
            best, best_epoch, waited = loss, epoch, 0
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
    return _Fit(epoch, best_epoch, round(best, 6), stopped)


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


# --- checks -----------------------------------------------------------------------------------


def require_labels(data: FeatureFile, labels: np.ndarray, command: str) -> None:
    """UsageError naming an example when any row is unlabelled (-1), or there are no rows."""
    unlabelled = np.flatnonzero(labels < 0)
    if len(unlabelled):
        example = data.file["paths"][int(unlabelled[0])]
        example = example.decode() if isinstance(example, bytes) else example
        raise UsageError(
            f"{data.path}: {len(unlabelled)} of {len(labels)} rows are unlabelled (label -1, "
            f"e.g. {example}); {command} needs every image in a class folder"
        )
    if not len(labels):
        raise UsageError(f"{data.path}: no rows")


def label_map(data: FeatureFile, class_names: list[str]) -> np.ndarray:
    """Index array turning ``data``'s labels into indices of ``class_names``, matched by name
    (a test set may hold fewer classes, or list them in another order)."""
    own = data.class_names or [str(i) for i in range(int(data.labels.max(initial=-1)) + 1)]
    unknown = [name for name in own if name not in class_names]
    if unknown:
        raise UsageError(
            f"{data.path} has classes the head does not know: {', '.join(unknown[:5])} "
            f"(it knows {', '.join(class_names[:10])})"
        )
    return np.asarray([class_names.index(name) for name in own], dtype=np.int64)


def _check_same_extraction(data: FeatureFile, other: FeatureFile, layer: str) -> None:
    if layer not in other.layers:
        raise HeadMismatch(
            f"{other.path} has no layer {layer!r} (it has {', '.join(other.layers)}); "
            f"--val must come from the same extraction as {data.path}"
        )
    changes = extraction_differences(data.extraction(layer), other.extraction(layer))
    if changes:
        raise HeadMismatch(
            f"{other.path} holds other features than {data.path} "
            f"({'; '.join(changes)[:400]}); --val must come from the same extraction"
        )


def extraction_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old → new`` for each difference, one level into dicts (``transform.crop``).

    Example: ``extraction_differences(head.extraction, f.extraction(head.layer))``
    """
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += [f"{key}.{change}" for change in extraction_differences(a, b)]
        elif a != b:
            changes.append(f"{key}: {a!r} → {b!r}")
    return changes


def _describe(extraction: dict[str, Any]) -> str:
    return (
        f"{extraction.get('model')} {extraction.get('layer')} features "
        f"(weights {extraction.get('weights')}, pool {extraction.get('pool')})"
    )
