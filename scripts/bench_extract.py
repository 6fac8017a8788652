"""Throughput and memory of featx extract against the loops people write by hand.

    python scripts/bench_extract.py                       # ResNet-50, default layer, batch 32
    python scripts/bench_extract.py --model resnet18 --images 400 --rounds 3
    python scripts/bench_extract.py --rss 1000,20000 --model resnet18 --image-size 64

Every method runs in its own fresh subprocess (clean peak RSS, no warm caches shared), and the
methods alternate round by round, so the ratios are taken side by side on this noisy machine:

* model:      the cut model alone on pre-made tensors (same batch, channels_last): the ceiling
* tutorial:   the per-image loop of a tutorial: PIL open, weights.transforms(), batch of one
* dataloader: a plain DataLoader (PIL + transforms in workers), batched, channels_last
* featx:      featx.extract(), writing the HDF5 file

Prints a markdown table (img/s median, peak RSS) and the ratios featx / each other method.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("model", "tutorial", "dataloader", "featx")


def make_images(folder: Path, count: int, size: tuple[int, int] = (500, 375)) -> Path:
    """``count`` JPEGs of photo size, cut from scikit-image's photos (or noise without it)."""
    import numpy as np
    from PIL import Image

    try:
        import skimage.data as data

        photos = [data.chelsea(), data.coffee(), data.rocket(), data.astronaut()]
    except ImportError:
        photos = [
            np.random.default_rng(i).integers(0, 255, (600, 800, 3), np.uint8) for i in range(4)
        ]
    folder.mkdir(parents=True, exist_ok=True)
    existing = len(list(folder.glob("*.jpg")))
    for i in range(existing, count):
        photo = Image.fromarray(photos[i % len(photos)])
        angle = (i * 37) % 360
        image = photo.rotate(angle, expand=False).resize(size)
        image.save(folder / f"img{i:06d}.jpg", quality=90)
    return folder


def run_method(method: str, source: Path, args: argparse.Namespace) -> dict:
    """Run one method in this process; returns its numbers."""
    import torch
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    from featx import ExtractConfig, extract
    from featx.config import default_workers
    from featx.models import load_backbone

    files = sorted(source.glob("*.jpg"))[: args.images]
    backbone = load_backbone(args.model, "none", args.image_size)
    layer = backbone.default_layer()
    crop = backbone.transform["crop"]
    started = time.perf_counter()
    if method == "featx":
        with tempfile.TemporaryDirectory() as tmp:
            subset = Path(tmp) / "subset"
            subset.mkdir()
            for path in files:
                (subset / path.name).symlink_to(path)
            started = time.perf_counter()
            extract(
                subset,
                Path(tmp) / "f.h5",
                ExtractConfig(
                    model=args.model,
                    weights="none",
                    image_size=args.image_size,
                    batch_size=args.batch_size,
                    progress=False,
                ),
            )
    else:
        model = create_feature_extractor(backbone.model, {layer: "out"}).eval()
        model = model.to(memory_format=torch.channels_last)
        entry = torchvision.models.get_model_weights(args.model).DEFAULT
        preset = entry.transforms()
        if args.image_size:
            from torchvision.transforms._presets import ImageClassification

            resize = round(args.image_size * preset.resize_size[0] / preset.crop_size[0])
            preset = ImageClassification(crop_size=args.image_size, resize_size=resize)
        with torch.inference_mode():
            if method == "model":
                batch = torch.randn(args.batch_size, 3, crop, crop).contiguous(
                    memory_format=torch.channels_last
                )
                model(batch)  # warm-up, as the other methods' first batch is
                started = time.perf_counter()
                for _ in range(0, len(files), args.batch_size):
                    model(batch)
            elif method == "tutorial":
                from PIL import Image

                for path in files:
                    image = Image.open(path).convert("RGB")
                    model(preset(image).unsqueeze(0))["out"].flatten(1).numpy()
            elif method == "dataloader":
                from PIL import Image

                class Files(torch.utils.data.Dataset):
                    def __len__(self) -> int:
                        return len(files)

                    def __getitem__(self, i: int):
                        return preset(Image.open(files[i]).convert("RGB"))

                loader = torch.utils.data.DataLoader(
                    Files(), batch_size=args.batch_size, num_workers=default_workers()
                )
                for batch in loader:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                    model(batch)["out"].flatten(1).numpy()
    seconds = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "method": method,
        "images": len(files),
        "seconds": seconds,
        "images_per_second": len(files) / seconds,
        "peak_rss_mb": peak_kb / 1024,
    }


def in_subprocess(method: str, source: Path, args: argparse.Namespace, images: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--one",
        method,
        "--source",
        str(source),
        "--model",
        args.model,
        "--batch-size",
        str(args.batch_size),
        "--images",
        str(images),
    ]
    if args.image_size:
        command += ["--image-size", str(args.image_size)]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--source", type=Path, default=None)
    parser.add_argument("--rss", default=None, help="N1,N2: featx peak RSS at two dataset sizes")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        print(json.dumps(run_method(args.one, args.source, args)))
        return
    source = args.source or Path(tempfile.gettempdir()) / "featx-bench-images"
    import torch

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    if args.rss:
        sizes = [int(n) for n in args.rss.split(",")]
        make_images(source, max(sizes), size=(160, 120))
        rows = [in_subprocess("featx", source, args, n) for n in sizes]
        print("\n| images | img/s | peak RSS MB |\n| ---: | ---: | ---: |")
        for row in rows:
            print(
                f"| {row['images']} | {row['images_per_second']:.1f} | {row['peak_rss_mb']:.0f} |"
            )
        growth = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"] - 1
        print(f"\npeak RSS growth {sizes[0]} → {sizes[-1]} images: {growth:+.1%}")
        return

    make_images(source, args.images)
    methods = args.methods.split(",")
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for round_ in range(args.rounds):
        order = methods if round_ % 2 == 0 else list(reversed(methods))
        for method in order:
            results[method].append(in_subprocess(method, source, args, args.images))
            last = results[method][-1]
            print(
                f"round {round_ + 1} {method:<10} {last['images_per_second']:8.2f} img/s",
                file=sys.stderr,
            )
    speed = {m: statistics.median(r["images_per_second"] for r in results[m]) for m in methods}
    label = f"{args.model}, default layer, batch {args.batch_size}"
    if args.image_size:
        label += f", {args.image_size} px"
    print(f"\n{label}, {args.images} JPEGs (500x375), median of {args.rounds} rounds\n")
    print("| method | img/s | peak RSS MB | featx / method |\n| --- | ---: | ---: | ---: |")
    for m in methods:
        rss = max(r["peak_rss_mb"] for r in results[m])
        ratio = speed.get("featx", 0) / speed[m] if speed[m] else float("nan")
        print(f"| {m} | {speed[m]:.2f} | {rss:.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
