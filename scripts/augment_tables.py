"""The README's augmentation table: does `--augment K` help a head trained on few labels?

    apt-get install dataset-fashion-mnist              # once, as root
    python scripts/augment_tables.py                    # 100 per class, K = 0, 4, 8
    python scripts/augment_tables.py --json scripts/results/augment_tables.json

On a seeded, stratified Fashion-MNIST subset (real product photos; scripts/fashion_mnist_subset.py)
it runs what a user runs, through the library in one process, for K in ``--views``:

    featx extract SUBSET -o lite0-augment-K.h5 --model efficientnet_lite0 --augment K ...
    featx probe lite0-augment-K.h5 --per-class 10,20,50 --protocol linear

at efficientnet_lite0's default layer (the pre-logits features) with its ImageNet weights, and
prints: each extraction's wall time (the cost of the views, as a ratio to K = 0, in one run on
this machine; after a warm-up run, the best of ``--repeats``), the probe's cross-validated
accuracy trained on clean views only and on every view (both scored on held-out images' clean
views), and the learning curve at N labelled images per class (5 seeded draws each, scored on
every other image), clean against ``linear+views``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fashion_mnist_subset import SOURCE, subset_work  # noqa: E402

MODEL = "efficientnet_lite0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=100, help="images per class [100]")
    parser.add_argument("--views", default="0,4,8", help="K values of --augment [0,4,8]")
    parser.add_argument("--curve", default="10,20,50", help="labelled images per class")
    parser.add_argument("--image-size", type=int, default=112, help="crop size [112]")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--c-grid", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--work", type=Path, default=None, help="keep files here [a temp dir]")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per K, best kept [2]")
    args = parser.parse_args()
    views = [int(k) for k in args.views.split(",")]
    curve = tuple(int(n) for n in args.curve.split(","))
    if max(curve) >= args.per_class:
        parser.error("--curve needs fewer images per class than --per-class (the rest is scored)")

    import torch

    from featx import ExtractConfig, extract
    from featx.config import ProbeConfig
    from featx.heads.probe import probe

    started = time.perf_counter()
    report: dict[str, Any] = {
        "per_class": args.per_class,
        "image_size": args.image_size,
        "repeats": args.repeats,
    }
    with subset_work(args.work, args.per_class, args.source) as (work, images):
        runs = []
        for k in views:
            out = work / f"lite0-augment-{k}.h5"
            config = ExtractConfig(
                model=MODEL,
                weights="DEFAULT",
                image_size=args.image_size,
                augment=k,
                progress=False,
                quiet=True,
                overwrite=True,
            )
            if not runs:  # warm-up: the first run pays for the page cache and the weights
                extract(images, out, config)
            timed = []
            for _ in range(args.repeats):  # the best of a few: other load only adds time
                extract_started = time.perf_counter()
                extract(images, out, config)
                timed.append(time.perf_counter() - extract_started)
            seconds = min(timed)
            print(f"extracted {out.name}: {seconds:.1f} s", file=sys.stderr)
            runs.append({"views": k, "file": out, "extract_seconds": round(seconds, 1)})
        torch.set_num_threads(1)  # small fits: on 2 shared cores, threads only wait
        options = ProbeConfig(
            folds=args.folds,
            inner_folds=2,
            c_grid=tuple(args.c_grid),
            per_class=curve,
            protocol=("linear",),
            epochs=100,
        )
        for run in runs:
            probe_started = time.perf_counter()
            (layer,) = probe([run["file"]], options).probes
            run["layer"] = layer.layer
            run["probe_seconds"] = round(time.perf_counter() - probe_started, 1)
            run["accuracy"] = [layer.accuracy, layer.accuracy_std]
            if layer.accuracy_with_views is not None:
                run["accuracy_with_views"] = [
                    layer.accuracy_with_views,
                    layer.accuracy_with_views_std,
                ]
            run["curve"] = {
                f"{p.protocol}@{p.per_class}": [p.accuracy, p.accuracy_std]
                for p in layer.learning_curve
            }
            print(f"probed {run['file'].name}: {run['probe_seconds']} s", file=sys.stderr)
            run["file"] = run["file"].name
    report["runs"] = runs
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["machine"] = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    text = tables(report, curve, options.folds)
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps({**report, "table": text}, indent=2) + "\n")


def _cell(pair: list[float] | None) -> str:
    return "–" if pair is None else f"{pair[0]:.3f} ± {pair[1]:.3f}"


def tables(report: dict[str, Any], curve: tuple[int, ...], folds: int) -> str:
    runs = report["runs"]
    base = runs[0]["extract_seconds"]
    images = report["per_class"] * 10
    lines = [
        f"{images} Fashion-MNIST training images ({report['per_class']} per class, seed 0), "
        f"{MODEL} ImageNet weights at `{runs[0]['layer']}`, {report['image_size']} px crops; "
        f"{report['machine']}; everything {report['seconds']:.0f} s",
        "",
        "(a) the cost of the views: extraction wall time (best of "
        f"{report['repeats']} runs each after a warm-up run, same machine)",
        "",
        "| --augment K | crops per image | extraction | per image | ratio to K = 0 |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        lines.append(
            f"| {run['views']} | {1 + run['views']} | {run['extract_seconds']:.1f} s | "
            f"{1000 * run['extract_seconds'] / images:.1f} ms | "
            f"{run['extract_seconds'] / base:.2f}x |"
        )
    lines += [
        "",
        f"(b) probe accuracy ({folds}-fold CV over images, mean ± std over folds), scored on "
        "held-out images' clean views: head trained on clean views only / on every view",
        "",
        "| --augment K | clean only | every view | difference |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        with_views = run.get("accuracy_with_views")
        difference = "–" if with_views is None else f"{with_views[0] - run['accuracy'][0]:+.3f}"
        lines.append(
            f"| {run['views']} | {_cell(run['accuracy'])} | {_cell(with_views)} | {difference} |"
        )
    lines += [
        "",
        "(c) N labelled images per class (5 seeded draws, each scored on every other image's "
        "clean view; mean ± std over draws)",
        "",
        "| --augment K | head trained on | " + " | ".join(f"N = {n}" for n in curve) + " |",
        "| ---: | --- |" + " ---: |" * len(curve),
    ]
    for run in runs:
        for protocol, words in (("linear", "clean views"), ("linear+views", "every view")):
            cells = [run["curve"].get(f"{protocol}@{n}") for n in curve]
            if all(cell is None for cell in cells):
                continue
            lines.append(
                f"| {run['views']} | {words} | " + " | ".join(_cell(c) for c in cells) + " |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
