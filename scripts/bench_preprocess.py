"""CPU preprocessing per core: featx's decode + resize + crop against the plain torchvision limit.

    python scripts/bench_preprocess.py                  # 200 JPEGs of 500x375, 224 crop, 5 rounds
    python scripts/bench_preprocess.py --images 400 --rounds 7 --json

Every DataLoader worker runs one thread, so images/s on one core is what one worker feeds the
model. Both loops read the same files from disk in this one process with one thread, round by
round alternately (this machine is shared and noisy: only the ratio within a round is taken):

* limit: ``torchvision.io.decode_jpeg`` + ``transforms.v2.functional.resize`` on uint8
  (antialiased bilinear, torchvision's native uint8 kernel) + ``center_crop``: no checks at all;
* featx: ``featx.data.decode.load_image`` (what a worker runs: the regular-file check, the
  header and pixel-limit check, EXIF orientation, the uint8 resize and crop).

Prints images/s of each and the ratio featx / limit (the issue's goal: >= 0.8).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import make_images  # noqa: E402

TRANSFORM = {"resize": 256, "crop": 224, "interpolation": "bilinear", "antialias": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--folder", type=Path, default=None, help="reuse JPEGs made here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)  # one worker, one core
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_images(args.folder or Path(tmp) / "jpegs", args.images)
        files = sorted(str(path) for path in folder.glob("*.jpg"))[: args.images]
        loops = {"limit": limit_loop, "featx": featx_loop}
        for loop in loops.values():
            loop(files[:8])  # warm-up: imports, codec tables
        rates: dict[str, list[float]] = {name: [] for name in loops}
        for _ in range(args.rounds):
            for name, loop in loops.items():
                started = time.perf_counter()
                loop(files)
                rates[name].append(len(files) / (time.perf_counter() - started))
    ratios = [f / lim for f, lim in zip(rates["featx"], rates["limit"], strict=True)]
    report = {
        "images": len(files),
        "rounds": args.rounds,
        "limit_images_per_second": round(statistics.median(rates["limit"]), 1),
        "featx_images_per_second": round(statistics.median(rates["featx"]), 1),
        "featx_vs_limit": round(statistics.median(ratios), 3),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
    }
    if args.json:
        print(json.dumps(report))
        return
    limit, featx = report["limit_images_per_second"], report["featx_images_per_second"]
    print("| loop (one thread, 500x375 JPEG → 224 crop) | img/s |")
    print("| --- | ---: |")
    print(f"| decode_jpeg + v2 uint8 resize + crop (the limit) | {limit} |")
    print(f"| featx `load_image` (one worker) | {featx} |")
    print(f"\nfeatx / limit: {report['featx_vs_limit']} (median of {args.rounds} rounds)")


def limit_loop(files: list[str]) -> None:
    from torchvision.io import decode_jpeg, read_file
    from torchvision.transforms.v2 import functional as F

    for path in files:
        image = decode_jpeg(read_file(path))
        image = F.resize(image, [TRANSFORM["resize"]], antialias=True)
        F.center_crop(image, [TRANSFORM["crop"]])


def featx_loop(files: list[str]) -> None:
    from featx.data.decode import DecodePolicy, load_image

    policy = DecodePolicy(TRANSFORM)
    for path in files:
        load_image(path, policy)


if __name__ == "__main__":
    main()
