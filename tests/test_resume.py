"""Crash safety: a killed run, run again, gives the file an uninterrupted run gives."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np

from featx import ExtractConfig, extract
from tests.conftest import SETTINGS, featx_process  # noqa: F401  (re-exported for other tests)


def assert_same_file(a: Path, b: Path) -> None:
    """Same datasets, same values bit for bit, same attributes (but the creation time)."""
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        names_a, names_b = [], []
        fa.visit(names_a.append)
        fb.visit(names_b.append)
        assert names_a == names_b
        for name in names_a:
            if isinstance(fa[name], h5py.Dataset):
                assert fa[name].dtype == fb[name].dtype, name
                np.testing.assert_array_equal(fa[name][()], fb[name][()], err_msg=name)
        assert sorted(fa.attrs) == sorted(fb.attrs)
        for key in fa.attrs:
            if key != "created":
                assert str(fa.attrs[key]) == str(fb.attrs[key]), key


def wait_for_shards(out: Path, count: int, process: subprocess.Popen, limit: float = 120) -> None:
    work = out.with_name(out.name + ".featx")
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if len(list(work.glob("shard-*.h5"))) >= count:
            return
        if process.poll() is not None:
            raise AssertionError(f"run ended before {count} shards: {process.communicate()[1]}")
        time.sleep(0.005)
    raise AssertionError("no shard appeared in time")


def test_sigkill_then_rerun_gives_identical_file(many_photos, uninterrupted, tmp_path):
    out = tmp_path / "feats.h5"
    process = featx_process(many_photos, out)
    wait_for_shards(out, 2, process)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.communicate()
    work = out.with_name(out.name + ".featx")
    finished = sorted(p.name for p in work.glob("shard-*.h5"))
    assert finished and not out.exists()
    for shard in work.glob("shard-*.h5"):  # every published shard is readable
        with h5py.File(shard, "r") as f:
            assert f["index"].shape[0] == f["features/flatten"].shape[0]
    mtimes = {p.name: p.stat().st_mtime_ns for p in work.glob("shard-*.h5")}

    resumed = featx_process(many_photos, out, "--json")
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert f'"shards_done_before": {len(finished)}' in stdout
    assert_same_file(out, uninterrupted)
    assert not work.exists()
    assert len(mtimes) == len(finished)  # finished shards were kept, not redone


def test_resume_with_different_layer_is_refused(many_photos, tmp_path):
    out = tmp_path / "feats.h5"
    process = featx_process(many_photos, out)
    wait_for_shards(out, 1, process)
    process.kill()
    process.communicate()
    other = featx_process(many_photos, out, "--layer", "layer3")
    _, stderr = other.communicate(timeout=120)
    assert other.returncode == 2
    assert "unfinished run with other settings" in stderr
    assert "layers: ['flatten'] → ['layer3']" in stderr
    assert "--overwrite" in stderr
    assert "Traceback" not in stderr
    fresh = featx_process(many_photos, out, "--layer", "layer3", "--overwrite")
    fresh.communicate(timeout=300)
    assert fresh.returncode == 0


def test_sigterm_keeps_finished_shards_and_exits_143(many_photos, uninterrupted, tmp_path):
    out = tmp_path / "feats.h5"
    process = featx_process(many_photos, out)
    wait_for_shards(out, 1, process)
    assert process.poll() is None
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143
    assert "run the same command again to resume" in stderr
    assert "Traceback" not in stderr
    work = out.with_name(out.name + ".featx")
    assert list(work.glob("shard-*.h5"))
    assert not list(work.glob(".*tmp*")), "the unfinished shard's temporary file was removed"
    resumed = featx_process(many_photos, out)
    resumed.communicate(timeout=300)
    assert resumed.returncode == 0
    assert_same_file(out, uninterrupted)


def test_library_call_resumes_too(many_photos, uninterrupted, tmp_path):
    """A run whose shards are partly there (copied from an interrupted run) completes them."""
    config = ExtractConfig(
        model="resnet18",
        weights="none",
        image_size=64,
        workers=0,
        shard_size=4,
        batch_size=2,
        progress=False,
    )
    out = tmp_path / "feats.h5"
    process = featx_process(many_photos, out)
    wait_for_shards(out, 3, process)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    result = extract(many_photos, out, config)
    assert result.shards_done_before >= 3
    assert_same_file(out, uninterrupted)


def test_overwrite_resumes_an_unfinished_run_of_the_same_settings(many_photos, tmp_path):
    """--overwrite replaces a finished output and discards runs of other settings, but the
    shards of an interrupted run of the very same command are kept."""
    out = tmp_path / "feats.h5"
    process = featx_process(many_photos, out)
    wait_for_shards(out, 2, process)
    process.kill()
    process.communicate()
    again = featx_process(many_photos, out, "--overwrite", "--json")
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr
    assert '"shards_done_before": 0' not in stdout
