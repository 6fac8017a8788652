"""Write a seeded, stratified subset of Fashion-MNIST as class-folder PNGs (real product photos).

    apt-get install dataset-fashion-mnist              # Debian: /usr/share/datasets/fashion-mnist/
    python scripts/fashion_mnist_subset.py fashion --per-class 100 --seed 0

Fashion-MNIST (Zalando Research, MIT licence): 70,000 photos of clothing, shoes and bags, 10
classes, 28x28 grayscale. The subset takes ``--per-class`` images of each class from the
``--split`` (train: 60,000, test: 10,000), chosen by a seeded random draw, and writes them as
``OUT/<class>/<split>-<index>.png`` (the index into the split), ready for ``featx extract``.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE = Path("/usr/share/datasets/fashion-mnist")
INSTALL = "apt-get install dataset-fashion-mnist"
CLASSES = [
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
]
IDX_MAGIC = {"images": 2051, "labels": 2049}  # big-endian headers of the IDX format


def read_idx(path: Path, kind: str) -> np.ndarray:
    """An IDX file (gzipped) as uint8: images ``[n, 28, 28]`` or labels ``[n]``."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    magic, count = (int.from_bytes(data[i : i + 4], "big") for i in (0, 4))
    if magic != IDX_MAGIC[kind]:
        raise SystemExit(f"{path}: not an IDX {kind} file (magic {magic})")
    if kind == "labels":
        return np.frombuffer(data, np.uint8, count, offset=8)
    rows, cols = (int.from_bytes(data[i : i + 4], "big") for i in (8, 12))
    return np.frombuffer(data, np.uint8, count * rows * cols, offset=16).reshape(count, rows, cols)


def load_split(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    images = source / f"{prefix}-images-idx3-ubyte.gz"
    labels = source / f"{prefix}-labels-idx1-ubyte.gz"
    missing = [str(p) for p in (images, labels) if not p.is_file()]
    if missing:
        raise SystemExit(
            f"Fashion-MNIST is not installed here ({missing[0]} is missing). On Debian or "
            f"Ubuntu: `{INSTALL}` (as root; `apt-get update` first), or pass --source DIR "
            "holding the four *-ubyte.gz files from github.com/zalandoresearch/fashion-mnist"
        )
    return read_idx(images, "images"), read_idx(labels, "labels")


def stratified_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """``per_class`` indices of each class (all of a smaller class), seeded, sorted."""
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


def write_subset(out: Path, per_class: int, seed: int, split: str, source: Path) -> int:
    images, labels = load_split(source, split)
    chosen = stratified_subset(labels, per_class, seed)
    for i in chosen:
        folder = out / CLASSES[labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"{split}-{i:05d}.png")
    return len(chosen)


@contextmanager
def subset_work(work: Path | None, per_class: int, source: Path) -> Iterator[tuple[Path, Path]]:
    """(work folder, class folders of the seeded training subset): ``work`` kept and its subset
    reused when given, else a temporary folder removed afterwards."""
    with tempfile.TemporaryDirectory() as temporary:
        folder = work or Path(temporary)
        images = folder / "fashion-mnist"
        if not images.exists():
            write_subset(images, per_class, 0, "train", source)
        yield folder, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write <class>/<split>-<index>.png into")
    parser.add_argument("--per-class", type=int, default=100, help="images of each class [100]")
    parser.add_argument("--seed", type=int, default=0, help="seeds the draw [0]")
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--source", type=Path, default=SOURCE, help=f"IDX files [{SOURCE}]")
    args = parser.parse_args()
    if args.per_class < 1:
        parser.error("--per-class must be at least 1")
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} exists and is not empty")
    count = write_subset(args.out, args.per_class, args.seed, args.split, args.source)
    print(
        f"wrote {count} Fashion-MNIST {args.split} images into {args.out}/<class>/", file=sys.stderr
    )


if __name__ == "__main__":
    main()
