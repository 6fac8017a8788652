"""A picture of the features: a 2-D PCA or t-SNE scatter coloured by class (matplotlib and
scikit-learn, the ``plot`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from featx.errors import UsageError
from featx.store.durable import atomic_output, check_writable
from featx.store.reader import FeatureFile


def pyplot(command: str) -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or a UsageError naming the extra.

    Example: ``plt = pyplot("featx probe -o")``
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(f"{command} needs matplotlib: pip install 'featx[plot]'") from None
    return plt


def wrapped(title: str, width: int) -> str:
    """``title`` broken into lines of at most ``width`` characters, so it is never clipped."""
    import textwrap

    return "\n".join(textwrap.wrap(title, width)) or title


METHODS = ("pca", "tsne")


def tsne_2d(features: np.ndarray, seed: int) -> np.ndarray:
    """Rows embedded in 2-D by scikit-learn's t-SNE (PCA-initialised, seeded; perplexity 30, or
    less for few rows), or a UsageError naming the extra when scikit-learn is missing."""
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise UsageError(
            "featx plot --method tsne needs scikit-learn: pip install 'featx[plot]'"
        ) from None
    if len(features) < 4:
        raise UsageError(f"featx plot --method tsne needs at least 4 rows, not {len(features)}")
    x = features.reshape(len(features), -1).astype(np.float32)
    perplexity = min(30.0, (len(x) - 1) / 3)
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def pca_2d(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows projected on the two leading principal components, and their variance ratios."""
    x = features.reshape(len(features), -1).astype(np.float64)
    x -= x.mean(axis=0)
    if len(x) < 2:
        return np.zeros((len(x), 2)), np.zeros(2)
    _, singular, vt = np.linalg.svd(x, full_matrices=False)
    components = vt[:2]
    projected = x @ components.T
    if projected.shape[1] < 2:  # a single feature: pad the missing axis
        projected = np.hstack([projected, np.zeros((len(x), 2 - projected.shape[1]))])
    variance = singular**2
    ratio = variance[:2] / variance.sum() if variance.sum() > 0 else np.zeros(2)
    return projected, np.pad(ratio, (0, 2 - len(ratio)))


def plot_features(
    path: str | Path,
    out: str | Path,
    layer: str | None = None,
    max_points: int = 5000,
    size: tuple[int, int] = (800, 600),
    seed: int = 0,
    method: str = "pca",
) -> dict[str, Any]:
    """Write a PNG scatter of ``layer``'s features (PCA or t-SNE to 2-D), one colour per class.

    At most ``max_points`` rows are drawn (a seeded random sample), so big files plot quickly.
    Example: ``plot_features("feats.h5", "features.png", method="tsne")``
    """
    if method not in METHODS:
        raise UsageError(f"--method {method!r}: expected {' | '.join(METHODS)}")
    plt = pyplot("featx plot")
    check_writable(Path(out))
    if max_points < 1:
        raise UsageError("--max-points must be at least 1")
    with FeatureFile(path) as f:
        name = f.layer(layer)
        total = len(f)
        if total == 0:
            raise UsageError(f"{path} has no rows to plot")
        rows = np.arange(total)
        if total > max_points:
            rows = np.sort(np.random.default_rng(seed).choice(total, max_points, replace=False))
        features = f.features(name)[rows] if len(rows) < total else f.features(name)[()]
        labels = f.labels[rows]
        class_names = f.class_names
        model = f.attrs.get("model")
    if method == "tsne":
        points, ratio = tsne_2d(features, seed), None
    else:
        points, ratio = pca_2d(features)
    dpi = 100
    figure, axes = plt.subplots(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    for label in np.unique(labels):
        mask = labels == label
        text = class_names[label] if 0 <= label < len(class_names) else "unlabelled"
        axes.scatter(points[mask, 0], points[mask, 1], s=12, alpha=0.75, label=text)
    if ratio is None:
        axes.set_xlabel("t-SNE 1")
        axes.set_ylabel("t-SNE 2")
    else:
        axes.set_xlabel(f"PC1 ({ratio[0]:.0%} of variance)")
        axes.set_ylabel(f"PC2 ({ratio[1]:.0%} of variance)")
    title = f"{model} {name} ({method}): {len(rows)} of {total} images"
    axes.set_title(wrapped(title, max(20, size[0] // 9)))
    if len(np.unique(labels)) <= 20:
        axes.legend(loc="best", fontsize="small", markerscale=1.5)
    figure.tight_layout()
    # Through a private temporary: a link planted at ``out`` is replaced, never written through.
    with atomic_output(out, overwrite=True) as temporary:
        figure.savefig(temporary, dpi=dpi, format=Path(out).suffix.lstrip(".") or "png")
    plt.close(figure)
    return {
        "output": str(out),
        "points": int(len(rows)),
        "layer": name,
        "method": method,
        "explained_variance": None if ratio is None else [float(v) for v in ratio],
    }
