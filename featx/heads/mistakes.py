"""What a head got wrong: ``featx evaluate --errors FILE.csv`` and ``--errors-png FILE.png``.

The CSV lists every misclassified row in file order (path, true class, predicted class, its
probability, then the top-k classes), cells made spreadsheet-safe. The PNG is a contact sheet
of the first ``MAX_SHEET_IMAGES`` of them, each captioned ``true → predicted (p)``; it needs
matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx.safe_text import csv_cell, for_terminal, original_name
from featx.store.durable import atomic_output

MAX_SHEET_IMAGES = 64
THUMBNAIL = 160  # pixels, the longer side of each image on the sheet


@dataclass(frozen=True)
class Mistake:
    """One misclassified row: its path, true and predicted class indices, probabilities."""

    path: str
    true: int
    probabilities: np.ndarray

    @property
    def predicted(self) -> int:
        return int(self.probabilities.argmax())


def mistakes_of(paths: list[str], truth: np.ndarray, probabilities: np.ndarray) -> list[Mistake]:
    """The rows of one block whose best class is not their true class."""
    wrong = np.flatnonzero(probabilities.argmax(axis=1) != truth)
    return [Mistake(paths[i], int(truth[i]), probabilities[i]) for i in wrong]


def errors_columns(top_k: int) -> list[str]:
    """``path, true_class, predicted_class, probability, top1_class, top1_probability, …``"""
    columns = ["path", "true_class", "predicted_class", "probability"]
    for rank in range(1, top_k + 1):
        columns += [f"top{rank}_class", f"top{rank}_probability"]
    return columns


def write_errors_csv(
    path: str | os.PathLike[str],
    mistakes: list[Mistake],
    class_names: list[str],
    top_k: int,
    overwrite: bool,
) -> Path:
    """The misclassified rows as a CSV (``errors_columns``), written atomically.

    Example: ``write_errors_csv("errors.csv", mistakes, head.class_names, 3, overwrite=False)``
    """
    cells = [csv_cell(name) for name in class_names]
    top_k = min(top_k, len(class_names))
    with (
        atomic_output(path, overwrite) as temporary,
        open(temporary, "w", newline="", encoding="utf-8") as handle,
    ):
        writer = csv.writer(handle)
        writer.writerow(errors_columns(top_k))
        for mistake in mistakes:
            p = mistake.probabilities
            best = int(mistake.predicted)
            row = [csv_cell(mistake.path), cells[mistake.true], cells[best], f"{p[best]:.6g}"]
            for index in np.argsort(-p, kind="stable")[:top_k]:
                row += [cells[index], f"{p[index]:.6g}"]
            writer.writerow(row)
    return Path(path)


def write_contact_sheet(
    path: str | os.PathLike[str],
    mistakes: list[Mistake],
    class_names: list[str],
    root: str,
    overwrite: bool,
) -> Path:
    """A grid of the misclassified images under ``root`` (the features file's ``source``),
    captioned ``true → predicted (p)``; an image that is not a file there (a tar member, a
    moved folder) is a grey tile with its caption.

    Example: ``write_contact_sheet("errors.png", mistakes, names, "/data/photos", False)``
    """
    from featx.plot import pyplot

    plt = pyplot("--errors-png")
    shown = mistakes[:MAX_SHEET_IMAGES]
    columns = max(1, min(6, len(shown)))
    rows = max(1, -(-len(shown) // columns))
    figure, axes = plt.subplots(
        rows, columns, figsize=(2.4 * columns, 2.6 * rows + 0.6), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, mistake in zip(axes.flat, shown, strict=False):
        ax.imshow(_thumbnail(root, mistake.path))
        true, predicted = class_names[mistake.true], class_names[mistake.predicted]
        p = mistake.probabilities[mistake.predicted]
        caption = f"{for_terminal(mistake.path)[-28:]}\n{true[:16]} → {predicted[:16]} ({p:.2f})"
        ax.set_title(caption, fontsize=7)
    more = f" (the first {len(shown)})" if len(mistakes) > len(shown) else ""
    figure.suptitle(f"{len(mistakes)} misclassified{more}", fontsize=10)
    figure.tight_layout()
    with atomic_output(path, overwrite) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)
    return Path(path)


def _thumbnail(root: str, row_path: str) -> np.ndarray:
    from PIL import Image

    grey = np.full((THUMBNAIL, THUMBNAIL, 3), 200, dtype=np.uint8)
    where = Path(root) / original_name(row_path)
    if not root or not where.is_file():
        return grey
    try:
        with Image.open(where) as image:
            image.thumbnail((THUMBNAIL, THUMBNAIL))
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError):
        return grey
