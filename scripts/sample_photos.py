"""Write a small real-photo folder (scikit-image's bundled photos) in class subfolders.

    python scripts/sample_photos.py photos/      # photos/cat, photos/coffee, photos/rocket

Each class gets its photo plus a few crops and flips, so a head has something to learn from.
Nothing is downloaded: the photos ship inside scikit-image.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image


def variants(array: np.ndarray, count: int) -> list[np.ndarray]:
    """The photo, then deterministic crops (70-90% of each side), every other one mirrored."""
    height, width = array.shape[:2]
    out = [array]
    for i in range(1, count):
        scale = 0.7 + 0.2 * (i % 3) / 2
        h, w = int(height * scale), int(width * scale)
        top = (height - h) * (i % 4) // 3
        left = (width - w) * ((i * 3) % 4) // 3
        crop = array[top : top + h, left : left + w]
        out.append(crop[:, ::-1] if i % 2 else crop)
    return out


def main(target: str, per_class: int = 6) -> None:
    import skimage.data as data

    photos = {"cat": data.chelsea(), "coffee": data.coffee(), "rocket": data.rocket()}
    root = Path(target)
    for name, array in photos.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, variant in enumerate(variants(array, per_class)):
            Image.fromarray(np.ascontiguousarray(variant)).save(
                folder / f"{name}_{i}.jpg", quality=92
            )
    print(
        f"wrote {len(photos) * per_class} photos in {len(photos)} classes under {root}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "photos")
