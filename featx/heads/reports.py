"""What a head scores: classification metrics in plain numpy (scikit-learn's definitions), their
table, and the report files (metrics JSON + confusion PNG) beside a head or an evaluation.

Example::

    metrics = classification_metrics(y_true, y_pred, ["cat", "dog"])
    print(metrics_table(metrics))
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from featx.store.durable import atomic_output


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, classes: int) -> np.ndarray:
    """``[true, predicted]`` counts. Example: ``confusion_matrix(y, p, 3)[0, 2]``"""
    pairs = np.asarray(y_true, np.int64) * classes + np.asarray(y_pred, np.int64)
    return np.bincount(pairs, minlength=classes * classes).reshape(classes, classes)


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro F1, per-class precision/recall/F1, confusion matrix.

    As in scikit-learn: balanced accuracy averages recall over the classes present in
    ``y_true``; macro F1 averages over the classes present in ``y_true`` or ``y_pred``; a ratio
    with a zero denominator is 0.
    Example: ``classification_metrics(np.array([0, 1]), np.array([0, 0]), ["a", "b"])``
    """
    matrix = confusion_matrix(y_true, y_pred, len(class_names))
    hits = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    precision = _ratio(hits, predicted)
    recall = _ratio(hits, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    present = (support > 0) | (predicted > 0)
    total = int(matrix.sum())
    return {
        "accuracy": float(hits.sum() / total) if total else 0.0,
        "balanced_accuracy": float(recall[support > 0].mean()) if total else 0.0,
        "macro_f1": float(f1[present].mean()) if total else 0.0,
        "rows": total,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "class_names": list(class_names),
        "confusion_matrix": matrix.tolist(),
    }


def _ratio(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    out = np.zeros(len(top), dtype=np.float64)
    np.divide(top, bottom, out=out, where=bottom > 0)
    return out


def metrics_table(metrics: dict[str, Any], max_classes: int = 20) -> str:
    """A short plain-text summary: one line per class (the first ``max_classes``), then totals."""
    per_class = metrics["per_class"]
    width = max([5, *(len(name) for name in list(per_class)[:max_classes])])
    lines = [f"{'class':<{width}}  precision  recall     f1  support"]
    for name, row in list(per_class.items())[:max_classes]:
        lines.append(
            f"{name:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1']:5.3f}"
            f"  {row['support']:7d}"
        )
    if len(per_class) > max_classes:
        lines.append(f"... {len(per_class) - max_classes} more classes in the metrics JSON")
    lines.append(
        f"accuracy {metrics['accuracy']:.3f}  balanced accuracy {metrics['balanced_accuracy']:.3f}"
        f"  macro F1 {metrics['macro_f1']:.3f}  on {metrics['rows']} rows"
    )
    return "\n".join(lines)


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
    metrics: dict[str, Any], metrics_path: Path, picture_path: Path, title: str, overwrite: bool
) -> None:
    """The metrics JSON (temporary name, then rename) and the confusion-matrix PNG."""
    from featx.heads.confusion_png import confusion_png

    with atomic_output(metrics_path, overwrite) as temporary:
        temporary.write_text(json.dumps(metrics, indent=2) + "\n")
    with atomic_output(picture_path, overwrite=True) as temporary:
        confusion_png(metrics["confusion_matrix"], metrics["class_names"], temporary, title)
