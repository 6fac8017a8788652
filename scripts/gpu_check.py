"""One command for anyone with a GPU: the gpu-marked tests, then the throughput table.

    python scripts/gpu_check.py                       # on a CUDA machine: tests + table
    python scripts/gpu_check.py --skip-tests --images 2000
    python scripts/gpu_check.py --device cpu --model resnet18 --image-size 64 --skip-tests
                                                      # a dry run of the table on a CPU

1. ``pytest -m gpu``: fp16, workers, nvJPEG edge files (EXIF-rotated, gray, corrupt,
   truncated), neighbours in a batch, compile, and a 2-rank torchrun where 2 GPUs exist;
2. ``featx bench --json`` (each in a fresh process) on JPEGs of 500x375: ``--decode cpu`` and
   ``gpu`` at batch 64 and 256, fp16: end to end, the model alone, decode alone (CPU per worker
   x workers, and GPU decode as its own stage), the writer's share, peak GPU memory;
3. prints it all as Markdown, with the machine and versions, and the issue's goals: end to end
   >= 85% of min(decode ceiling, model ceiling); ResNet-50 at 224 px from JPEGs >= 5,000 img/s
   on one H100 with --decode gpu; writer <= 5% of wall time.

Paste the output into the README's "Throughput" section.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import make_images  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--images", type=int, default=1024, help="distinct JPEGs to bench on")
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--folder", type=Path, default=None, help="reuse JPEGs made here")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: nothing to check (try --device cpu for a dry run)")
        return 2
    print(machine(args.device))
    tests_ok = True
    if not args.skip_tests:
        print("\n## gpu-marked tests\n")
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "tests/"], cwd=ROOT
        )
        tests_ok = done.returncode == 0
        print(f"\ngpu-marked tests: {'passed' if tests_ok else 'FAILED'}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_images(args.folder or Path(tmp) / "jpegs", args.images)
        rows = []
        decodes = ["cpu", "gpu"] if args.device.startswith("cuda") else ["cpu"]
        for decode in decodes:
            for batch in (int(b) for b in args.batches.split(",")):
                rows.append(bench(folder, args, decode, batch))
    print(table(rows, args))
    return 0 if tests_ok else 1


def machine(device: str) -> str:
    import h5py
    import torch
    import torchvision

    import featx

    lines = ["## machine", ""]
    if device.startswith("cuda"):
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            lines.append(f"- GPU {index}: {props.name}, {props.total_memory / 2**30:.0f} GiB")
        lines.append(f"- CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    lines.append(f"- CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    lines.append(
        f"- Python {platform.python_version()}, torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, h5py {h5py.__version__}, featx {featx.__version__}"
    )
    return "\n".join(lines)


def bench(folder: Path, args: argparse.Namespace, decode: str, batch: int) -> dict:
    """One ``featx bench --json`` in a fresh process (clean peak memory, fresh CUDA context)."""
    command = [
        sys.executable, "-m", "featx", "bench", str(folder), "--model", args.model,
        "--device", args.device, "--decode", decode, "--batch-size", str(batch),
        "--limit", str(args.images), "--json",
    ]  # fmt: skip
    if args.device.startswith("cuda"):
        command += ["--precision", "fp16"]
    if args.image_size:
        command += ["--image-size", str(args.image_size)]
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        return {"decode": decode, "batch_size": batch, "error": done.stderr.strip()[-300:]}
    return json.loads(done.stdout)


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"\n## throughput: {args.model} from JPEG files (500x375), {args.device}\n",
        "| decode | batch | workers | end to end img/s | model alone | CPU decode ceiling "
        "(per worker) | GPU decode | e2e / min ceiling | writer share | peak GPU MB | "
        "bottleneck |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['decode']} | {row['batch_size']} | failed: {row['error']} |")
            continue
        lines.append(
            f"| {row['decode']} | {row['batch_size']} | {row['workers']} "
            f"| {row['end_to_end_images_per_second']:,.0f} | {row['model_images_per_second']:,.0f} "
            f"| {row['decode_ceiling_images_per_second']:,.0f} "
            f"({row['decode_images_per_second_per_worker']:,.0f}) "
            f"| {_number(row['gpu_decode_images_per_second'])} "
            f"| {row['end_to_end_vs_ceiling']:.2f} | {row['writer_share_of_wall_time']:.1%} "
            f"| {_number(row['peak_gpu_memory_mb'])} | {row['bottleneck']} |"
        )
    good = [row for row in rows if "error" not in row]
    if good:
        lines += ["", "goals:"]
        best = max(good, key=lambda row: row["end_to_end_images_per_second"])
        share = max(row["writer_share_of_wall_time"] for row in good)
        lines.append(
            f"- end to end >= 85% of min(decode, model ceiling): "
            f"{all(row['end_to_end_vs_ceiling'] >= 0.85 for row in good)} "
            f"(lowest {min(row['end_to_end_vs_ceiling'] for row in good):.2f})"
        )
        lines.append(
            f"- ResNet-50 >= 5,000 img/s with --decode gpu (on one H100): best "
            f"{best['end_to_end_images_per_second']:,.0f} img/s ({best['decode']}, "
            f"batch {best['batch_size']})"
        )
        lines.append(f"- writer <= 5% of wall time: {share <= 0.05} (highest {share:.1%})")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


if __name__ == "__main__":
    sys.exit(main())
