"""Rows of a features file within a memory budget: whole when they fit, else in row blocks.

A 1M x 2048 float16 file is 4 GB on disk and 8 GB as float32, so nothing here loads a feature
dataset whole unless the rows asked for fit the budget as float32. Otherwise rows are read in
contiguous pieces (one HDF5 read each, never more than a block of rows at a time), and a block
groups several pieces so that a shuffled pass mixes rows from all over the file: the files are
sorted by class folder, and a block of neighbouring rows would hold one class.
"""

from __future__ import annotations

from collections.abc import Iterator

import h5py
import numpy as np

from featx.errors import UsageError

MAX_PIECES_PER_BLOCK = 64
MIN_PIECE_ROWS = 256  # smaller reads cost more in HDF5 call overhead than they save in memory


class FeatureRows:
    """Rows ``index`` of one features dataset, read as float32 ``[n, dim]`` blocks.

    Example::

        rows = FeatureRows(f.features("flatten"), np.arange(len(f)), budget=512 << 20)
        for positions, x in rows.blocks():  # positions index into rows.index
            ...
    """

    def __init__(self, dataset: h5py.Dataset, index: np.ndarray, budget: int) -> None:
        self.dataset = dataset
        self.index = np.sort(np.asarray(index, dtype=np.int64))  # sorted: contiguous reads
        self.dim = int(np.prod(dataset.shape[1:], dtype=np.int64))
        row_bytes = 4 * max(1, self.dim)
        self.in_memory = len(self.index) * row_bytes <= budget
        # A block, its float32 copy and what the model makes of it must fit at once.
        self.block_rows = max(1, budget // (4 * row_bytes))
        pieces = min(MAX_PIECES_PER_BLOCK, max(1, self.block_rows // MIN_PIECE_ROWS))
        self.piece_rows = max(1, self.block_rows // pieces)
        self.reads = 0  # HDF5 reads so far, and the most rows one of them returned
        self.largest_read = 0

    def __len__(self) -> int:
        return len(self.index)

    def load(self) -> np.ndarray:
        """All rows at once, as float32 ``[n, dim]``: only when ``in_memory``."""
        whole = np.empty((len(self.index), self.dim), dtype=np.float32)
        for positions, x in self.blocks():
            whole[positions] = x
        return whole

    def blocks(
        self, rng: np.random.Generator | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(positions, x)`` blocks covering every row once: in file order, or, given ``rng``,
        pieces in random order and rows shuffled within each block."""
        pieces = self._pieces()
        if rng is not None:
            pieces = [pieces[i] for i in rng.permutation(len(pieces))]
        per_block = max(1, self.block_rows // self.piece_rows)
        for start in range(0, len(pieces), per_block):
            group = pieces[start : start + per_block]
            positions = np.concatenate([np.arange(lo, hi) for lo, hi in group])
            parts = [self._read(lo, hi) for lo, hi in group]
            x = parts[0] if len(parts) == 1 else np.concatenate(parts)
            if rng is not None:
                order = rng.permutation(len(positions))
                positions, x = positions[order], x[order]
            yield positions, x

    def _pieces(self) -> list[tuple[int, int]]:
        """Ranges of positions whose file rows lie in one ``piece_rows`` stretch of the file."""
        if not len(self.index):
            return []
        first, last = int(self.index[0]), int(self.index[-1])
        bounds = np.arange(first, last + self.piece_rows + 1, self.piece_rows)
        cuts = np.searchsorted(self.index, bounds)
        return [(int(lo), int(hi)) for lo, hi in zip(cuts[:-1], cuts[1:], strict=True) if hi > lo]

    def _read(self, lo: int, hi: int) -> np.ndarray:
        rows = self.index[lo:hi]
        start, stop = int(rows[0]), int(rows[-1]) + 1
        raw = self.dataset[start:stop]
        self.reads += 1
        self.largest_read = max(self.largest_read, stop - start)
        if stop - start != len(rows):
            raw = raw[rows - start]
        return raw.reshape(len(rows), self.dim).astype(np.float32, copy=False)


# A feature's scale is floored at this fraction of the mean standard deviation of all features:
# a feature spread a hundred times less than the typical one is floored (on the README's
# photos, under 5% of efficientnet_lite0's features), every other one is StandardScaler's.
# The README demo's held-out photos are right for any floor from 0.001 to 0.1.
SCALE_FLOOR = 0.01
SCALE_RULE = f"scale_j = max(std_j, {SCALE_FLOOR} * mean_k std_k)"


def standardisation(rows: FeatureRows) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and scale, streamed: the scale is the standard deviation (ddof 0, as
    sklearn's StandardScaler), floored at ``SCALE_FLOOR`` times the mean of all features' (see
    :func:`floored_scale`).

    Blocks are merged with Chan's parallel formula in float64, so the result does not depend
    on the block size.
    """
    count = 0
    mean = np.zeros(rows.dim, dtype=np.float64)
    m2 = np.zeros(rows.dim, dtype=np.float64)
    for _, x in rows.blocks():
        if not np.isfinite(x).all():
            raise UsageError(
                f"{rows.dataset.file.filename}: features contain NaN or infinity "
                f"(float16 overflow?); re-extract with --dtype float32"
            )
        block = x.astype(np.float64)
        n = len(block)
        block_mean = block.mean(axis=0)
        block_m2 = ((block - block_mean) ** 2).sum(axis=0)
        delta = block_mean - mean
        total = count + n
        mean += delta * n / total
        m2 += block_m2 + delta**2 * count * n / total
        count = total
    std = floored_scale(np.sqrt(m2 / max(count, 1)))
    return mean.astype(np.float32), std.astype(np.float32)


def floored_scale(std: np.ndarray) -> np.ndarray:
    """``max(std_j, SCALE_FLOOR * mean(std))`` per feature; 1 where every feature is constant.

    A feature nearly constant on the training rows (std 5e-6 where the others' is 0.2) would
    turn an ordinary deviation of a new row into a standardised value in the thousands, which
    outweighs every other feature and flips the prediction. Relative to the mean spread of the
    features, the floor leaves every feature of ordinary scale exactly as StandardScaler has it.
    """
    floor = SCALE_FLOOR * float(std.mean()) if len(std) else 0.0
    if floor <= 0:
        return np.where(std > 0, std, 1.0)
    return np.maximum(std, floor)


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows), sorted: ``fraction`` of each class held out, seeded.

    A class with two or more rows keeps at least one on each side.
    Example: ``train, val = stratified_split(f.labels, 0.2, seed=0)``
    """
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        count = int(round(fraction * len(rows)))
        count = min(max(count, 1 if len(rows) >= 2 else 0), len(rows) - 1)
        held.append(rows[:count])
    val = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train.astype(np.int64), val.astype(np.int64)
