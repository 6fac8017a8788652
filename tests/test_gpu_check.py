"""scripts/gpu_check.py off the GPU: its steady-state window, its nvidia-smi sampling (a fake
nvidia-smi). The ``--device cpu`` dry run itself is not a test: even a tiny one takes about
two minutes here (six child processes, each importing torch), so run it by hand:

    python scripts/gpu_check.py --device cpu --model resnet18 --image-size 64 --images 64 \
        --skip-tests --json /tmp/x.json
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"
FAKE_SMI = """#!/bin/sh
if [ "$1" = "--help-query-gpu" ]; then echo '"utilization.jpeg"'; exit 0; fi
while true; do
  echo "GPU-other, 99, 99, 99"
  echo "GPU-fake, 40, 0, [N/A]"
  echo "GPU-fake, 80, 10, [N/A]"
  sleep 0.05
done
"""


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_smi(tmp_path) -> Path:
    path = tmp_path / "nvidia-smi"
    path.write_text(FAKE_SMI)
    path.chmod(0o755)
    return path


def test_the_steady_window_starts_after_the_backlog_and_holds_the_target(gpu_check):
    # a backlog of fast batches (decoded ahead), then a steady 100 images/s in batches of 10
    stamps = [(0.0, 1.0, 10)] + [(0.0, 1.0 + 0.01 * i, 10) for i in range(1, 11)]
    stamps += [(0.0, 1.1 + 0.1 * i, 10) for i in range(1, 31)]
    window = gpu_check.steady_window(stamps, target=200)
    assert window["window_images"] == 200 and window["batches"] == 20 and window["reached_target"]
    assert window["images_per_second"] == pytest.approx(100.0)
    assert window["steady"] and window["rate_before_window"] > 100
    short = gpu_check.steady_window(stamps[:5], target=200)
    assert short["window_images"] == 40 and not short["reached_target"]


def test_utilisation_is_the_mean_and_max_of_this_gpus_samples(gpu_check, fake_smi):
    sampler = gpu_check.Sampler(str(fake_smi), uuid="GPU-fake", every_ms=50).start()
    time.sleep(0.5)
    summary = sampler.stop()
    assert summary["gpus_sampled"] == 1 and summary["samples"] >= 2
    assert summary["sm_percent_mean"] == pytest.approx(60.0) and summary["sm_percent_max"] == 80
    assert summary["decoder_percent_max"] == 10 and summary["jpeg_percent_mean"] is None


def test_no_nvidia_smi_means_no_sampling_and_says_so(gpu_check, tmp_path):
    sampler = gpu_check.Sampler(str(tmp_path / "no-such-nvidia-smi")).start()
    assert sampler.stop() is None and "not found" in sampler.note


def test_a_part_past_its_time_box_is_killed_and_keeps_what_it_reported(gpu_check):
    import sys

    code = 'import time; print(\'GPUCHECK {"name": "done"}\', flush=True); time.sleep(60)'
    started = time.monotonic()
    records, ended = gpu_check.run_child([sys.executable, "-c", code], timeout=3)
    assert time.monotonic() - started < 30
    assert records == [{"name": "done"}] and ended["timed_out"]
    assert "timed out" in gpu_check.failure_note(ended)
