"""Crash safety: a killed run, run again, gives the file an uninterrupted run gives.

One real run is killed (SIGKILL) after a few shards; each test resumes a copy of what it left
behind, in-process: the process boundary matters for the kill, not for the resume.
"""

from __future__ import annotations

import json
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import h5py
import pytest

from featx import extract
from featx.errors import ResumeMismatch
from featx.store.workdir import open_work_dir
from tests.conftest import (
    SETTINGS,
    SETTINGS_CONFIG,
    assert_same_file,
    featx_process,
    pause_at,
    wait_for_shards,
)


@dataclass
class Killed:
    out: Path
    shards: list[str]  # the shard files the killed run had published


def work_of(out: Path) -> Path:
    return out.with_name(out.name + ".featx")


def killed_run(many_photos: Path, out: Path, after_shards: int) -> Killed:
    # The run stops before the first image of the next shard: it cannot finish before the kill.
    pause = pause_at(out.parent, "featx.data.decode.decode_bytes", 4 * after_shards + 1)
    process = featx_process(many_photos, out, env=pause.env)
    pause.wait(process)
    wait_for_shards(out, after_shards, process)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.communicate()
    return Killed(out, sorted(p.name for p in work_of(out).glob("shard-*.h5")))


def copy_of(killed: Killed, folder: Path) -> Path:
    """The killed run's work folder beside a new output path; that output path."""
    out = folder / killed.out.name
    shutil.copytree(work_of(killed.out), work_of(out))
    return out


@pytest.fixture(scope="module")
def killed(many_photos, tmp_path_factory) -> Killed:
    return killed_run(many_photos, tmp_path_factory.mktemp("killed") / "feats.h5", 3)


def test_sigkill_leaves_only_whole_shards_and_no_output(killed):
    assert len(killed.shards) >= 3 and not killed.out.exists()
    for shard in work_of(killed.out).glob("shard-*.h5"):  # every published shard is readable
        with h5py.File(shard, "r") as f:
            assert f["index"].shape[0] == f["features/flatten"].shape[0] == 4


def test_sigkill_then_rerun_gives_identical_file(killed, many_photos, uninterrupted, tmp_path, cli):
    out = copy_of(killed, tmp_path)
    resumed = cli("extract", many_photos, "-o", out, *SETTINGS, "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["shards_done_before"] == len(killed.shards)  # kept
    assert_same_file(out, uninterrupted)
    assert not work_of(out).exists()


def test_resume_with_different_layer_is_refused(killed, many_photos, tmp_path, cli):
    out = copy_of(killed, tmp_path)
    other = cli("extract", many_photos, "-o", out, *SETTINGS, "--layer", "layer3")
    assert other.exit_code == 2
    assert "unfinished run with other settings" in other.stderr
    assert "layers: ['flatten'] → ['layer3']" in other.stderr
    assert "--overwrite" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1  # no traceback
    fresh = cli("extract", many_photos, "-o", out, *SETTINGS, "--layer", "layer3", "--overwrite")
    assert fresh.exit_code == 0, fresh.output


@pytest.mark.slow
def test_sigterm_keeps_finished_shards_and_exits_143(many_photos, uninterrupted, tmp_path, cli):
    out = tmp_path / "feats.h5"
    pause = pause_at(tmp_path, "featx.data.decode.decode_bytes", 5)  # the 2nd shard's 1st image
    process = featx_process(many_photos, out, env=pause.env)
    pause.wait(process)
    wait_for_shards(out, 1, process)
    assert process.poll() is None
    process.send_signal(signal.SIGTERM)
    pause.release()  # the batch in flight finishes, then the run stops
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143
    assert "run the same command again to resume" in stderr
    assert "Traceback" not in stderr
    work = work_of(out)
    assert list(work.glob("shard-*.h5"))
    assert not list(work.glob(".*tmp*")), "the unfinished shard's temporary file was removed"
    assert cli("extract", many_photos, "-o", out, *SETTINGS).exit_code == 0
    assert_same_file(out, uninterrupted)


def test_library_call_resumes_too(killed, many_photos, uninterrupted, tmp_path):
    """A run whose shards are partly there (left by a killed run) completes them."""
    out = copy_of(killed, tmp_path)
    result = extract(many_photos, out, SETTINGS_CONFIG)
    assert result.shards_done_before == len(killed.shards)
    assert_same_file(out, uninterrupted)


def test_overwrite_resumes_an_unfinished_run_of_the_same_settings(
    killed, many_photos, tmp_path, cli
):
    """--overwrite replaces a finished output and discards runs of other settings, but the
    shards of an interrupted run of the very same command are kept."""
    out = copy_of(killed, tmp_path)
    again = cli("extract", many_photos, "-o", out, *SETTINGS, "--overwrite", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["shards_done_before"] == len(killed.shards)


FINGERPRINT = {"model": "resnet18", "layers": ["flatten"], "files": 10}


def test_a_resume_without_a_shard_size_adopts_the_unfinished_runs(tmp_path):
    """The default shard size may change between versions or devices; the run it left keeps its
    own (a given --shard-size that differs is still refused, as any other setting)."""
    out = tmp_path / "feats.h5"
    open_work_dir(out, FINGERPRINT, 4, 10, overwrite=False)
    for overwrite in (False, True):  # the same settings: --overwrite keeps it too
        work = open_work_dir(out, FINGERPRINT, 256, 10, overwrite, shard_size_given=False)
        assert work.shard_size == 4 and work.shard_count == 3
    assert open_work_dir(out, FINGERPRINT, 4, 10, overwrite=False).shard_size == 4
    with pytest.raises(ResumeMismatch, match="shard_size: 4 → 256"):
        open_work_dir(out, FINGERPRINT, 256, 10, overwrite=False)


def test_a_resume_without_a_shard_size_still_refuses_other_settings(tmp_path):
    out = tmp_path / "feats.h5"
    open_work_dir(out, FINGERPRINT, 4, 10, overwrite=False)
    other = {**FINGERPRINT, "model": "resnet50"}
    with pytest.raises(ResumeMismatch, match="model: 'resnet18' → 'resnet50'"):
        open_work_dir(out, other, 256, 10, overwrite=False, shard_size_given=False)
    fresh = open_work_dir(out, other, 256, 10, overwrite=True, shard_size_given=False)
    assert fresh.shard_size == 256 and fresh.fingerprint == other
