"""Archive inputs: WebDataset tars and img2dataset parquet shards, local or behind a URL.

One tar is one shard: its rows are ``<tar>/<member>`` in member order, and a tar either is
published whole or not at all. Features equal those of the same images as loose files; resume,
``--shard K/N`` + merge and torchrun give the single-process file; every bad member is in
``failed/`` with its reason. Remote reads go to servers on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from featx import extract
from featx.config import ExtractConfig
from featx.data.braces import expand_braces
from featx.data.prefetch import Prefetcher
from featx.errors import FeatxError, ResumeMismatch, UsageError
from featx.store.merge import merge
from tests.archives import (
    crops,
    files_format,
    http_server,
    jpeg,
    member,
    webdataset,
    write_tar,
)
from tests.conftest import (
    SETTINGS,
    SETTINGS_CONFIG,
    assert_same_file,
    pause_at,
    wait_for_shards,
)

CONFIG = SETTINGS_CONFIG


def read(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        layer = next(iter(f["features"]))
        return {
            "paths": [p.decode() for p in f["paths"][:]],
            "labels": f["labels"][:].tolist(),
            "features": f["features"][layer][:],
            "failed": dict(
                zip(
                    [p.decode() for p in f["failed/paths"][:]],
                    [e.decode() for e in f["failed/errors"][:]],
                    strict=True,
                )
            ),
            "attrs": dict(f.attrs),
        }


@pytest.fixture(scope="module")
def images(photo_arrays) -> list[bytes]:
    return [jpeg(array) for array in crops(photo_arrays, 20)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, images) -> tuple[Path, list[str]]:
    """20 images in 5 tars of 4, img2dataset style (.jpg, .cls, .json)."""
    folder = tmp_path_factory.mktemp("tars")
    names = webdataset(
        folder, images, per_tar=4, labels=[["cat", "dog"][i % 3 == 0] for i in range(20)]
    )
    return folder, names


@pytest.fixture(scope="module")
def from_tars(shards, tmp_path_factory) -> Path:
    """The file one process makes from the tar folder."""
    out = tmp_path_factory.mktemp("ref") / "tars.h5"
    extract(shards[0], out, CONFIG)
    return out


# --- what a tar gives -------------------------------------------------------------------------


def test_features_from_tars_equal_features_from_the_same_images_as_loose_files(
    shards, images, from_tars, tmp_path
):
    loose = tmp_path / "loose"
    loose.mkdir()
    for i, data in enumerate(images):
        (loose / f"{i:09d}.jpg").write_bytes(data)
    extract(loose, tmp_path / "loose.h5", CONFIG)
    tars, files = read(from_tars), read(tmp_path / "loose.h5")
    assert tars["paths"] == shards[1]  # <tar>/<member>, member order, tar order
    assert [p.split("/")[1] for p in tars["paths"]] == files["paths"]
    np.testing.assert_array_equal(tars["features"], files["features"])
    assert tars["attrs"]["source"] == str(shards[0])
    assert tars["attrs"]["inputs"] == "tar"
    assert not tars["failed"]


def test_a_row_name_is_retrievable_with_tar_xOf(shards, from_tars, images):
    name = read(from_tars)["paths"][13]  # e.g. 00003.tar/000000013.jpg
    tar_name, member_name = name.split("/", 1)
    data = subprocess.run(
        ["tar", "-xOf", str(shards[0] / tar_name), member_name], capture_output=True, check=True
    ).stdout
    assert data == images[13]


def test_cls_members_are_labels_kept_as_their_class_numbers(from_tars):
    data = read(from_tars)
    assert data["labels"] == [i % 2 for i in range(20)]
    assert json.loads(data["attrs"]["class_names"]) == ["0", "1"]


def test_json_field_labels_become_sorted_class_indices(shards, tmp_path):
    extract(
        shards[0],
        tmp_path / "j.h5",
        ExtractConfig(**{**CONFIG.__dict__, "label_from": "json:label"}),
    )
    data = read(tmp_path / "j.h5")
    assert json.loads(data["attrs"]["class_names"]) == ["cat", "dog"]
    assert data["labels"] == [1 if i % 3 == 0 else 0 for i in range(20)]


def test_a_single_tar_and_a_brace_list_name_the_same_rows(shards, tmp_path):
    folder = shards[0]
    extract(folder / "00001.tar", tmp_path / "one.h5", CONFIG)
    assert read(tmp_path / "one.h5")["paths"] == shards[1][4:8]
    extract(f"{folder}/{{00001..00002}}.tar", tmp_path / "two.h5", CONFIG)
    assert read(tmp_path / "two.h5")["paths"] == shards[1][4:12]


def test_brace_expansion_keeps_zero_padding_and_lists():
    assert expand_braces("s3://b/{00008..00011}.tar") == [
        "s3://b/00008.tar",
        "s3://b/00009.tar",
        "s3://b/00010.tar",
        "s3://b/00011.tar",
    ]
    assert expand_braces("d/{a,b}/{0..1}.tar") == [
        "d/a/0.tar",
        "d/a/1.tar",
        "d/b/0.tar",
        "d/b/1.tar",
    ]
    assert expand_braces("plain.tar") == ["plain.tar"]


# --- bad members: failed/, with a reason, never a silent skip -----------------------------------


@pytest.fixture(scope="module")
def bad_tar(tmp_path_factory, images) -> Path:
    folder = tmp_path_factory.mktemp("bad")
    good = images[0]
    path = folder / "00000.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        member(tar, "good.jpg", good)
        member(tar, "good.cls", b"1")
        member(tar, "photo.v2.jpg", images[1])  # dotted: sample "photo.v2", not "photo"
        member(tar, "photo.v2.cls", b"0")
        member(tar, "a.jpg", images[2])
        member(tar, "b.jpg", images[3])
        member(tar, "a.cls", b"1")  # interleaved: a's member after b's
        member(tar, "dup.jpg", images[4])
        member(tar, "dup.jpg", images[5])  # duplicate key
        member(tar, "two.jpg", images[6])
        member(tar, "two.png", images[7])  # a second image in one sample
        member(tar, "text.jpg", b"this is not a JPEG at all")  # non-image named like one
        member(tar, "lonely.txt", b"a caption without an image")
        member(tar, "link.jpg", kind=tarfile.SYMTYPE)
        member(tar, "badcls.jpg", images[8])
        member(tar, "badcls.cls", b"cat")
        member(tar, "sub/", kind=tarfile.DIRTYPE)
        member(tar, "sub/deep.jpg", images[9])
    return folder


def test_every_bad_member_is_in_failed_with_its_reason(bad_tar, tmp_path):
    out = tmp_path / "bad.h5"
    extract(bad_tar, out, ExtractConfig(**{**CONFIG.__dict__, "max_failures": "none"}))
    data = read(out)
    assert data["paths"] == [
        "00000.tar/good.jpg",
        "00000.tar/photo.v2.jpg",
        "00000.tar/a.jpg",
        "00000.tar/b.jpg",
        "00000.tar/dup.jpg",
        "00000.tar/two.jpg",
        "00000.tar/sub/deep.jpg",
    ]
    assert data["labels"][:3] == [1, 0, -1]  # a.cls came too late to label a.jpg
    failed = data["failed"]
    assert failed["00000.tar/a.cls"].startswith("NotContiguous: member of sample 'a'")
    assert failed["00000.tar/dup.jpg"].startswith("DuplicateMember")
    assert failed["00000.tar/two.png"].startswith("SecondImage: sample 'two' already has 'two.jpg'")
    assert failed["00000.tar/text.jpg"].startswith("UnidentifiedImageError")
    assert failed["00000.tar/lonely"].startswith("NoImage: sample without an image (lonely.txt)")
    assert failed["00000.tar/link.jpg"].startswith("NotAFile: a symbolic link member")
    assert failed["00000.tar/badcls.jpg"].startswith("BadLabel: badcls.cls holds 'cat'")
    assert len(failed) == 7


# --- one tar = one shard: broken tars, resume, distribution --------------------------------------


def _truncate(path: Path, keep: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(keep)


def test_a_truncated_tar_fails_its_shard_loudly_keeps_the_others_and_is_read_again_on_resume(
    shards, from_tars, tmp_path, cli
):
    folder = tmp_path / "tars"
    shutil.copytree(shards[0], folder)
    whole = (folder / "00002.tar").read_bytes()
    _truncate(folder / "00002.tar", len(whole) // 2)
    out = tmp_path / "feats.h5"
    result = cli("extract", folder, "-o", out, *SETTINGS)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "00002.tar: truncated" in lines[0], result.stderr
    assert "the 4 finished shard(s) are kept" in lines[0]
    work = out.with_name(out.name + ".featx")
    assert sorted(p.name for p in work.glob("shard-*.h5")) == [
        f"shard-{i:06d}.h5" for i in (0, 1, 3, 4)
    ]
    assert not out.exists()
    (folder / "00002.tar").write_bytes(whole)  # re-fetched
    extract(folder, out, CONFIG)
    data, reference = read(out), read(from_tars)
    np.testing.assert_array_equal(data["features"], reference["features"])
    assert data["paths"] == reference["paths"]


def test_a_tar_cut_exactly_between_members_is_still_found_truncated(shards, tmp_path):
    folder = tmp_path / "tars"
    folder.mkdir()
    source = shards[0] / "00000.tar"
    with tarfile.open(source) as tar:
        members = tar.getmembers()
    cut = members[3].offset  # a header boundary: tarfile alone would end quietly here
    (folder / "00000.tar").write_bytes(source.read_bytes()[:cut])
    with pytest.raises(FeatxError, match="00000.tar: truncated"):
        extract(folder, tmp_path / "f.h5", CONFIG)


def test_a_finished_shard_whose_tar_changed_is_refused_on_resume(shards, tmp_path):
    folder = tmp_path / "tars"
    shutil.copytree(shards[0], folder)
    _truncate(folder / "00004.tar", 1000)
    out = tmp_path / "feats.h5"
    with pytest.raises(FeatxError):
        extract(folder, out, CONFIG)
    write_tar(folder / "00000.tar", [("x.jpg", b"\xff\xd8\xff")])  # a finished tar, replaced
    with pytest.raises(ResumeMismatch, match="shard-000000.h5 was made from"):
        extract(folder, out, CONFIG)


@pytest.mark.slow
def test_sigkill_mid_tar_then_resume_gives_the_identical_file(shards, from_tars, tmp_path):
    out = tmp_path / "feats.h5"
    work = out.with_name(out.name + ".featx")
    # The run stops before the first sample of the second tar: it cannot finish before the kill.
    pause = pause_at(tmp_path, "featx.data.decode.decode_bytes", 5)
    process = subprocess.Popen(  # batches of 2: a tar of 4 takes two
        [sys.executable, "-m", "featx", "extract", str(shards[0]), "-o", str(out), *SETTINGS],
        stderr=subprocess.PIPE,
        env=pause.env,
    )
    pause.wait(process)
    wait_for_shards(out, 1, process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    kept = sorted(p.name for p in work.glob("shard-*.h5"))
    assert 1 <= len(kept) < 5 and not out.exists()
    extract(shards[0], out, CONFIG)
    assert_same_file(out, from_tars)


@pytest.mark.slow
def test_shard_parts_then_merge_give_the_single_process_file(shards, tmp_path):
    config = {**CONFIG.__dict__, "label_from": "json:label"}
    single = tmp_path / "single.h5"
    extract(shards[0], single, ExtractConfig(**config))
    out = tmp_path / "feats.h5"
    for k in range(3):
        extract(shards[0], out, ExtractConfig(**{**config, "shard": (k, 3)}))
    merge(out)
    a, b = read(out), read(single)
    np.testing.assert_array_equal(a["features"], b["features"])
    assert a["paths"] == b["paths"] and a["labels"] == b["labels"]
    assert a["attrs"]["class_names"] == b["attrs"]["class_names"]


@pytest.mark.slow
def test_two_torchrun_ranks_give_the_single_process_file(shards, tmp_path):
    """With --augment 2: the views too (each drawn from its sample's name, not its rank)."""
    single = tmp_path / "single.h5"
    extract(shards[0], single, dataclasses.replace(CONFIG, augment=2))
    out = tmp_path / "feats.h5"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "featx",
            "extract",
            str(shards[0]),
            "-o",
            str(out),
            *SETTINGS,
            "--augment",
            "2",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert_same_file(out, single)


# --- img2dataset's stats files and parquet shards ------------------------------------------------


def test_with_stats_files_only_finished_tars_are_read_and_counts_checked(shards, tmp_path):
    folder = tmp_path / "tars"
    shutil.copytree(shards[0], folder)
    for i in (0, 1, 2):
        (folder / f"{i:05d}_stats.json").write_text(json.dumps({"count": 5, "successes": 4}))
    extract(folder, tmp_path / "a.h5", CONFIG)  # 00003 and 00004: still being written
    assert read(tmp_path / "a.h5")["paths"] == shards[1][:12]
    (folder / "00001_stats.json").write_text(json.dumps({"count": 5, "successes": 5}))
    with pytest.raises(FeatxError, match="00001.tar: holds 4 samples, its stats file says 5"):
        extract(folder, tmp_path / "b.h5", CONFIG)


def test_img2dataset_parquet_shards_are_read_with_failed_downloads_in_failed(
    images, tmp_path, from_tars
):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "parquet"
    folder.mkdir()
    for shard in range(2):
        keys = [f"{k:09d}" for k in range(shard * 4, shard * 4 + 4)]
        jpgs = [images[int(k)] for k in keys]
        jpgs[1] = None  # a failed download
        table = pa.table(
            {
                "key": keys,
                "jpg": pa.array(jpgs, type=pa.binary()),
                "status": ["success", "failed_to_download", "success", "success"],
                "error_message": [None, "HTTP 404", None, None],
                "cls": [int(k) % 2 for k in keys],
            }
        )
        pq.write_table(table, folder / f"{shard:05d}.parquet")
    extract(folder, tmp_path / "p.h5", CONFIG)
    data, reference = read(tmp_path / "p.h5"), read(from_tars)
    assert data["paths"] == [
        f"{s:05d}.parquet/{k:09d}" for s, k in [(0, 0), (0, 2), (0, 3), (1, 4), (1, 6), (1, 7)]
    ]
    assert data["failed"] == {
        "00000.parquet/000000001": "NoImage: failed_to_download (HTTP 404)",
        "00001.parquet/000000005": "NoImage: failed_to_download (HTTP 404)",
    }
    # Not bit for bit: without the failed downloads the batches hold other images, and a CPU
    # convolution's last bits depend on what shares its batch.
    np.testing.assert_allclose(
        data["features"], reference["features"][[0, 2, 3, 4, 6, 7]], rtol=1e-4, atol=1e-5
    )
    assert data["labels"] == [0, 0, 1, 0, 0, 1]


# --- img2dataset's files format: a folder per shard ---------------------------------------------

LABELS = [["cat", "dog"][i % 3 == 0] for i in range(20)]  # the tars' JSON labels


def test_img2dataset_files_format_gives_the_rows_and_features_of_the_same_tars(
    images, shards, from_tars, tmp_path
):
    folder = tmp_path / "files"
    names = files_format(folder, images, per_shard=4, labels=LABELS)
    assert names == [name.replace(".tar/", "/") for name in shards[1]]
    extract(folder, tmp_path / "f.h5", CONFIG.replace(label_from="json:label"))
    data, reference = read(tmp_path / "f.h5"), read(from_tars)
    assert data["paths"] == names and data["failed"] == {}
    np.testing.assert_array_equal(data["features"], reference["features"])
    assert json.loads(data["attrs"]["class_names"]) == ["cat", "dog"]
    assert data["labels"] == [int(label == "dog") for label in LABELS]
    assert data["attrs"]["inputs"] == "sample-folder"


def test_a_files_shard_never_follows_links_and_bounds_every_read(images, tmp_path):
    folder = tmp_path / "files"
    files_format(folder, images[:3], per_shard=3, labels=["a", "b", "c"])
    shard = folder / "00000"
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(images[5])
    (shard / "link.jpg").symlink_to(secret)
    (shard / "big.jpg").write_bytes(images[4] + b"\0" * 200_000)
    (shard / "000000001.json").write_text(json.dumps({"label": "b", "pad": "x" * (2 << 20)}))
    (folder / "00000_stats.json").write_text(json.dumps({"count": 6, "successes": 5}))
    config = CONFIG.replace(label_from="json:label", max_file_bytes=100_000, max_failures="none")
    extract(folder, tmp_path / "f.h5", config)
    data = read(tmp_path / "f.h5")
    assert data["paths"] == ["00000/000000000.jpg", "00000/000000002.jpg"]
    assert data["failed"] == {
        "00000/000000001.jpg": "BadLabel: 000000001.json is not a JSON file under 1048576 bytes",
        "00000/big.jpg": f"ValueError: file of {len(images[4]) + 200_000} bytes, over the "
        "--max-file-bytes limit of 100000",
        "00000/link.jpg": "NotAFile: a symbolic link member, not image data",
    }


def test_a_files_shard_whose_count_differs_from_its_stats_file_is_not_written(images, tmp_path):
    folder = tmp_path / "files"
    files_format(folder, images[:8], per_shard=4, labels=["a"] * 8)
    for lost in (folder / "00001").glob("000000005.*"):
        lost.unlink()
    with pytest.raises(FeatxError, match="00001: holds 3 samples, its stats file says 4"):
        extract(folder, tmp_path / "f.h5", CONFIG)


@pytest.fixture
def no_model(monkeypatch):
    """A run that gets as far as loading a model fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("featx.models.load_backbone", refuse)
    monkeypatch.setattr("featx.plan.load_backbone", refuse)


def _refused_before_the_model(cli, source: Path, out: Path, line: str) -> None:
    """Exit 2 with one line, and nothing left beside the output: no file, work folder or lock."""
    out.parent.mkdir()
    result = cli("extract", source, "-o", out, *SETTINGS)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [f"featx: error: {line}"]
    assert list(out.parent.iterdir()) == []


def test_metadata_only_parquet_files_are_refused_before_the_model_loads(
    images, tmp_path, cli, no_model
):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "parquet"
    folder.mkdir()
    pq.write_table(pa.table({"key": ["a"], "caption": ["c"]}), folder / "00000.parquet")
    _refused_before_the_model(
        cli,
        folder,
        tmp_path / "out" / "f.h5",
        f"{folder}/00000.parquet: a parquet file without an image column (looked for jpg, "
        "jpeg, png, webp, image): metadata, not image shards",
    )


def test_a_json_label_field_no_parquet_column_holds_is_refused_before_the_model_loads(
    images, tmp_path, cli, no_model
):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "parquet"
    folder.mkdir()
    table = pa.table({"key": ["a"], "jpg": pa.array([images[0]], pa.binary()), "cls": [1]})
    pq.write_table(table, folder / "00000.parquet")
    out = tmp_path / "out" / "f.h5"
    out.parent.mkdir()
    result = cli("extract", folder, "-o", out, *SETTINGS, "--label-from", "json:species")
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"featx: error: {folder}/00000.parquet: --label-from json:species: no column 'species' "
        "(its columns: key, jpg, cls)"
    ]
    assert list(out.parent.iterdir()) == []


def test_parquet_shards_without_pyarrow_are_refused_before_the_model_loads(
    images, tmp_path, cli, no_model, monkeypatch
):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "parquet"
    folder.mkdir()
    pq.write_table(
        pa.table({"key": ["a"], "jpg": pa.array([images[0]], pa.binary())}),
        folder / "00000.parquet",
    )
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    _refused_before_the_model(
        cli,
        folder,
        tmp_path / "out" / "f.h5",
        "parquet shards need pyarrow: pip install 'featx[parquet]'",
    )


def _parquet_bytes(table) -> bytes:
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def test_a_remote_metadata_only_parquet_is_refused_from_its_footer_before_the_model_loads(
    images, tmp_path, cli, no_model
):
    pa = pytest.importorskip("pyarrow")
    import fsspec

    fs = fsspec.filesystem("memory")
    metadata = _parquet_bytes(pa.table({"key": ["a"], "caption": ["c" * 100_000]}))
    fs.pipe("/meta/00000.parquet", metadata)
    fs.pipe("/meta/00001.parquet", metadata)
    _refused_before_the_model(
        cli,
        "memory:///meta/{00000..00001}.parquet",
        tmp_path / "out" / "f.h5",
        "memory:///meta/00000.parquet: a parquet file without an image column (looked for "
        "jpg, jpeg, png, webp, image): metadata, not image shards",
    )


def test_a_remote_footer_is_read_by_its_size_and_a_huge_claim_is_refused_unread(
    images, monkeypatch
):
    pa = pytest.importorskip("pyarrow")
    import fsspec

    from featx.data import parquet_samples

    fs = fsspec.filesystem("memory")
    good = _parquet_bytes(pa.table({"key": ["a"], "jpg": pa.array([images[0]], pa.binary())}))
    fs.pipe("/footer/good.parquet", good)
    asked: list[tuple[int, int]] = []
    read_range = parquet_samples._range
    monkeypatch.setattr(
        parquet_samples,
        "_range",
        lambda fs, path, start, end: asked.append((start, end)) or read_range(fs, path, start, end),
    )
    pq = parquet_samples.parquet_module()
    assert parquet_samples._remote_column_names(pq, "memory:///footer/good.parquet") == [
        "key",
        "jpg",
    ]
    footer = int.from_bytes(good[-8:-4], "little")
    size = len(good)
    assert asked == [(size - 8, size), (size - 8 - footer, size - 8)]  # never the image bytes
    # a footer claiming 1 GB is refused from the 8 bytes that claim it
    fs.pipe(
        "/footer/huge.parquet", b"PAR1" + b"\0" * 100 + (1 << 30).to_bytes(4, "little") + b"PAR1"
    )
    asked.clear()
    with pytest.raises(UsageError, match="its footer claims 1073741824 bytes"):
        parquet_samples._remote_column_names(pq, "memory:///footer/huge.parquet")
    assert len(asked) == 1


def test_over_http_without_range_requests_the_footer_is_left_to_the_fetch(images, tmp_path):
    """Python's http.server ignores Range: the check gives up without reading the body, and the
    shard is read (and checked) when it is fetched."""
    pa = pytest.importorskip("pyarrow")

    from featx.data import parquet_samples

    folder = tmp_path / "served"
    folder.mkdir()
    keys = [f"{k:09d}" for k in range(3)]
    table = pa.table({"key": keys, "jpg": pa.array(images[:3], pa.binary())})
    (folder / "00000.parquet").write_bytes(_parquet_bytes(table))
    with http_server(folder) as (url, requests):
        pq = parquet_samples.parquet_module()
        assert parquet_samples._remote_column_names(pq, f"{url}/00000.parquet") is None
        extract(f"{url}/00000.parquet", tmp_path / "h.h5", CONFIG)
    assert read(tmp_path / "h.h5")["paths"] == [f"00000.parquet/{k}" for k in keys]


# --- remote: fsspec over HTTP and S3 on 127.0.0.1 ------------------------------------------------


def _same_rows(a: Path, b: Path) -> None:
    """Same datasets bit for bit and same attributes, but where the data was read from."""
    x, y = read(a), read(b)
    assert x["paths"] == y["paths"] and x["labels"] == y["labels"] and x["failed"] == y["failed"]
    np.testing.assert_array_equal(x["features"], y["features"])
    moved = {"source", "files_sha256", "archives_sha256", "created"}
    assert {k: str(v) for k, v in x["attrs"].items() if k not in moved} == {
        k: str(v) for k, v in y["attrs"].items() if k not in moved
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(shards):
    """``python -m http.server`` on 127.0.0.1 serving the tar folder."""
    pytest.importorskip("aiohttp")
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            str(port),
            "--bind",
            "127.0.0.1",
            "--directory",
            str(shards[0]),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline and server.poll() is None, (
                "http.server did not start"
            )
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait()


def test_tars_over_http_give_the_local_file(served, from_tars, tmp_path):
    extract(f"{served}/{{00000..00004}}.tar", tmp_path / "braces.h5", CONFIG)
    _same_rows(tmp_path / "braces.h5", from_tars)
    assert read(tmp_path / "braces.h5")["attrs"]["source"] == f"{served}/"
    extract(f"{served}/", tmp_path / "folder.h5", CONFIG)  # the server's folder listing
    _same_rows(tmp_path / "folder.h5", from_tars)


def test_each_remote_tar_is_one_get_without_range_requests(shards, tmp_path):
    pytest.importorskip("aiohttp")
    with http_server(shards[0]) as (url, requests):
        extract(f"{url}/{{00000..00004}}.tar", tmp_path / "f.h5", CONFIG)
    gets = [(path, rng) for method, path, rng in requests if method == "GET"]
    assert sorted(path for path, _ in gets if path.endswith(".tar")) == [
        f"/{i:05d}.tar" for i in range(5)
    ]
    assert all(rng is None for _, rng in gets)


def test_a_folder_of_images_over_http_gives_the_local_file(images, tmp_path):
    pytest.importorskip("aiohttp")
    loose = tmp_path / "loose"
    for i, data in enumerate(images[:6]):
        (loose / ("a" if i % 2 else "b")).mkdir(parents=True, exist_ok=True)
        (loose / ("a" if i % 2 else "b") / f"{i:03d}.jpg").write_bytes(data)
    extract(loose, tmp_path / "local.h5", CONFIG)
    with http_server(loose) as (url, requests):
        extract(f"{url}/", tmp_path / "remote.h5", CONFIG)
    _same_rows(tmp_path / "remote.h5", tmp_path / "local.h5")
    per_image = sorted((method, path) for method, path, _ in requests if path.endswith(".jpg"))
    assert per_image == sorted(("GET", f"/{'a' if i % 2 else 'b'}/{i:03d}.jpg") for i in range(6))


@pytest.fixture(scope="module")
def s3(shards):
    """moto's threaded S3 server on 127.0.0.1 holding the tars in s3://featx-test/laion/."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    import boto3

    server = moto_server.ThreadedMotoServer(
        ip_address="127.0.0.1", port=_free_port(), verbose=False
    )
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {
        k: os.environ.get(k)
        for k in (
            "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
        )
    }
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="featx-test")
    for path in sorted(shards[0].glob("*.tar")):
        client.upload_file(str(path), "featx-test", f"laion/{path.name}")
    yield "s3://featx-test/laion"
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.mark.slow
def test_a_metadata_only_parquet_on_s3_is_refused_from_its_footer_and_image_shards_read(
    s3, images, tmp_path, cli, monkeypatch
):
    pa = pytest.importorskip("pyarrow")
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.pipe("featx-test/meta/00000.parquet", _parquet_bytes(pa.table({"key": ["a"]})))
    keys = [f"{k:09d}" for k in range(3)]
    table = pa.table({"key": keys, "jpg": pa.array(images[:3], pa.binary())})
    fs.pipe("featx-test/images/00000.parquet", _parquet_bytes(table))
    refused = cli("extract", "s3://featx-test/meta/", "-o", tmp_path / "m.h5", *SETTINGS)
    assert refused.exit_code == 2, refused.output
    assert "00000.parquet: a parquet file without an image column" in refused.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    extract("s3://featx-test/images/", tmp_path / "i.h5", CONFIG)
    assert read(tmp_path / "i.h5")["paths"] == [f"00000.parquet/{k}" for k in keys]


@pytest.mark.slow
def test_tars_over_s3_give_the_local_file(s3, from_tars, tmp_path):
    extract(f"{s3}/", tmp_path / "s3.h5", CONFIG)
    _same_rows(tmp_path / "s3.h5", from_tars)
    extract(f"{s3}/{{00000..00004}}.tar", tmp_path / "braces.h5", CONFIG)
    _same_rows(tmp_path / "braces.h5", from_tars)


def test_a_missing_url_scheme_package_or_object_is_one_line(cli, tmp_path):
    result = cli("extract", "memory://nothing/here/{0..1}.tar", "-o", tmp_path / "f.h5", *SETTINGS)
    assert result.exit_code == 2
    assert "memory://nothing/here/0.tar: no such file" in result.output


# --- fetching ahead within a bounded scratch space ----------------------------------------------


def in_memory(folder: str, count: int) -> list[str]:
    """``count`` archives of 1000 bytes (archive i: the byte i) in fsspec's memory filesystem."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for i in range(count):
        fs.pipe(f"/{folder}/{i}.tar", bytes([i]) * 1000)
    return [f"memory:///{folder}/{i}.tar" for i in range(count)]


def test_the_next_archive_is_fetched_while_the_current_one_is_read(tmp_path):
    fetcher = Prefetcher(in_memory("prefetch", 3), [1000] * 3, tmp_path, budget=10_000)
    try:
        items = iter(fetcher)
        first = next(items)
        assert Path(first.path).read_bytes() == bytes([0]) * 1000
        deadline = time.monotonic() + 10
        while len(list(tmp_path.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(list(tmp_path.iterdir())) == 2  # the next one, while the first is in use
        fetcher.release(first)
        assert not Path(first.path).exists()
        second = next(items)
        assert Path(second.path).read_bytes() == bytes([1]) * 1000
    finally:
        fetcher.close()


def test_scratch_space_never_holds_more_than_its_budget(tmp_path):
    urls = in_memory("budget", 3)
    fetcher = Prefetcher(urls, [1000] * 3, tmp_path, budget=1500)  # room for one at a time
    try:
        for fetched in fetcher:
            time.sleep(0.05)  # the fetch thread would run ahead here if it could
            assert [p.name for p in tmp_path.iterdir()] == [Path(fetched.path).name]
            fetcher.release(fetched)
    finally:
        fetcher.close()


def test_a_fetched_copys_images_reach_the_workers_as_ranges_until_its_last_batch_is_decoded(
    shards, tmp_path
):
    """A remote tar is fetched whole into scratch; the workers read byte ranges of that copy,
    and the loader removes it once the archive's last batch is decoded (not when it was
    indexed), even after a worker death replays batches from it."""
    import fsspec

    from featx.data.archive_feed import archive_batches
    from featx.data.archives import list_archives
    from featx.data.loader import Replay
    from featx.data.work import FileRange

    fs = fsspec.filesystem("memory")
    for path in sorted(shards[0].glob("*.tar"))[:2]:
        fs.pipe(f"/copies/{path.name}", path.read_bytes())
    archives = list_archives("memory:///copies/{00000..00001}.tar")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    fetcher = Prefetcher([a.url for a in archives.archives], [-1, -1], scratch)
    try:
        replay = Replay(archive_batches(archives, [0, 1], 3, fetcher, 1 << 30))
        first = replay.get(0)
        (copy,) = {item.payload.path for item in first.items}
        assert all(isinstance(item.payload, FileRange) for item in first.items)
        assert Path(copy).parent == scratch.resolve()  # a byte range of the fetched copy
        last = replay.get(1)  # 4 samples in batches of 3: the archive's last batch
        assert last.piece.last and last.piece.scratch == copy
        replay.get(2)  # the next archive is indexed; the first copy still waits for its batch
        assert Path(copy).exists()
        replay.forget_before(1)
        assert Path(copy).exists()  # its last batch is not decoded yet
        replay.forget_before(2)
        assert not Path(copy).exists()
    finally:
        fetcher.close()
    assert list(scratch.iterdir()) == []  # a run that stops leaves no copy behind


def test_archives_and_a_labels_csv_are_refused_together(shards, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("a.jpg,cat\n")
    with pytest.raises(UsageError, match="--labels CSV applies to image folders"):
        extract(
            shards[0],
            tmp_path / "f.h5",
            ExtractConfig(**{**CONFIG.__dict__, "labels_csv": str(labels)}),
        )


# --- the rest of featx takes archives too ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "http"])
def test_a_decoder_that_kills_its_worker_costs_one_image_of_the_tar(images, tmp_path, where):
    """Over HTTP the batches a dead worker held are decoded again from the fetched copy, which
    must outlive them."""
    from tests.test_faults import CRASHING_DECODER, decoder_shim

    killer = images[5][:-2] + b"featx-test:SIGKILL\xff\xd9"  # a JPEG whose decode kills
    folder = tmp_path / "tars"
    write_tar(
        folder / "00000.tar",
        [(f"{i:03d}.jpg", images[i]) for i in range(5)] + [("005.jpg", killer)],
    )
    out = tmp_path / "feats.h5"
    args = [a for a in SETTINGS if a not in ("--workers", "0")] + [
        "--workers",
        "2",
        "--batch-size",
        "3",
    ]
    with contextlib.ExitStack() as stack:
        source = str(folder)
        if where == "http":
            pytest.importorskip("aiohttp")
            url, _ = stack.enter_context(http_server(folder))
            source = f"{url}/00000.tar"
        done = subprocess.run(
            [sys.executable, "-m", "featx", "extract", source, "-o", str(out), *args],
            capture_output=True,
            text=True,
            timeout=300,
            env=decoder_shim(tmp_path, CRASHING_DECODER),
        )
    assert done.returncode == 0, done.stderr
    data = read(out)
    assert data["paths"] == [f"00000.tar/{i:03d}.jpg" for i in range(5)]
    assert data["failed"] == {
        "00000.tar/005.jpg": "DecoderCrashed: the process decoding this file was killed by SIGKILL"
    }


def test_train_head_on_tar_features_then_predict_on_the_tars(shards, from_tars, cli, tmp_path):
    head = tmp_path / "t.head"
    assert cli("train-head", from_tars, "-o", head, "-q").exit_code == 0
    result = cli("predict", shards[0], "--head", head, "-o", tmp_path / "p.csv", "-q")
    assert result.exit_code == 0, result.output
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0].startswith("path,predicted_class")
    assert [row.split(",")[0] for row in rows[1:]] == shards[1]


def test_predict_on_a_tar_folder_and_on_its_one_tar_report_the_same_failed_samples(
    images, from_tars, cli, tmp_path
):
    head = tmp_path / "t.head"
    assert cli("train-head", from_tars, "-o", head, "-q").exit_code == 0
    folder = write_tar(
        tmp_path / "tars" / "00000.tar",
        [("a.jpg", images[0]), ("bad.jpg", b"not a JPEG"), ("c.jpg", images[2])],
    ).parent
    reported = []
    for source in (folder, folder / "00000.tar"):
        out = tmp_path / f"{len(reported)}.csv"
        result = cli("predict", source, "--head", head, "-o", out, "--json", "-q")
        assert result.exit_code == 0, result.output
        reported.append([item["path"] for item in json.loads(result.stdout)["failed"]])
    assert reported == [["00000.tar/bad.jpg"], ["00000.tar/bad.jpg"]]


def test_remote_stats_files_are_found_in_the_listing_and_checked_when_their_tar_is_read(
    s3, shards, tmp_path
):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.put(str(shards[0] / "00000.tar"), "featx-test/stats/00000.tar")
    fs.put(str(shards[0] / "00001.tar"), "featx-test/stats/00001.tar")  # no stats: unfinished
    fs.pipe("featx-test/stats/00000_stats.json", json.dumps({"successes": 4}).encode())
    extract("s3://featx-test/stats/", tmp_path / "a.h5", CONFIG)
    assert read(tmp_path / "a.h5")["paths"] == shards[1][:4]
    fs.pipe("featx-test/stats/00000_stats.json", json.dumps({"successes": 3}).encode())
    with pytest.raises(FeatxError, match="00000.tar: holds 4 samples, its stats file says 3"):
        extract("s3://featx-test/stats/", tmp_path / "b.h5", CONFIG)


def test_a_folder_of_images_on_s3_gives_the_local_file(s3, images, tmp_path):
    import s3fs

    loose = tmp_path / "loose"
    for i, data in enumerate(images[:4]):
        (loose / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        (loose / "ab"[i % 2] / f"{i:03d}.jpg").write_bytes(data)
    s3fs.S3FileSystem().put(str(loose) + "/", "featx-test/photos/", recursive=True)
    extract(loose, tmp_path / "local.h5", CONFIG)
    extract("s3://featx-test/photos/", tmp_path / "s3.h5", CONFIG)
    _same_rows(tmp_path / "s3.h5", tmp_path / "local.h5")
    assert read(tmp_path / "s3.h5")["labels"] == [0, 0, 1, 1]


def test_a_server_sending_more_than_it_listed_fails_that_archive_and_never_fills_the_disk(
    tmp_path,
):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/grown/0.tar", b"x" * 5000)  # the listing said 1000
    fetcher = Prefetcher(["memory:///grown/0.tar"], [1000], tmp_path)
    try:
        (fetched,) = list(fetcher)
    finally:
        fetcher.close()
    assert fetched.path is None
    assert "sent more than the 1000 bytes it listed" in fetched.error
    assert not list(tmp_path.iterdir())


def test_images_or_subfolders_beside_the_tars_are_named_as_not_read(shards, tmp_path, cli):
    folder = tmp_path / "tars"
    shutil.copytree(shards[0], folder)
    (folder / "extra").mkdir()
    (folder / "stray.jpg").write_bytes(b"\xff\xd8\xff")
    result = cli("extract", folder, "-o", tmp_path / "f.h5", *[a for a in SETTINGS if a != "-q"])
    assert result.exit_code == 0, result.output
    assert (
        "2 subfolder(s) or image file(s) beside the archives (extra, stray.jpg) are not read"
        in (result.stderr)
    )


# --- what an archive may not hide ----------------------------------------------------------------


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("appended", "data after the end-of-archive marker"),
        ("zero tail", "a zero-filled tail hiding members"),
        ("bad pax header", "unreadable member header"),
    ],
)
def test_a_tar_that_hides_or_garbles_members_fails_its_shard(images, tmp_path, damage, reason):
    from featx.data.tar_samples import BrokenArchive, tar_samples

    path = write_tar(tmp_path / "a.tar", [("a.jpg", images[0]), ("b.jpg", images[1])])
    whole = path.read_bytes()
    if damage == "appended":  # cat a.tar b.tar: tarfile would stop at a's end marker
        path.write_bytes(whole + write_tar(tmp_path / "b.tar", [("c.jpg", images[2])]).read_bytes())
    elif damage == "zero tail":  # b.jpg's blocks zeroed, as after a crash into a preallocated file
        with tarfile.open(path) as tar:
            cut = tar.getmember("b.jpg").offset
        path.write_bytes(whole[:cut] + bytes(len(whole) - cut + 100_000))
    else:
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            member(tar, "a.jpg", images[0])
            info = tarfile.TarInfo("s.jpg")
            info.pax_headers = {"GNU.sparse.map": "a,b", "GNU.sparse.size": "10"}
            tar.addfile(info, None)
    with pytest.raises(BrokenArchive, match=reason):
        list(tar_samples(str(path), "cls", 1 << 30))


def test_json_labels_number_classes_alike_in_every_process(tmp_path, images):
    folder = tmp_path / "tars"
    for t, labels in enumerate([[10, 2], ["cat", 2]]):
        members = []
        for i, label in enumerate(labels):
            members += [
                (f"{t}{i}.jpg", images[2 * t + i]),
                (f"{t}{i}.json", json.dumps({"y": label}).encode()),
            ]
        write_tar(folder / f"{t:05d}.tar", members)
    config = {**CONFIG.__dict__, "label_from": "json:y"}
    extract(folder, tmp_path / "one.h5", ExtractConfig(**config))
    for k in range(2):
        extract(folder, tmp_path / "p.h5", ExtractConfig(**{**config, "shard": (k, 2)}))
    merge(tmp_path / "p.h5")
    for out in ("one.h5", "p.h5"):
        data = read(tmp_path / out)
        assert json.loads(data["attrs"]["class_names"]) == ["2", "10", "cat"]  # numbers first
        assert data["labels"] == [1, 0, 2, 0]


def test_a_class_number_past_the_limit_is_a_bad_label(tmp_path, images):
    from featx.data.tar_samples import tar_samples

    path = write_tar(tmp_path / "a.tar", [("a.jpg", images[0]), ("a.cls", b"9" * 30)])
    (sample,) = tar_samples(str(path), "cls", 1 << 30)
    assert sample.error.startswith("BadLabel: a.cls holds '999") and sample.image is None


def test_a_brace_list_naming_an_archive_twice_is_refused():
    with pytest.raises(UsageError, match="names the same item twice"):
        expand_braces("d/{0,1,0}.tar")


def test_archives_listed_over_http_carry_their_size_and_modification_time(served):
    from featx.data.archives import list_archives

    archives = list_archives(f"{served}/").archives
    assert [a.name for a in archives] == [f"{i:05d}.tar" for i in range(5)]
    assert all(a.size > 0 and "mtime=" in a.version for a in archives)


def test_closing_the_prefetcher_leaves_no_scratch_copy(tmp_path):
    fetcher = Prefetcher(in_memory("close", 3), [1000] * 3, tmp_path)
    first = next(iter(fetcher))
    assert Path(first.path).exists()
    fetcher.close()  # a run that stops with archives fetched and one in use
    assert not list(tmp_path.iterdir())


def test_a_parquet_shard_with_failed_downloads_matches_its_stats_file(images, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "parquet"
    folder.mkdir()
    jpgs = [images[0], None, images[2]]
    pq.write_table(
        pa.table({"key": ["a", "b", "c"], "jpg": pa.array(jpgs, pa.binary())}),
        folder / "00000.parquet",
    )
    (folder / "00000_stats.json").write_text(json.dumps({"count": 3, "successes": 2}))
    extract(folder, tmp_path / "p.h5", CONFIG)
    assert read(tmp_path / "p.h5")["paths"] == ["00000.parquet/a", "00000.parquet/c"]
