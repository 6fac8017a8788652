"""The kNN protocol of DINO / DINOv2 on frozen features, streamed within a memory budget.

Rows are L2-normalised, a held-out row's k nearest training rows by cosine similarity vote for
their class with weight ``exp(similarity / T)``, and the class with the most weight wins (the
lower class on a tie, as scikit-learn's ``KNeighborsClassifier``). The similarity matrix is never
whole: held-out rows come in blocks, training rows in blocks and column chunks, and each held-out
row keeps only its running k best.

Example::

    truth, guess = knn_predict(train_rows, test_rows, f.labels, classes=10, k=20, temperature=0.07,
                               device=torch.device("cpu"), chunk_bytes=64 << 20)
"""

from __future__ import annotations

import numpy as np
import torch

from featx.errors import UsageError
from featx.heads.rows import FeatureRows


def knn_predict(
    train: FeatureRows,
    test: FeatureRows,
    labels: np.ndarray,
    classes: int,
    k: int,
    temperature: float,
    device: torch.device,
    chunk_bytes: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(true, predicted) labels of ``test``'s rows in file order, by a kNN vote of ``train``.

    ``labels`` holds one label per file row of the rows' dataset (as ``fit_linear`` takes it);
    ``chunk_bytes`` bounds one block of similarities.
    """
    k = min(k, len(train))
    truth = labels[test.index]
    guess = np.empty(len(test), dtype=np.int64)
    for positions, x in test.blocks():
        query = _unit(x, train, device)
        similarity, neighbour_labels = _nearest(query, train, labels, k, device, chunk_bytes)
        weights = torch.exp(similarity.double() / temperature)
        votes = torch.zeros(len(query), classes, dtype=torch.float64, device=device)
        votes.scatter_add_(1, neighbour_labels, weights)
        guess[positions] = votes.argmax(dim=1).cpu().numpy()  # the first maximum: the lower class
    return truth, guess


def _nearest(
    query: torch.Tensor,
    train: FeatureRows,
    labels: np.ndarray,
    k: int,
    device: torch.device,
    chunk_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The similarities and labels of each query row's ``k`` nearest training rows."""
    best = torch.empty((len(query), 0), device=device)
    best_labels = torch.empty((len(query), 0), dtype=torch.int64, device=device)
    columns = max(1, chunk_bytes // (4 * max(1, len(query))))
    for positions, x in train.blocks():
        block_labels = torch.from_numpy(labels[train.index[positions]].astype(np.int64)).to(device)
        for lo in range(0, len(x), columns):
            keys = _unit(x[lo : lo + columns], train, device)
            similarity = torch.cat([best, query @ keys.T], dim=1)
            chunk_labels = block_labels[lo : lo + columns].expand(len(query), -1)
            candidates = torch.cat([best_labels, chunk_labels], dim=1)
            best, top = similarity.topk(min(k, similarity.shape[1]), dim=1)
            best_labels = candidates.gather(1, top)
    return best, best_labels


def _unit(x: np.ndarray, rows: FeatureRows, device: torch.device) -> torch.Tensor:
    """Rows scaled to unit length (a zero row stays zero: similarity 0 to every row)."""
    tensor = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    if not torch.isfinite(tensor).all():
        where = rows.dataset.file.filename if hasattr(rows.dataset, "file") else "features"
        raise UsageError(
            f"{where}: features contain NaN or infinity (float16 overflow?); "
            "re-extract with --dtype float32"
        )
    return torch.nn.functional.normalize(tensor, dim=1)
