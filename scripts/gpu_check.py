"""One command on a GPU machine: the gpu-marked tests, the GPU stages, end-to-end runs, one table.

    python scripts/gpu_check.py                        # CUDA: everything, within --budget-s (420)
    python scripts/gpu_check.py --skip-tests --json /tmp/r.json
    python scripts/gpu_check.py --device cpu --model resnet18 --image-size 64 --images 64 \\
        --skip-tests --json /tmp/x.json               # a dry run of every path CUDA does not need

Made to fit one command of at most 8 minutes on a 16-core H100/H200 with no network (random
weights: nothing is downloaded). Every part runs in a child process of its own (a fresh CUDA
context, clean peak memory) under a time box; a part's box is its share of ``--budget-s`` plus
whatever the parts before it left unused, and a part that would not fit is skipped and named:

1. ``pytest -m gpu -q -n 0`` (the rest of the budget after the boxes below);
2. stages, on a batch of ``--images`` JPEGs encoded as featx's workers encode them: the model
   eager (fp16 on CUDA) and CUDA-graphed (not built in featx yet: reported so); bare nvJPEG;
   featx's decode + resize on the device (``on_device``); resize methods with pixel checks
   (per-image ``resize_crop`` and ``grouped_resize_crop`` must be bit-identical on the device;
   a padded-batch kernel is not built);
3. the race test (tests/test_gpu_path.py): a decode queued behind a long kernel must give a
   quiet decode's pixels;
4. end-to-end runs, loose files and WebDataset tars, ``--decode cpu`` and ``gpu`` (``hybrid`` is
   reported as not built until featx has it), the default shard size, each long enough to hold
   ``--steady-images`` (20,480 on CUDA) in steady state: the rate is taken over the run's last
   batches that hold that many images, after the batches the workers decoded ahead while the
   model started (the two halves of that window are compared: ``steady`` says whether they
   agree within 10%). Files go through ``featx.bench.bench`` (decode ceiling, GPU decode
   ceiling, model ceiling, writer share); tars through ``featx.extract``, their ceiling taken
   from the files run of the same decode (the same JPEG bytes). ``nvidia-smi`` samples SM,
   video-decoder and, where the driver reports it, JPEG-engine utilisation every 500 ms during
   each run (skipped, and said so, where nvidia-smi is missing).

Prints one Markdown table (machine, versions, every figure with its ceiling and ratio); writes
the same as JSON (``--json FILE``; on CUDA by default
``scripts/gpu_results/YYYY-MM-DD-<gpu>.json``): ``date``, ``machine``, ``versions``,
``race_test_passed``, ``runs`` (each with ``source``, ``decode``, ``images``,
``end_to_end_images_per_second``, ``ceiling_images_per_second``, ``writer_share_of_wall_time``
and more), plus ``tests``, ``stages`` and ``budget``. Exit status 0 when everything that ran
passed, 1 otherwise, 2 without a CUDA device on ``--device cuda``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
for _path in (str(ROOT), str(SCRIPTS)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

MARK = "GPUCHECK "  # a child's result lines on its stdout
STEADY_IMAGES_CUDA = 20480
PER_TAR = 4096  # images per tar (a multiple of CUDA's batch of 256: no partial batches)
RACE_TEST = (
    "tests/test_gpu_path.py::test_a_decode_queued_behind_a_long_kernel_gives_a_quiet_decodes_pixels"
)
RACE_HARNESS_CPU = "tests/test_gpu_path.py::test_the_queued_decode_harness_on_the_cpu"
DECODES = ("cpu", "gpu", "hybrid")
SOURCES = ("files", "tars")
# Seconds each part may take on a 16-core H100/H200 (about twice what it should need); the
# gpu-marked tests get what is left of the budget.
BOXES = {
    "stages": 35,
    "race": 35,
    "build tars": 25,
    "files cpu": 55,
    "files gpu": 60,
    "files hybrid": 60,
    "tars cpu": 40,
    "tars gpu": 45,
    "tars hybrid": 45,
}
MIN_TESTS_S = 30  # fewer seconds than this left for the tests: skipped


# --- the parent: plan, run each part in a child, report ------------------------------------


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse(argv)
    if args.stage:
        return child_main(args)
    import torch

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("no CUDA device here: nothing to check (try --device cpu for a dry run)")
        return 2
    report = Report(args, started)
    report.machine, report.versions = machine(args.device), versions(args.device, args.nvidia_smi)
    gpu, cores = report.machine["gpu"] or "no GPU", report.machine["cores"]
    say(f"{gpu}, {cores} cores; budget {args.budget_s:.0f} s")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        from bench_extract import make_images

        folder = make_images(args.folder or work / "jpegs", args.images)
        folder_files = sorted(folder.glob("*.jpg"))[: args.images]
        if args.folder and len(folder_files) > args.images:  # bench one exact set of files
            folder = work / "subset"
            folder.mkdir()
            for path in folder_files:
                (folder / path.name).symlink_to(path)
        plan = planned_parts(args)
        report.plan = plan
        if not args.skip_tests:
            report.tests = run_tests(args, report, plan)
        else:
            report.tests = {"status": "skipped (--skip-tests)"}
        report.stages = run_stages(args, report, plan, folder)
        report.race = run_race(args, report, plan)
        report.runs = run_end_to_end(args, report, plan, folder, work)
    markdown = report.table()
    print(markdown)
    document = report.as_json()
    target = args.json or (default_json_path(report.machine) if cuda else None)
    if target:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(document, indent=2) + "\n")
        print(f"\nJSON: {target}")
    else:
        print("\nJSON: not written (give --json FILE; on CUDA it defaults to scripts/gpu_results/)")
    return 0 if report.all_passed() else 1


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument(
        "--images", type=int, default=1024, help="distinct JPEGs (500x375), repeated as needed"
    )
    parser.add_argument("--folder", type=Path, default=None, help="make or reuse JPEGs here")
    parser.add_argument("--budget-s", type=float, default=420.0, help="seconds for everything")
    parser.add_argument(
        "--steady-images",
        type=int,
        default=None,
        help=f"images timed steady per run ({STEADY_IMAGES_CUDA} on CUDA, else 2x --images)",
    )
    parser.add_argument("--per-tar", type=int, default=PER_TAR)
    parser.add_argument(
        "--min-seconds", type=float, default=None, help="per timed stage (1 on CUDA, else 0.3)"
    )
    parser.add_argument("--nvidia-smi", default="nvidia-smi", help="the nvidia-smi to sample")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    # a child's part (internal)
    parser.add_argument("--stage", choices=("kernels", "run", "build-tars"), help=argparse.SUPPRESS)
    parser.add_argument("--source", choices=SOURCES, help=argparse.SUPPRESS)
    parser.add_argument("--decode", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--total", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--tars", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=math.inf, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.steady_images is None:
        args.steady_images = STEADY_IMAGES_CUDA if cuda else 2 * args.images
    if args.min_seconds is None:
        args.min_seconds = 1.0 if cuda else 0.3
    return args


def say(line: str) -> None:
    print(f"[gpu_check] {line}", file=sys.stderr, flush=True)


class Report:
    def __init__(self, args: argparse.Namespace, started: float) -> None:
        self.args, self.started = args, started
        self.machine: dict[str, Any] = {}
        self.versions: dict[str, Any] = {}
        self.plan: list[str] = []
        self.tests: dict[str, Any] = {}
        self.stages: list[dict[str, Any]] = []
        self.race: dict[str, Any] = {}
        self.runs: list[dict[str, Any]] = []
        self.skipped: list[str] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def box(self, part: str, plan: list[str]) -> float:
        """Seconds ``part`` may take now: the budget left, less the boxes of the parts after it."""
        later = plan[plan.index(part) + 1 :] if part in plan else []
        left = self.args.budget_s - self.elapsed() - sum(BOXES.get(p, 0) for p in later)
        return max(0.0, left)

    def fits(self, part: str, plan: list[str], needs: float) -> float | None:
        """The time box for ``part``, or None (and the skip recorded) when it would not fit."""
        box = self.box(part, plan)
        if box >= needs:
            return box
        left = self.args.budget_s - self.elapsed()
        self.skipped.append(
            f"{part}: skipped, would not fit ({box:.0f} s of the budget for it, "
            f"{left:.0f} s left in all, needs ~{needs:.0f} s)"
        )
        say(self.skipped[-1])
        return None

    def race_passed(self) -> bool | None:
        return self.race.get("passed")

    def all_passed(self) -> bool:
        failed_stage = any(s.get("status") == "failed" for s in self.stages)
        failed_run = any(r.get("status") == "failed" for r in self.runs)
        return (
            self.tests.get("status") in ("passed", "skipped (--skip-tests)")
            and self.race_passed() is not False
            and not failed_stage
            and not failed_run
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "date": datetime.date.today().isoformat(),
            "machine": self.machine,
            "versions": self.versions,
            "race_test_passed": self.race_passed(),
            "runs": self.runs,
            "device": self.args.device,
            "model": self.args.model,
            "image_size": self.args.image_size,
            "tests": self.tests,
            "race_test": self.race,
            "stages": self.stages,
            "budget": {
                "budget_s": self.args.budget_s,
                "elapsed_s": round(self.elapsed(), 1),
                "boxes_s": {p: BOXES.get(p) for p in self.plan},
                "skipped": self.skipped,
            },
        }

    def table(self) -> str:
        m, v = self.machine, self.versions
        rows = [
            "| part | figure | ceiling | ratio | notes |",
            "| --- | ---: | ---: | ---: | --- |",
            f"| machine | {m['gpu'] or 'no GPU'} | | | {m['cores']} cores, {m['cpu']}; "
            f"{m.get('gpu_memory_gib') or '-'} GiB; driver {v.get('driver') or '-'} |",
            "| versions | featx "
            + f"{v['featx']} ({v.get('commit') or '?'}) | | | "
            + ", ".join(
                f"{k} {v[k]}"
                for k in ("python", "torch", "torchvision", "cuda", "cudnn", "h5py", "pillow")
                if v.get(k)
            )
            + " |",
            f"| gpu-marked tests | {self.tests.get('status')} | | | "
            f"{cell(self.tests.get('summary'))} |",
        ]
        for stage in self.stages:
            ceiling = stage.get("ceiling_images_per_second")
            rows.append(
                f"| {stage['name']} | {figure(stage)} | {number(ceiling)} "
                f"| {ratio(stage.get('images_per_second'), ceiling)} | {cell(stage.get('note'))} |"
            )
        race = self.race
        rows.append(f"| race test | {race.get('status')} | | | {cell(race.get('note'))} |")
        for run in self.runs:
            rows.append(
                f"| end to end: {run['source']}, --decode {run['decode']} "
                f"| {run_figure(run)} | {number(run['ceiling_images_per_second'])} "
                f"| {ratio(run['end_to_end_images_per_second'], run['ceiling_images_per_second'])} "
                f"| {cell(run_notes(run))} |"
            )
        for line in self.skipped:
            rows.append(f"| budget | skipped | | | {cell(line)} |")
        rows.append(
            f"| budget | {self.elapsed():.0f} s of {self.args.budget_s:.0f} s | | "
            f"| {self.args.model}, {self.args.image_size or 'default'} px, {self.args.device} |"
        )
        where = m["gpu"] or self.args.device
        title = f"## gpu_check {datetime.date.today().isoformat()}: {self.args.model} on {where}"
        return "\n".join([title, "", *rows])


def figure(stage: dict[str, Any]) -> str:
    if stage.get("images_per_second") is not None:
        return f"{stage['images_per_second']:,.0f} img/s"
    return str(stage.get("status"))


def run_figure(run: dict[str, Any]) -> str:
    if run["end_to_end_images_per_second"] is not None:
        return f"{run['end_to_end_images_per_second']:,.0f} img/s"
    return str(run.get("status"))


def run_notes(run: dict[str, Any]) -> str:
    if run.get("note") and run["end_to_end_images_per_second"] is None:
        return run["note"]
    parts = [f"{run['images']:,} images"]
    if run.get("steady_window_images") is not None:
        parts.append(
            f"steady over the last {run['steady_window_images']:,} "
            f"({'halves agree' if run.get('steady') else 'halves differ >10%'})"
        )
    if run["writer_share_of_wall_time"] is not None:
        parts.append(f"writer {run['writer_share_of_wall_time']:.1%}")
    ceilings = [
        f"{name} {number(run.get(key))}"
        for name, key in (
            ("decode", "decode_ceiling_images_per_second"),
            ("GPU decode", "gpu_decode_images_per_second"),
            ("model", "model_images_per_second"),
        )
        if run.get(key) is not None
    ]
    if ceilings:
        parts.append("ceilings: " + ", ".join(ceilings))
    util = run.get("utilisation")
    if util:
        for name, key in (("SM", "sm"), ("NVDEC", "decoder"), ("NVJPG", "jpeg")):
            if util.get(f"{key}_percent_mean") is not None:
                mean, most = util[f"{key}_percent_mean"], util[f"{key}_percent_max"]
                parts.append(f"{name} {mean:.0f}% mean / {most:.0f}% max")
    elif run.get("utilisation_note"):
        parts.append(run["utilisation_note"])
    if run.get("note"):
        parts.append(run["note"])
    return "; ".join(parts)


def number(value: float | None) -> str:
    return "" if value is None else f"{value:,.0f}"


def ratio(value: float | None, ceiling: float | None) -> str:
    return "" if value is None or not ceiling else f"{value / ceiling:.2f}"


def cell(text: Any) -> str:
    return "" if text is None else str(text).replace("|", "/").replace("\n", " ")


def planned_parts(args: argparse.Namespace) -> list[str]:
    """The parts in order, as named in :data:`BOXES`; runs that cannot happen are left out."""
    parts = ["tests", "stages", "race"]
    for source in SOURCES:
        if source == "tars":
            parts.append("build tars")
        parts += [f"{source} {decode}" for decode in DECODES if runnable(decode, args)[0]]
    return parts


def runnable(decode: str, args: argparse.Namespace) -> tuple[bool, str]:
    from featx.config import DECODES as BUILT

    if decode not in BUILT:
        return False, "not built"
    if decode in ("gpu", "hybrid") and not args.device.startswith("cuda"):
        return False, "needs CUDA"
    return True, ""


def child_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "FEATX_OFFLINE": "1"}


def run_child(command: list[str], timeout: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run ``command`` in its own process group, killed whole at ``timeout`` seconds; its
    result lines (:data:`MARK`) and how it ended."""
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
        start_new_session=True,
    )
    timed_out = False
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGKILL)  # the child, its DataLoader workers and writer
        out, err = process.communicate()
    records = [json.loads(line[len(MARK) :]) for line in out.splitlines() if line.startswith(MARK)]
    ended = {
        "rc": process.returncode,
        "timed_out": timed_out,
        "seconds": round(time.monotonic() - started, 1),
        "stdout_tail": "\n".join(l for l in out.splitlines() if not l.startswith(MARK))[-1500:],  # noqa: E741
        "stderr_tail": err[-1500:],
    }
    return records, ended


def script(*args: str, parent: argparse.Namespace, deadline: float) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), *args]
    command += ["--device", parent.device, "--model", parent.model, "--images", str(parent.images)]
    command += ["--min-seconds", str(parent.min_seconds), "--nvidia-smi", parent.nvidia_smi]
    command += ["--deadline", str(deadline), "--per-tar", str(parent.per_tar)]
    if parent.image_size:
        command += ["--image-size", str(parent.image_size)]
    return command


def failure_note(ended: dict[str, Any]) -> str:
    if ended["timed_out"]:
        return f"timed out after {ended['seconds']:.0f} s (its box)"
    lines = [line for line in ended["stderr_tail"].splitlines() if line.strip()]
    return f"exit {ended['rc']}: {lines[-1][-300:] if lines else 'no message'}"


def pytest_command(*args: str) -> list[str]:
    """pytest in one process (no xdist), quiet, skips reported, no cache written."""
    return [sys.executable, "-m", "pytest", "-q", "-n", "0", "-rs", "-p", "no:cacheprovider", *args]


def run_tests(args: argparse.Namespace, report: Report, plan: list[str]) -> dict[str, Any]:
    box = report.fits("tests", plan, MIN_TESTS_S)
    if box is None:
        return {"status": "skipped (would not fit the budget)"}
    say(f"gpu-marked tests (box {box:.0f} s)")
    command = pytest_command("-m", "gpu", "tests/")
    _, ended = run_child(command, box)
    summary = pytest_summary(ended["stdout_tail"])
    if ended["timed_out"]:
        status = f"timed out after {ended['seconds']:.0f} s"
    elif ended["rc"] in (0, 5):  # 5: nothing collected
        status = "passed"
    else:
        status = "FAILED"
    say(f"gpu-marked tests: {status} ({summary})")
    if status != "passed":
        print(ended["stdout_tail"], file=sys.stderr)
    return {"status": status, "summary": summary, "seconds": ended["seconds"]}


def pytest_summary(output: str) -> str:
    lines = [
        line.strip("= ")
        for line in output.splitlines()
        if re.search(r"\d+ (passed|failed|skipped|error|deselected)|no tests ran", line)
    ]
    return lines[-1] if lines else "no summary"


def run_stages(
    args: argparse.Namespace, report: Report, plan: list[str], folder: Path
) -> list[dict[str, Any]]:
    box = report.fits("stages", plan, BOXES["stages"] / 2)
    if box is None:
        return [{"name": "stages", "status": "skipped (would not fit the budget)"}]
    say(f"stages: model, nvJPEG, decode + resize, resize pixel checks (box {box:.0f} s)")
    deadline = time.time() + box - 3
    records, ended = run_child(
        script("--stage", "kernels", "--folder", str(folder), parent=args, deadline=deadline), box
    )
    if ended["rc"] != 0 or ended["timed_out"]:
        records.append({"name": "stages process", "status": "failed", "note": failure_note(ended)})
    for record in records:
        say(f"  {record['name']}: {figure(record)} {record.get('note') or ''}")
    return records


def run_race(args: argparse.Namespace, report: Report, plan: list[str]) -> dict[str, Any]:
    box = report.fits("race", plan, BOXES["race"] / 2)
    if box is None:
        return {"status": "skipped (would not fit the budget)", "passed": None}
    cuda = args.device.startswith("cuda")
    test = RACE_TEST if cuda else RACE_HARNESS_CPU
    say(f"race test {test.split('::')[1]} (box {box:.0f} s)")
    command = pytest_command(test)
    _, ended = run_child(command, box)
    summary = pytest_summary(ended["stdout_tail"])
    passed = ended["rc"] == 0 and "1 passed" in summary
    note = summary if not ended["timed_out"] else failure_note(ended)
    if not cuda:
        # on the CPU only the harness runs (CPU decoder, no long kernel): no GPU race checked
        status = f"not run on a GPU (its CPU harness {'passed' if passed else 'FAILED'})"
        result = {"status": status, "passed": None, "harness_passed": passed, "note": note}
    else:
        result = {"status": "passed" if passed else "FAILED", "passed": passed, "note": note}
    result["seconds"] = ended["seconds"]
    say(f"race test: {result['status']} ({note})")
    if not passed:
        print(ended["stdout_tail"], ended["stderr_tail"], file=sys.stderr)
    return result


def run_totals(args: argparse.Namespace) -> int:
    """Images per end-to-end run: twice the steady window plus the batches the workers decode
    ahead (featx's own feed rule), so the window starts after that backlog is spent."""
    import torch

    from featx.defaults import available_cores
    from featx.runtime.device import feed

    rule = feed(None, None, torch.device(args.device.split(":")[0]), available_cores())
    return 2 * args.steady_images + rule.workers * rule.prefetch * rule.batch_size


def empty_run(source: str, decode: str, status: str, note: str | None = None) -> dict[str, Any]:
    return {
        "source": source,
        "decode": decode,
        "images": None,
        "end_to_end_images_per_second": None,
        "ceiling_images_per_second": None,
        "writer_share_of_wall_time": None,
        "status": status,
        "note": note or status,
    }


def run_end_to_end(
    args: argparse.Namespace, report: Report, plan: list[str], folder: Path, work: Path
) -> list[dict[str, Any]]:
    total = run_totals(args)
    runs: list[dict[str, Any]] = []
    ceilings: dict[str, dict[str, Any]] = {}  # decode → the files run's ceilings
    tars: Path | None = None
    for source in SOURCES:
        if source == "tars":
            tars = build_tars(args, report, plan, folder, work, total)
        for decode in DECODES:
            ok, why = runnable(decode, args)
            part = f"{source} {decode}"
            if not ok:
                runs.append(empty_run(source, decode, why, f"--decode {decode}: {why}"))
                continue
            if source == "tars" and tars is None:
                runs.append(empty_run(source, decode, "skipped", "no tars were built"))
                continue
            box = report.fits(part, plan, BOXES[part] / 2)
            if box is None:
                runs.append(empty_run(source, decode, "skipped", "would not fit the budget"))
                continue
            say(f"end to end: {part}, {total:,} images (box {box:.0f} s)")
            extra = ["--source", source, "--decode", decode, "--total", str(total)]
            extra += ["--folder", str(folder), "--work", str(work)]
            extra += ["--steady-images", str(args.steady_images)]
            if tars is not None:
                extra += ["--tars", str(tars)]
            deadline = time.time() + box
            records, ended = run_child(
                script("--stage", "run", *extra, parent=args, deadline=deadline), box
            )
            if not records or ended["rc"] != 0:
                run = empty_run(source, decode, "failed", failure_note(ended))
                run["seconds"] = ended["seconds"]
                runs.append(run)
                say(f"  {part}: {run['note']}")
                print(ended["stderr_tail"], file=sys.stderr)
                continue
            run = records[-1]
            run["seconds"] = ended["seconds"]
            if source == "files":
                ceilings[decode] = run
            else:
                files_run = ceilings.get(decode)
                run["ceiling_from"] = "the files run of the same decode (same JPEG bytes)"
                if files_run is not None:
                    for key in (
                        "decode_ceiling_images_per_second",
                        "gpu_decode_images_per_second",
                        "model_images_per_second",
                        "ceiling_images_per_second",
                    ):
                        run[key] = files_run.get(key)
            run["end_to_end_vs_ceiling"] = (
                round(run["end_to_end_images_per_second"] / run["ceiling_images_per_second"], 3)
                if run.get("ceiling_images_per_second")
                else None
            )
            say(f"  {part}: {run_figure(run)}; {run_notes(run)}")
            runs.append(run)
    return runs


def build_tars(
    args: argparse.Namespace, report: Report, plan: list[str], folder: Path, work: Path, total: int
) -> Path | None:
    if not any(p.startswith("tars ") for p in plan):
        return None
    box = report.fits("build tars", plan, BOXES["build tars"] / 2)
    if box is None:
        return None
    tars = work / "tars"
    say(f"building {math.ceil(total / args.per_tar)} tars of {args.per_tar} (box {box:.0f} s)")
    command = script(
        "--stage", "build-tars", "--folder", str(folder), "--tars", str(tars),
        "--total", str(total), parent=args, deadline=time.time() + box,
    )  # fmt: skip
    records, ended = run_child(command, box)
    if ended["rc"] != 0 or not records:
        report.skipped.append(f"build tars: failed ({failure_note(ended)}): tars runs skipped")
        say(report.skipped[-1])
        return None
    return tars


def machine(device: str) -> dict[str, Any]:
    import torch

    from featx.defaults import available_cores

    info: dict[str, Any] = {
        "gpu": None,
        "cores": os.cpu_count(),
        "cores_available": available_cores(),
        "cpu": cpu_name(),
    }
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30)
        info["gpus"] = torch.cuda.device_count()
        info["gpu_uuid"] = gpu_uuid(index)
    return info


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_uuid(index: int) -> str | None:
    import torch

    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is None:
        return None
    text = str(uuid)
    return text if text.startswith("GPU-") else f"GPU-{text}"


def versions(device: str, nvidia_smi: str) -> dict[str, Any]:
    import h5py
    import PIL
    import torch
    import torchvision

    import featx

    found: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "h5py": h5py.__version__,
        "pillow": PIL.__version__,
        "featx": featx.__version__,
        "commit": git_commit(),
        "cuda": torch.version.cuda,
        "cudnn": None,
        "driver": None,
    }
    if device.startswith("cuda"):
        found["cudnn"] = torch.backends.cudnn.version()
        exe = shutil.which(nvidia_smi)
        if exe:
            done = subprocess.run(
                [exe, "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            )  # fmt: skip
            found["driver"] = done.stdout.strip().splitlines()[0] if done.stdout.strip() else None
    return found


def git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def default_json_path(info: dict[str, Any]) -> Path:
    name = slug(info.get("gpu") or "cpu")
    return SCRIPTS / "gpu_results" / f"{datetime.date.today().isoformat()}-{name}.json"


# --- nvidia-smi sampling ------------------------------------------------------------------


class Sampler:
    """``nvidia-smi --query-gpu=... -lms 500`` in the background: SM (``utilization.gpu``),
    video decoder (``utilization.decoder``) and, where the driver knows it, JPEG engine
    (``utilization.jpeg``: nvJPEG's hardware path runs there, not on the video decoder)."""

    FIELDS = {"sm": "utilization.gpu", "decoder": "utilization.decoder", "jpeg": "utilization.jpeg"}

    def __init__(self, command: str = "nvidia-smi", uuid: str | None = None, every_ms: int = 500):
        self.command, self.uuid, self.every_ms = command, uuid, every_ms
        self.process: subprocess.Popen[str] | None = None
        self.thread: threading.Thread | None = None
        self.lines: list[str] = []
        self.fields: list[str] = []
        self.note: str | None = None

    def start(self) -> Sampler:
        exe = shutil.which(self.command)
        if exe is None:
            self.note = f"{self.command} not found: utilisation not sampled"
            return self
        try:
            known = subprocess.run(
                [exe, "--help-query-gpu"], capture_output=True, text=True, timeout=20
            ).stdout
        except (OSError, subprocess.SubprocessError) as error:
            self.note = f"{self.command} failed ({error}): utilisation not sampled"
            return self
        self.fields = ["sm", "decoder"] + (["jpeg"] if "utilization.jpeg" in known else [])
        query = ",".join(["uuid"] + [self.FIELDS[f] for f in self.fields])
        self.process = subprocess.Popen(
            [
                exe,
                f"--query-gpu={query}",
                "--format=csv,noheader,nounits",
                "-lms",
                str(self.every_ms),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.strip())

    def stop(self) -> dict[str, Any] | None:
        """The summary (mean and max of each field over the samples), or None with :attr:`note`."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # its own group: nothing else
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.thread is not None:
            self.thread.join(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        summary = summarise(self.lines, self.fields, self.uuid)
        if summary is None:
            self.note = f"{self.command} gave no samples"
        return summary


def summarise(lines: list[str], fields: list[str], uuid: str | None) -> dict[str, Any] | None:
    """Mean and max per field of nvidia-smi's CSV lines (``uuid, value, …``), only the rows of
    the GPU ``uuid`` when any match (else all rows); ``[N/A]`` values are left out."""
    rows = [[cell.strip() for cell in line.split(",")] for line in lines if line.strip()]
    rows = [row for row in rows if len(row) == len(fields) + 1]
    mine = [row for row in rows if uuid is not None and row[0] == uuid]
    rows = mine or rows
    if not rows:
        return None
    summary: dict[str, Any] = {"samples": len(rows), "gpus_sampled": len({row[0] for row in rows})}
    for position, field in enumerate(fields, start=1):
        values = [value for row in rows if (value := as_number(row[position])) is not None]
        summary[f"{field}_percent_mean"] = round(statistics.fmean(values), 1) if values else None
        summary[f"{field}_percent_max"] = max(values) if values else None
    return summary


def as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


# --- steady state ---------------------------------------------------------------------------


def steady_window(stamps: list[tuple[float, float, int]], target: int) -> dict[str, Any]:
    """The steady rate of a run from its batches' ``(loop start, time done, samples)``: over
    its last batches that hold at least ``target`` samples (all after the first when fewer),
    with the rate before that window and the two halves of the window compared."""
    if not stamps:
        return {"images_per_second": 0.0, "window_images": 0, "batches": 0, "steady": False}
    started = stamps[0][0]
    times = [t for _, t, _ in stamps]
    counts = [n for _, _, n in stamps]
    total = sum(counts)
    if len(stamps) == 1:
        rate = total / max(times[0] - started, 1e-9)
        return {
            "images_per_second": rate,
            "window_images": total,
            "batches": 1,
            "steady": False,
            "reached_target": False,
        }
    start = 0  # the window is the batches after ``start``
    behind = 0
    for index in range(len(stamps) - 1, 0, -1):
        behind += counts[index]
        if behind >= target:
            start = index - 1
            break
    window = sum(counts[start + 1 :])
    rate = window / max(times[-1] - times[start], 1e-9)
    before = sum(counts[1 : start + 1])
    before_rate = before / max(times[start] - times[0], 1e-9) if start > 0 else None
    middle = (start + len(stamps) - 1) // 2
    halves = None
    if start < middle < len(stamps) - 1:
        first = sum(counts[start + 1 : middle + 1]) / max(times[middle] - times[start], 1e-9)
        second = sum(counts[middle + 1 :]) / max(times[-1] - times[middle], 1e-9)
        halves = (first, second)
    return {
        "images_per_second": rate,
        "window_images": window,
        "batches": len(stamps) - 1 - start,
        "reached_target": window >= target,
        "rate_before_window": None if before_rate is None else round(before_rate, 1),
        "window_halves_images_per_second": None
        if halves is None
        else [round(h, 1) for h in halves],
        "steady": halves is not None and abs(halves[0] - halves[1]) <= 0.1 * max(halves),
    }


def recording_batches() -> list[tuple[float, float, int]]:
    """Patch featx's loop timings to note every batch's ``(loop start, time done, samples)``."""
    from featx.report import Timings

    stamps: list[tuple[float, float, int]] = []
    original = Timings.batch_done

    def batch_done(self: Timings, samples: int) -> None:
        original(self, samples)
        stamps.append((self.started, time.perf_counter(), samples))

    Timings.batch_done = batch_done  # type: ignore[method-assign]
    return stamps


# --- the children ---------------------------------------------------------------------------


def emit(record: dict[str, Any]) -> None:
    print(MARK + json.dumps(record), flush=True)


def child_main(args: argparse.Namespace) -> int:
    if args.stage == "kernels":
        stage_kernels(args)
    elif args.stage == "run":
        stage_run(args)
    elif args.stage == "build-tars":
        from gpu_archives import build_tars as write_tars

        jpegs = [p.read_bytes() for p in sorted(args.folder.glob("*.jpg"))[: args.images]]
        names = write_tars(args.tars, jpegs, args.total, args.per_tar)
        emit(
            {"name": "build tars", "images": len(names), "tars": len(list(args.tars.glob("*.tar")))}
        )
    return 0


def timed_rate(work: Callable[[], Any], items: int, device: Any, min_seconds: float) -> float:
    from featx.bench import _rate

    return _rate(work, items, device, min_seconds)


def stage_kernels(args: argparse.Namespace) -> None:
    """The GPU stages on one batch of the folder's JPEGs (on a CPU: the same code, torchvision's
    CPU decoder standing in for nvJPEG)."""
    import torch

    from featx import ExtractConfig
    from featx.data.decode import DecodePolicy, resize_crop
    from featx.data.gpu_decode import DecodeStream, grouped_resize_crop, nvjpeg, on_device
    from featx.data.loader import SampleDataset, collate
    from featx.data.work import FileRange, WorkItem
    from featx.defaults import available_cores
    from featx.models import CutModel, load_backbone
    from featx.runtime import device as devices

    device = devices.pick_device(args.device)
    cuda = device.type == "cuda"
    config = ExtractConfig(model=args.model, weights="none", image_size=args.image_size)
    backbone = load_backbone(config.model, "none", config.image_size)
    feed = devices.feed(None, None, device, available_cores())
    precision = devices.pick_precision("auto", device)
    policy = DecodePolicy(backbone.transform, mode="gpu")
    paths = sorted(args.folder.glob("*.jpg"))[: feed.batch_size]
    dataset = SampleDataset(policy)
    items = [WorkItem(row, FileRange(str(path))) for row, path in enumerate(paths)]
    batch = collate([dataset[item] for item in items])
    files = batch.encoded.files() if batch.encoded is not None else []
    size = len(paths)

    def left() -> float:
        return args.deadline - time.time()

    def stage(name: str, work: Callable[[], dict[str, Any]], needs: float = 3.0) -> None:
        if left() < needs:
            emit({"name": name, "status": "skipped", "note": "out of its time box"})
            return
        try:
            emit({"name": name, "status": "ok", **work()})
        except Exception as error:  # one stage failing must not hide the others
            emit(
                {"name": name, "status": "failed", "note": f"{type(error).__name__}: {error}"[:300]}
            )

    model_rate: dict[str, float] = {}

    def model_eager() -> dict[str, Any]:
        model = (
            CutModel(backbone, backbone.check_layers(config.layers), config.pool).to(device).eval()
        )
        crop = backbone.transform["crop"]
        images = torch.randint(0, 255, (feed.batch_size, 3, crop, crop), dtype=torch.uint8).to(
            device
        )
        with torch.inference_mode(), devices.autocast(precision, device):
            rate = timed_rate(lambda: model(images), feed.batch_size, device, args.min_seconds)
        model_rate["eager"] = rate
        return {
            "images_per_second": round(rate, 1),
            "note": f"batch {feed.batch_size}, {precision}, {crop} px, "
            + str(model.memory_format).replace("torch.", ""),
        }

    stage("model eager", model_eager)
    emit(
        {
            "name": "model CUDA-graphed",
            "status": "not built",
            "note": "featx has no CUDA-graph path yet",
        }
    )

    if cuda:
        decoder, stand_in = nvjpeg, ""
    else:
        from torchvision.io import ImageReadMode, decode_jpeg

        def decoder(items: list[torch.Tensor], where: torch.device) -> list[torch.Tensor]:
            return decode_jpeg(items, mode=ImageReadMode.RGB, device=where)

        stand_in = " (CPU stand-in: torchvision's CPU decoder)"
    bare: dict[str, float] = {}

    def bare_decode() -> dict[str, Any]:
        rate = timed_rate(lambda: decoder(files, device), len(files), device, args.min_seconds)
        bare["rate"] = rate
        return {
            "images_per_second": round(rate, 1),
            "note": f"{len(files)} JPEGs 500x375, one batched call{stand_in}",
        }

    stage("nvJPEG bare", bare_decode)

    def featx_decode() -> dict[str, Any]:
        stream = DecodeStream(device)
        rate = timed_rate(
            lambda: on_device(batch, policy, device, decoder, stream=stream),
            size,
            device,
            args.min_seconds,
        )
        return {
            "images_per_second": round(rate, 1),
            "ceiling_images_per_second": round(bare["rate"], 1) if bare else None,
            "note": "featx on_device: decode + grouped resize + crop; ceiling: bare decode"
            + stand_in,
        }

    stage("decode + resize (featx)", featx_decode)

    def resize_checks() -> dict[str, Any]:
        decoded = [image for image in decoder(files, device)]
        # three sizes, as a batch from several cameras: 500x375 as decoded, and two crops
        images: dict[int, torch.Tensor] = {}
        for row, image in enumerate(decoded):
            if row % 3 == 1:
                image = image[:, :300, :400].contiguous()
            elif row % 3 == 2:
                image = image[:, 7:350, 3:481].contiguous()
            images[row] = image
        transform = backbone.transform
        identical = {}
        for name, variant in (
            ("model's", transform),
            ("nearest", {**transform, "interpolation": "nearest", "antialias": False}),
            ("bicubic", {**transform, "interpolation": "bicubic", "antialias": True}),
        ):
            grouped = grouped_resize_crop(images, variant)
            each = {row: resize_crop(image, variant) for row, image in images.items()}
            identical[name] = all(torch.equal(grouped[row], each[row]) for row in images)
        per_image = timed_rate(
            lambda: [resize_crop(image, transform) for image in images.values()],
            len(images),
            device,
            args.min_seconds,
        )
        grouped_rate = timed_rate(
            lambda: grouped_resize_crop(images, transform), len(images), device, args.min_seconds
        )
        ok = all(identical.values())
        emit({
            "name": "resize per image",
            "status": "ok",
            "images_per_second": round(per_image, 1),
            "note": f"resize_crop one call per image, {len(images)} images of 3 sizes",
        })  # fmt: skip
        return {
            "status": "ok" if ok else "failed",
            "bit_identical": identical,
            "images_per_second": round(grouped_rate, 1),
            "note": (
                "one call per image size; bit-identical to per image: "
                + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in identical.items())
                + f"; {grouped_rate / per_image:.2f}x per image"
            ),
        }

    stage("resize grouped (pixel check)", resize_checks)
    emit(
        {
            "name": "resize padded batch kernel",
            "status": "not built",
            "note": "featx has no padded-batch resize",
        }
    )


def stage_run(args: argparse.Namespace) -> None:
    """One end-to-end run: files through featx.bench (with its ceilings), tars through extract."""
    import torch

    from featx import ExtractConfig
    from featx.data.worklist import ImageList
    from featx.runtime import device as devices

    device = devices.pick_device(args.device)
    config = ExtractConfig(
        model=args.model, weights="none", device=args.device, decode=args.decode,
        image_size=args.image_size, progress=False, quiet=True,
    )  # fmt: skip
    index = device.index or 0
    sampler = Sampler(args.nvidia_smi, gpu_uuid(index) if device.type == "cuda" else None)
    stamps = recording_batches()
    record: dict[str, Any] = {"source": args.source, "decode": args.decode}
    if args.source == "files":
        import featx.bench as bench_module

        original = bench_module._end_to_end
        seen: dict[str, Any] = {}

        def end_to_end(
            images: ImageList, run_config: ExtractConfig
        ) -> tuple[float, float, float, int]:
            repeats = math.ceil(args.total / len(images))
            images = ImageList(
                images.root, (images.paths * repeats)[: args.total],
                (images.labels * repeats)[: args.total], images.class_names,
            )  # fmt: skip
            stamps.clear()
            sampler.start()
            try:
                _, writer_share, writer_busy, _ = original(images, run_config)
            finally:
                seen["utilisation"] = sampler.stop()
            window = steady_window(stamps, args.steady_images)
            seen.update(images=len(images), window=window)
            return window["images_per_second"], writer_share, writer_busy, window["batches"]

        bench_module._end_to_end = end_to_end
        result = bench_module.bench(
            args.folder, config, limit=args.images, min_seconds=args.min_seconds
        )
        ceilings = [
            result[key]
            for key in (
                "decode_ceiling_images_per_second",
                "gpu_decode_images_per_second",
                "model_images_per_second",
            )
            if result.get(key) is not None
        ]
        record.update(
            {k: v for k, v in result.items() if k not in ("images", "decode", "layers")},
            images=seen["images"],
            ceiling_images_per_second=min(ceilings),
            end_to_end_images_per_second=result["end_to_end_images_per_second"],
            writer_share_of_wall_time=result["writer_share_of_wall_time"],
        )
        window, utilisation = seen["window"], seen["utilisation"]
    else:
        from featx import extract

        with tempfile.TemporaryDirectory(dir=args.work) as tmp:
            sampler.start()
            try:
                result = extract(args.tars, Path(tmp) / "tars.h5", config)
            finally:
                utilisation = sampler.stop()
        window = steady_window(stamps, args.steady_images)
        loop = max(result.loop_s, 1e-9)
        record.update(
            images=result.images,
            failed=result.failed,
            end_to_end_images_per_second=round(window["images_per_second"], 1),
            ceiling_images_per_second=None,
            writer_share_of_wall_time=round(result.writer_main_s / loop, 4),
            writer_process_busy_share=round(result.writer_s / loop, 4),
            precision=devices.pick_precision(config.precision, device),
            device=str(device),
            per_tar=args.per_tar,
            startup_s=round(result.startup_s, 2),
        )
        if device.type == "cuda":
            record["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    record.update(
        status="ok",
        end_to_end_images_per_second=round(window["images_per_second"], 1),
        steady_window_images=window["window_images"],
        steady_window_batches=window["batches"],
        steady_window_reached_target=window.get("reached_target"),
        steady=window.get("steady"),
        rate_before_window=window.get("rate_before_window"),
        window_halves_images_per_second=window.get("window_halves_images_per_second"),
        utilisation=utilisation,
        utilisation_note=sampler.note,
        shard_size="default (featx's rule)"
        if args.source == "files"
        else f"one tar ({args.per_tar} images)",
    )
    emit(record)


if __name__ == "__main__":
    sys.exit(main())
