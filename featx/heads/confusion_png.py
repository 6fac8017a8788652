"""The confusion matrix as a PNG, drawn with Pillow (already a torchvision dependency).

Rows are true classes, columns predicted ones; a cell's shade is its share of the true class
(so rare classes are as readable as common ones) and its number is the count.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DARK = np.array([8, 48, 107], dtype=np.float64)  # a full cell; an empty one is white
MAX_LABEL_CHARS = 24


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or built without FreeType
        return ImageFont.load_default()


def confusion_png(
    matrix: np.ndarray | list[list[int]],
    class_names: list[str],
    path: str | os.PathLike[str],
    title: str = "",
) -> Path:
    """Draw ``matrix`` (``[true, predicted]`` counts) to ``path``.

    Example: ``confusion_png(metrics["confusion_matrix"], names, "h.confusion.png")``
    """
    counts = np.asarray(matrix, dtype=np.int64)
    classes = len(class_names)
    cell = int(min(64, max(4, 720 // max(classes, 1))))
    font = _font(max(8, min(14, cell // 2)))
    labels = [name[:MAX_LABEL_CHARS] for name in class_names]
    show_labels = cell >= 10
    label_width = (
        int(max(font.getlength(label) for label in labels)) + 8 if show_labels and labels else 0
    )
    pad = 16
    left = pad + 18 + label_width
    width = max(left + classes * cell + pad, 320)
    lines = title_lines(title, font, width - 2 * pad)  # wrapped, never clipped
    line_height = int(font.size if hasattr(font, "size") else 11) + 4
    header = len(lines) * line_height + 8 if lines else 0
    top = pad + header + 18 + label_width
    height = top + classes * cell + pad
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for number, line in enumerate(lines):
        draw.text((pad, pad + number * line_height), line, fill="black", font=font)
    draw.text((left, top - label_width - 18), "predicted", fill="black", font=font)
    _vertical_text(image, "true", (pad, top), font)

    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    for i in range(classes):
        for j in range(classes):
            share = float(shares[i, j])
            colour = tuple(int(v) for v in 255 + (DARK - 255) * share)
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=colour, outline=None)
            text = str(counts[i, j])
            if cell >= 20 and font.getlength(text) < cell - 2:
                ink = "white" if share > 0.5 else "black"
                draw.text((x0 + cell / 2, y0 + cell / 2), text, fill=ink, font=font, anchor="mm")
    draw.rectangle([left - 1, top - 1, left + classes * cell, top + classes * cell], outline="gray")
    if show_labels:
        for i, label in enumerate(labels):
            y = top + i * cell + cell / 2
            draw.text((left - 4, y), label, fill="black", font=font, anchor="rm")
            _vertical_text(image, label, (left + i * cell + cell // 2 - 7, top - 4), font, True)
    out = Path(path)
    image.save(out, format="PNG")
    return out


def title_lines(
    title: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: float
) -> list[str]:
    """``title`` in lines of at most ``width`` pixels: broken between words, and inside a word
    only when the word alone is wider."""
    lines: list[str] = []
    for word in title.split():
        joined = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(joined) <= width:
            lines[-1] = joined
            continue
        while font.getlength(word) > width and len(word) > 1:
            fits = [i for i in range(1, len(word)) if font.getlength(word[:i]) <= width]
            cut = fits[-1] if fits else 1
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines


def _vertical_text(
    image: Image.Image,
    text: str,
    at: tuple[int, int],
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    bottom: bool = False,
) -> None:
    """Text rotated to read bottom-up; ``at`` is its top-left corner, or bottom-left."""
    width = int(font.getlength(text)) + 2
    strip = Image.new("L", (max(width, 1), 16), 0)
    ImageDraw.Draw(strip).text((0, 0), text, fill=255, font=font)
    strip = strip.rotate(90, expand=True)
    x, y = at
    if bottom:
        y -= strip.height
    image.paste(Image.new("RGB", strip.size, "black"), (x, y), strip)
