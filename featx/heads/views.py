"""An image's views as rows: its clean features and, in a file extracted with ``--augment K``,
its K augmented views (``views/<layer>`` ``[n, K, ...]``), numbered so that every row is known
to belong to its image.

Rows are numbered over a file of n images: ``0 .. n-1`` are the clean rows (row i, image i, as
``features/<layer>`` has them), then ``n + i*K + k`` is image i's view k, in the order the views
dataset stores them, so a run of rows is one contiguous read. Heads train on every view of their
training images and are scored on the clean rows of the others: splits and folds are drawn over
images and expanded to rows (:func:`rows_of`), never drawn over rows, so no image has views on
both sides. In a file without views (K = 0) an image is its clean row and nothing changes.

Example::

    source = layer_views(f, "flatten")                     # reads like a [n * (1 + K), dim] dataset
    rows = FeatureRows(source, rows_of(train, len(f), f.augmented_views), budget)
    y = row_labels(f.labels, f.augmented_views)[rows.index]
"""

from __future__ import annotations

from typing import Any

import h5py
import numpy as np

from featx.store.reader import FeatureFile


class ImageViews:
    """One layer's clean rows and augmented views as one dataset ``[n * (1 + K), ...]`` that
    :class:`featx.heads.rows.FeatureRows` reads: ``shape``, ``dtype``, ``file`` and contiguous
    slices, each slice one read of each dataset it touches."""

    def __init__(self, clean: h5py.Dataset, views: h5py.Dataset) -> None:
        if views.shape[0] != clean.shape[0] or views.shape[2:] != clean.shape[1:]:
            raise ValueError(f"views {views.shape} do not match features {clean.shape}")
        self.clean, self.views = clean, views
        self.images = int(clean.shape[0])
        self.k = int(views.shape[1])
        self.shape = (self.images * (1 + self.k), *clean.shape[1:])
        self.dtype = clean.dtype
        self.file = clean.file

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, step = rows.indices(len(self))
        if step != 1:
            raise ValueError("ImageViews reads contiguous rows only")
        n, k = self.images, self.k
        parts = []
        if start < n:
            parts.append(np.asarray(self.clean[start : min(stop, n)]))
        if stop > n:
            lo, hi = max(start, n) - n, stop - n  # positions among the flattened views
            first, last = lo // k, (hi - 1) // k + 1
            block = np.asarray(self.views[first:last])
            block = block.reshape(-1, *block.shape[2:])
            parts.append(block[lo - first * k : hi - first * k])
        if not parts:
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def layer_views(data: FeatureFile, layer: str) -> Any:
    """``layer``'s rows numbered as this module says: an :class:`ImageViews`, or the clean
    dataset itself in a file without views (so a plain file reads exactly as before)."""
    views = data.views(layer)
    return data.features(layer) if views is None else ImageViews(data.features(layer), views)


def rows_of(images: np.ndarray, n: int, k: int) -> np.ndarray:
    """Every row of ``images`` (of a file of ``n`` images with ``k`` views each): their clean
    rows and all their views, sorted; ``images`` themselves when ``k`` is 0.

    Example: ``rows_of(np.array([1]), n=3, k=2)`` is ``[1, 5, 6]``
    """
    images = np.asarray(images, dtype=np.int64)
    if not k:
        return images
    views = (n + images[:, None] * k + np.arange(k)).ravel()
    return np.sort(np.concatenate([images, views]))


def image_of(rows: np.ndarray, n: int, k: int) -> np.ndarray:
    """The image each row belongs to (the inverse of :func:`rows_of`).

    Example: ``image_of(np.array([1, 5, 6]), n=3, k=2)`` is ``[1, 1, 1]``
    """
    rows = np.asarray(rows, dtype=np.int64)
    return np.where(rows < n, rows, (rows - n) // max(k, 1))


def row_labels(labels: np.ndarray, k: int) -> np.ndarray:
    """One label per row: each image's label on its clean row and on each of its ``k`` views."""
    return np.concatenate([labels, np.repeat(labels, k)])
