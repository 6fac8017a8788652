"""Augmented features files for tests, until ``featx extract --augment K`` makes them.

``augmented_copy`` takes a real extraction and adds what ``--augment K`` adds: ``views/<layer>``
``[n, K, ...]`` in the features' dtype (row i's views of row i's image) and the root attribute
``augment``; everything else, the clean features included, stays as extracted. A view here is
the image's clean row moved by seeded noise (a fraction of each feature's spread), enough to be
a different row of the same image. Swap this for a real ``--augment`` extraction once it exists.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np

from featx.store import schema
from featx.store.features_file import write_attrs

POLICY = "test: clean features + seeded noise"


def augmented_copy(plain: Path, out: Path, views: int, seed: int = 0, noise: float = 0.5) -> Path:
    """A copy of ``plain`` with ``views`` augmented views per image in every layer."""
    shutil.copyfile(plain, out)
    rng = np.random.default_rng(seed)
    with h5py.File(out, "r+") as f:
        for layer, clean in f[schema.FEATURES].items():
            x = clean[:].astype(np.float32)
            spread = x.std(axis=0, keepdims=True)
            moved = x[:, None] + noise * spread * rng.standard_normal((len(x), views, *x.shape[1:]))
            f.create_dataset(f"{schema.VIEWS}/{layer}", data=moved.astype(clean.dtype))
        write_attrs(f, {"augment": {"views": views, "seed": seed, "policy": POLICY}})
    return out
