"""Scale out: torchrun ranks and --shard K/N parts give the file one process gives.

torchrun runs for real (ranks are processes); ``--shard K/N`` parts are library calls, as each
part is an ordinary run of its own.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from featx import extract
from tests.conftest import SETTINGS, SETTINGS_CONFIG, assert_same_file

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def torchrun(many_photos: Path, out: Path, nproc: int = 2) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [
            *TORCHRUN,
            f"--nproc-per-node={nproc}",
            "-m",
            "featx",
            "extract",
            str(many_photos),
            "-o",
            str(out),
            *SETTINGS,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.extend(int(child) for child in text)
    return found


@pytest.mark.slow
def test_torchrun_rank_killed_then_rerun_on_two_cpu_ranks_gives_the_single_process_file(
    many_photos, uninterrupted, tmp_path
):
    """The rerun does most shards on two ranks and assembles them: the one-process file."""
    out = tmp_path / "feats.h5"
    process = torchrun(many_photos, out)
    work = out.with_name(out.name + ".featx")
    deadline = time.monotonic() + 180
    while not list(work.glob("shard-*.h5")):
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.01)
    ranks = _children(process.pid)
    assert ranks, "torchrun's worker processes were not found"
    os.kill(ranks[-1], signal.SIGKILL)  # one rank dies; torchrun stops the job
    process.communicate(timeout=120)
    assert process.returncode != 0
    assert not out.exists()
    again = torchrun(many_photos, out)
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr[-3000:]
    assert_same_file(out, uninterrupted)
    assert not work.exists()


@pytest.fixture(scope="module")
def parts(many_photos, tmp_path_factory) -> Path:
    """feats.part-{0,1,2}-of-3.h5, each made by its own run, as SLURM array tasks would."""
    folder = tmp_path_factory.mktemp("parts")
    for k in range(3):
        extract(many_photos, folder / "feats.h5", SETTINGS_CONFIG.replace(shard=(k, 3)))
    return folder


def test_shard_parts_then_merge_give_the_single_process_file(parts, uninterrupted, tmp_path, cli):
    for k in range(3):
        assert (parts / f"feats.part-{k}-of-3.h5").is_file()
    folder = tmp_path / "copy"
    shutil.copytree(parts, folder)
    result = cli("merge", folder / "feats.h5")
    assert result.exit_code == 0, result.output
    assert_same_file(folder / "feats.h5", uninterrupted)


def test_merge_virtual_reads_the_same_arrays_through_plain_h5py(
    parts, uninterrupted, tmp_path, cli, monkeypatch
):
    folder = tmp_path / "copy"
    shutil.copytree(parts, folder)
    result = cli("merge", folder / "feats.h5", "--virtual")
    assert result.exit_code == 0, result.output
    with h5py.File(folder / "feats.h5", "r") as merged:
        assert merged["features/flatten"].is_virtual
    moved = tmp_path / "moved"
    folder.rename(moved)  # the view keeps working when the folder moves as a whole
    monkeypatch.chdir(tmp_path)
    with h5py.File(moved / "feats.h5", "r") as merged, h5py.File(uninterrupted, "r") as ref:
        np.testing.assert_array_equal(merged["features/flatten"][()], ref["features/flatten"][()])
        np.testing.assert_array_equal(merged["paths"][()], ref["paths"][()])
        np.testing.assert_array_equal(merged["labels"][()], ref["labels"][()])


def test_merge_with_a_missing_part_names_it(parts, tmp_path, cli):
    folder = tmp_path / "copy"
    shutil.copytree(parts, folder)
    (folder / "feats.part-1-of-3.h5").unlink()
    result = cli("merge", folder / "feats.h5")
    assert result.exit_code == 2
    assert "parts missing: 1/3" in result.stderr
    assert not (folder / "feats.h5").exists()


def test_merge_refuses_a_part_with_another_fingerprint(parts, many_photos, tmp_path, cli):
    folder = tmp_path / "copy"
    shutil.copytree(parts, folder)
    extract(many_photos, folder / "other.h5", SETTINGS_CONFIG.replace(shard=(1, 3), pool="max"))
    (folder / "other.part-1-of-3.h5").replace(folder / "feats.part-1-of-3.h5")
    result = cli("merge", folder / "feats.h5")
    assert result.exit_code == 2
    assert "fingerprint does not match" in result.stderr and "pool" in result.stderr


def test_shard_option_is_checked(many_photos, tmp_path, cli):
    result = cli("extract", many_photos, "-o", tmp_path / "f.h5", "--shard", "3/3")
    assert result.exit_code == 2 and "0 <= K < N" in result.stderr


def test_more_parts_than_shards_still_merge(photos, tmp_path, cli):
    """5 images in shards of 2 make 3 shards; 5 parts leave two of them empty."""
    config = SETTINGS_CONFIG.replace(shard_size=2)
    extract(photos, tmp_path / "single.h5", config)
    for k in range(5):
        extract(photos, tmp_path / "feats.h5", config.replace(shard=(k, 5)))
    result = cli("merge", tmp_path / "feats.h5")
    assert result.exit_code == 0, result.output
    assert_same_file(tmp_path / "feats.h5", tmp_path / "single.h5")


def test_merging_compressed_parts_gives_a_file_compressed_as_it_says(photos, tmp_path, cli):
    """The merged datasets are compressed with what the `compression` attribute names."""
    config = SETTINGS_CONFIG.replace(shard_size=2, compression="lzf")
    extract(photos, tmp_path / "single.h5", config)
    for k in range(2):
        extract(photos, tmp_path / "feats.h5", config.replace(shard=(k, 2)))
    result = cli("merge", tmp_path / "feats.h5")
    assert result.exit_code == 0, result.output
    assert_same_file(tmp_path / "feats.h5", tmp_path / "single.h5")
    for name in ("single.h5", "feats.h5"):
        with h5py.File(tmp_path / name, "r") as f:
            assert f.attrs["compression"] == "lzf"
            assert f["features/flatten"].compression == "lzf", name
