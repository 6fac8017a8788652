"""On a GPU: the same tars through ``--decode cpu`` and ``--decode gpu`` on CUDA, against the CPU.

    python scripts/gpu_archives.py --images 16384 --per-tar 1024

Builds tars of real-photo JPEGs (500x375; at most 2,048 different ones, repeated) in a temporary
folder, extracts ResNet-50 features three ways (CPU fp32 on the first ``--cpu-images``; CUDA with
``--decode cpu``; CUDA with ``--decode gpu``, both fp16 by default) and prints images/s and the
largest relative difference of each CUDA run from the CPU run. Random weights: nothing is
downloaded.

The steady figure is timed from a run's first batch, so ``--images`` must give at least
:data:`MIN_BATCHES` batches of 256 (CUDA's default batch) after it: 16,384 images make 64. Up to
``workers x prefetch`` batches were decoded while the first one waited for the model, so fewer
batches would overstate the steady rate (16 batches once gave 11,499 img/s on an H100).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from featx import ExtractConfig, extract  # noqa: E402
from tests.archives import jpeg, webdataset  # noqa: E402

CUDA_BATCH = 256  # featx's batch size on CUDA
MIN_BATCHES = 60  # batches timed after the first, at least
DISTINCT = 2048  # different JPEGs made; more images repeat them


def photos(count: int) -> list[bytes]:
    import skimage.data as data
    from PIL import Image

    sources = [data.chelsea(), data.coffee(), data.rocket(), data.astronaut()]
    out = []
    for i in range(min(count, DISTINCT)):
        array = sources[i % 4]
        h, w = array.shape[:2]
        top, left = (i * 7) % (h // 4), (i * 13) % (w // 4)
        crop = Image.fromarray(array[top : top + 3 * h // 4, left : left + 3 * w // 4])
        out.append(jpeg(np.asarray(crop.resize((500, 375)))))
    return [out[i % len(out)] for i in range(count)]  # repeats share their bytes


def build_tars(folder: Path, jpegs: list[bytes], count: int, per_tar: int) -> list[str]:
    """``count`` images in WebDataset tars of ``per_tar`` under ``folder`` (img2dataset's
    layout: ``00000.tar`` …), ``jpegs`` repeated in order as needed; returns the row names."""
    if not jpegs:
        raise ValueError("no JPEGs to put in tars")
    return webdataset(folder, [jpegs[i % len(jpegs)] for i in range(count)], per_tar=per_tar)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16384)
    parser.add_argument("--per-tar", type=int, default=1024)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--cpu-images", type=int, default=256, help="compared on the CPU")
    args = parser.parse_args()
    # batches never mix two tars: each full tar's, then the last one's
    full_tars, rest = divmod(args.images, args.per_tar)
    batches = full_tars * -(-args.per_tar // CUDA_BATCH) + -(-rest // CUDA_BATCH)
    if batches - 1 < MIN_BATCHES:
        parser.error(
            f"--images {args.images} with --per-tar {args.per_tar} makes {batches} batches of "
            f"{CUDA_BATCH}: at least {MIN_BATCHES} must follow the first"
        )
    with tempfile.TemporaryDirectory() as tmp:
        folder, cpu_folder = Path(tmp) / "tars", Path(tmp) / "cpu-tars"
        images = photos(args.images)
        build_tars(folder, images, args.images, args.per_tar)
        # the first --cpu-images of the same images, in the same order, for the CPU reference
        webdataset(cpu_folder, images[: args.cpu_images], per_tar=args.cpu_images)
        base = ExtractConfig(model=args.model, weights="none", progress=False, quiet=True)
        runs = {
            "cuda, --decode cpu": base.replace(device="cuda", decode="cpu"),
            "cuda, --decode gpu": base.replace(device="cuda", decode="gpu"),
        }
        extract(cpu_folder, Path(tmp) / "cpu.h5", base.replace(device="cpu", batch_size=64))
        with h5py.File(Path(tmp) / "cpu.h5") as f:
            reference = f["features/flatten"][:]
        print(
            f"{args.images} JPEGs 500x375 in tars of {args.per_tar}, {args.model}, "
            f"{batches} batches of {CUDA_BATCH} ({batches - 1} timed)"
        )
        for name, config in runs.items():
            out = Path(tmp) / f"{name.replace(' ', '_').replace(',', '')}.h5"
            started = time.perf_counter()
            result = extract(folder, out, config)
            elapsed = time.perf_counter() - started
            with h5py.File(out) as f:
                got = f["features/flatten"][: len(reference)]
                assert f["paths"].shape[0] == args.images and not len(f["failed/paths"])
            scale = np.abs(reference).max()
            diff = np.abs(got - reference).max() / scale
            print(
                f"| {name} | {result.steady_images_per_second:,.0f} img/s steady | "
                f"{args.images / elapsed:,.0f} img/s with start-up | max diff from CPU fp32: "
                f"{diff:.1e} of the largest feature |"
            )


if __name__ == "__main__":
    main()
