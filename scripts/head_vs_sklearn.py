"""featx's linear head against scikit-learn's LogisticRegression on the same digits features.

    python scripts/head_vs_sklearn.py                       # 600 digits, resnet18, random weights
    python scripts/head_vs_sklearn.py --count 1797 --layer layer3 --seeds 0 1 2 3 4

scikit-learn's 8x8 handwritten digits are written as PNG files in class folders, run through
`featx extract`, and both classifiers train on the identical stratified split (featx's own
``stratified_split``) with standardisation fitted on the training rows. Prints a markdown table.
Needs scikit-learn (a test-only dependency: pip install -e '.[dev]'). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(root: Path, count: int) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(min(count, len(digits.images))):
        folder = root / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.png")


def sklearn_accuracy(x: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x[train])
    model = LogisticRegression(max_iter=5000).fit(scaler.transform(x[train]), y[train])
    return float(model.score(scaler.transform(x[val]), y[val]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=600, help="digits to use (at most 1797)")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--weights", default="none", help="none needs no download")
    parser.add_argument("--layer", action="append", default=None, help="repeat for several")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    from featx import ExtractConfig, FeatureFile, extract
    from featx.config import HeadConfig
    from featx.heads.rows import stratified_split
    from featx.heads.train import train_head

    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        write_digits(root / "digits", args.count)
        config = ExtractConfig(
            model=args.model,
            weights=args.weights,
            layers=tuple(args.layer or ()),
            image_size=args.image_size,
            progress=False,
        )
        extract(root / "digits", root / "digits.h5", config)
        print(f"{args.model} ({args.weights} weights) features of {args.count} digits\n")
        print("| layer | seed | train / val | featx linear | sklearn LogisticRegression | Δ (pp) |")
        print("| --- | --- | --- | --- | --- | --- |")
        with FeatureFile(root / "digits.h5") as f:
            layers, labels = f.layers, f.labels
            features = {layer: f.features(layer)[:] for layer in layers}
        for layer in layers:
            for seed in args.seeds:
                train, val = stratified_split(labels, 0.2, seed)
                started = time.perf_counter()
                head = root / f"{layer}-{seed}.head"
                ours = train_head(root / "digits.h5", head, HeadConfig(layer=layer, seed=seed))
                seconds = time.perf_counter() - started
                theirs = sklearn_accuracy(features[layer], labels, train, val)
                accuracy = ours.metrics["accuracy"]
                print(
                    f"| {layer} | {seed} | {len(train)} / {len(val)} | {accuracy:.4f} "
                    f"({seconds:.1f} s) | {theirs:.4f} | {100 * (accuracy - theirs):+.2f} |"
                )


if __name__ == "__main__":
    main()
