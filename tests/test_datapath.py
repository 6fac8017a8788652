"""The one data path every source takes: what the main process hands the workers, how a batch is
collated, how rows reach their shard, and what the writer process does when things go wrong.

References are independent of featx: Python's ``tarfile`` for tar headers, ``torch.stack`` for
batches, h5py for what a shard holds.
"""

from __future__ import annotations

import io
import os
import signal
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from featx.data.batch_slots import SPARE_SLOTS
from featx.data.loader import collate, decoded_batches, stack_channels_last
from featx.data.tar_index import MAX_EXTENSION_BYTES, BrokenArchive, TarReader
from featx.data.tar_samples import tar_samples
from featx.data.work import FileRange, ShardPiece, WorkBatch, WorkItem
from featx.errors import FeatxError
from featx.store.shards import ShardRows, ShardSink
from featx.store.sink_process import SinkProcess
from featx.store.workdir import open_work_dir
from tests.archives import jpeg

# --- what the main process reads of a tar: headers only ---------------------------------------


def _tar(path: Path, members: list[tuple[str, bytes]], format: int) -> Path:
    with tarfile.open(path, "w", format=format) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return path


LONG = "a/" + "very-long-folder-name/" * 8 + "photo.with.dots.jpg"  # > 100 bytes: an extension
ODD = "naïve ünïcode/ph oto.jpg"


@pytest.mark.parametrize(
    "format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=str
)
def test_the_tar_index_names_every_member_at_the_offset_and_size_tarfile_reads(tmp_path, format):
    names = ["x.jpg", "x.cls", "y/z.json", ODD] + ([LONG] if format != tarfile.USTAR_FORMAT else [])
    members = [(name, os.urandom(1 + 700 * i)) for i, name in enumerate(names)]
    path = _tar(tmp_path / "a.tar", members, format)
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar.getmembers()]
    fd = os.open(path, os.O_RDONLY)
    try:
        got = [(m.name, m.offset, m.size) for m in TarReader(fd, path.stat().st_size).members()]
    finally:
        os.close(fd)
    assert got == expected


def test_a_local_tars_images_reach_the_workers_as_byte_ranges_of_the_file(tmp_path, photo_arrays):
    data = {f"{name}.jpg": jpeg(array[:64, :64]) for name, array in photo_arrays.items()}
    path = _tar(tmp_path / "a.tar", list(data.items()), tarfile.USTAR_FORMAT)
    samples = list(tar_samples(str(path), "none", 1 << 30))
    assert all(isinstance(s.image, FileRange) for s in samples)
    raw = path.read_bytes()
    for sample in samples:
        where = sample.image
        assert raw[where.offset : where.offset + where.length] == data[sample.name]


def test_a_files_format_folders_images_reach_the_workers_as_their_files_never_through_a_link(
    tmp_path, photo_arrays
):
    from featx.data.folder_samples import folder_samples
    from featx.data.reading import read_payload

    shard = tmp_path / "00000"
    shard.mkdir()
    data = {f"{i:09d}.jpg": jpeg(a[:64, :64]) for i, a in enumerate(photo_arrays.values())}
    for name, raw in data.items():
        (shard / name).write_bytes(raw)
    samples = list(folder_samples(str(shard), "none", 1 << 30))
    assert [s.name for s in samples] == list(data)
    assert all(isinstance(s.image, FileRange) for s in samples)  # listed here, read there
    assert [read_payload(s.image) for s in samples] == list(data.values())
    # a file swapped for a link after the listing is not read through the link
    first = samples[0].image
    os.replace(shard / samples[1].name, tmp_path / "elsewhere.jpg")
    os.unlink(shard / samples[0].name)
    os.symlink(tmp_path / "elsewhere.jpg", shard / samples[0].name)
    with pytest.raises(OSError):
        read_payload(first)


def _img2dataset_parquet(path: Path, images: list[bytes | None], statuses: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "key": [f"{i:09d}" for i in range(len(images))],
            "jpg": pa.array(images, pa.binary()),
            "status": statuses,
            "error_message": [None if s == "success" else "HTTP 404" for s in statuses],
        }
    )
    pq.write_table(table, path, row_group_size=3)  # img2dataset writes 100 rows per group


def test_a_local_parquet_shards_images_reach_the_workers_as_cells(tmp_path, photo_arrays):
    pytest.importorskip("pyarrow")
    from featx.data.parquet_cells import NoImage
    from featx.data.parquet_samples import parquet_samples
    from featx.data.reading import read_payload
    from featx.data.work import ParquetCell

    jpegs = [jpeg(a[:64, :64]) for a in photo_arrays.values()]
    data = [jpegs[0], None, jpegs[1], jpegs[2], None, jpegs[3], b"\xff\xd8" + b"x" * 5000]
    statuses = ["success", "failed_to_download", "success", "success", "success", "success"]
    statuses.append("success")
    path = tmp_path / "00000.parquet"
    _img2dataset_parquet(path, data, statuses)
    samples = list(parquet_samples(str(path), "none", 4000))
    assert [s.name for s in samples] == [f"{i:09d}" for i in range(7)]
    # img2dataset's failed download is known here, from its status, and left out of the count
    assert samples[1].image is None and samples[1].uncounted
    assert samples[1].error == "NoImage: failed_to_download (HTTP 404)"
    cells = [s.image for s in samples if s.image is not None]
    assert all(isinstance(cell, ParquetCell) for cell in cells)  # the main process read no image
    assert [(c.group, c.row) for c in cells] == [(0, 0), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    for i in (0, 2, 3, 5):
        assert read_payload(samples[i].image, 4000) == data[i]
    with pytest.raises(NoImage):  # a null cell its status called a success: the worker says so
        read_payload(samples[4].image, 4000)
    with pytest.raises(ValueError, match="file of 5002 bytes, over the --max-file-bytes limit"):
        read_payload(samples[6].image, 4000)
    # a file swapped for a link after the listing is not read through the link
    path.rename(tmp_path / "elsewhere.parquet")
    path.symlink_to(tmp_path / "elsewhere.parquet")
    from featx.data import parquet_cells

    parquet_cells._kept = None
    with pytest.raises(OSError):
        read_payload(samples[0].image, 4000)


def test_a_worker_reads_a_parquet_row_group_once_for_its_consecutive_cells(
    tmp_path, photo_arrays, monkeypatch
):
    pq = pytest.importorskip("pyarrow.parquet")
    from featx.data import parquet_cells
    from featx.data.parquet_samples import parquet_samples
    from featx.data.reading import read_payload

    jpegs = [jpeg(a[:64, :64]) for a in list(photo_arrays.values())[:4]]
    path = tmp_path / "00000.parquet"
    _img2dataset_parquet(path, jpegs + jpegs, ["success"] * 8)
    opened = []
    real = pq.ParquetFile
    monkeypatch.setattr(pq, "ParquetFile", lambda *a, **k: opened.append(1) or real(*a, **k))
    samples = list(parquet_samples(str(path), "none", 1 << 30))
    opened.clear()
    parquet_cells._kept = None
    assert [read_payload(s.image) for s in samples] == jpegs + jpegs
    assert len(opened) == 3  # row groups of 3, 3 and 2 rows: each read once


def test_parquet_cells_stay_in_the_main_process_without_a_status_or_for_big_row_groups(
    tmp_path, photo_arrays, monkeypatch
):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from featx.data import parquet_samples as module

    jpegs = [jpeg(a[:64, :64]) for a in list(photo_arrays.values())[:4]]
    bare = tmp_path / "bare.parquet"  # no status: a null cell is found only by reading it
    pq.write_table(pa.table({"key": ["a", "b"], "jpg": pa.array(jpegs[:2], pa.binary())}), bare)
    assert [s.image for s in module.parquet_samples(str(bare), "none", 1 << 30)] == jpegs[:2]
    big = tmp_path / "big.parquet"
    _img2dataset_parquet(big, jpegs, ["success"] * 4)
    monkeypatch.setattr(module, "WORKER_ROW_GROUP_BYTES", 100)  # each worker would keep one
    assert [s.image for s in module.parquet_samples(str(big), "none", 1 << 30)] == jpegs


def test_a_sparse_member_is_never_expanded_and_a_huge_extension_header_never_read(tmp_path):
    """A GNU sparse member claiming ~1 GB stored as holes, and a pax header claiming more than
    the cap: the first is a failed sample (NotAFile), the second breaks the archive, and
    neither is read into memory."""
    path = tmp_path / "sparse.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("a.jpg")
        info.size = 0
        tar.addfile(info, io.BytesIO(b""))
    raw = bytearray(path.read_bytes())
    raw[156:157] = b"S"  # the member becomes GNU sparse: tarfile would expand its holes
    raw[483:495] = b"%011o\0" % 999_999_999  # realsize (GNU header field)
    raw[148:156] = b"        "
    raw[148:156] = b"%06o\0 " % sum(raw[:512])
    path.write_bytes(bytes(raw))
    (sample,) = tar_samples(str(path), "none", 1 << 30)
    assert sample.image is None and sample.error.startswith("NotAFile: a sparse file member")

    pax = tmp_path / "pax.tar"
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, MAX_EXTENSION_BYTES + 1
    pax.write_bytes(header.tobuf(tarfile.USTAR_FORMAT) + bytes(MAX_EXTENSION_BYTES + 1024))
    with pytest.raises(BrokenArchive, match="extension header of"):
        list(tar_samples(str(pax), "none", 1 << 30))


# --- batches: channels-last, straight into place --------------------------------------------


def test_a_batch_is_the_images_stacked_in_channels_last_memory():
    generator = torch.Generator().manual_seed(0)
    hwc = [torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8, generator=generator) for _ in "abc"]
    images = [image.permute(2, 0, 1) for image in hwc]  # decode_jpeg's layout: HWC memory
    images.append(torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=generator))
    batch, slot = stack_channels_last(images)
    assert slot is None  # outside a DataLoader worker: ordinary memory
    assert torch.equal(batch, torch.stack(images))
    assert batch.is_contiguous(memory_format=torch.channels_last)
    collated = collate([(i, image, "") for i, image in enumerate(images)] + [(9, None, "Bad")])
    assert torch.equal(collated.images, torch.stack(images))
    assert collated.indices == [0, 1, 2, 3] and collated.failures == [(9, "Bad")]


class _RowImages(torch.utils.data.Dataset):
    """Stands in for SampleDataset: row r's image is filled with r (mod 256)."""

    def __getitem__(self, item):
        row = item.row
        return row, torch.full((3, 4, 4), row % 256, dtype=torch.uint8), ""


def _row_batches(count: int, size: int = 4) -> list[WorkBatch]:
    rows = [range(b * size, (b + 1) * size) for b in range(count)]
    return [WorkBatch([WorkItem(r, FileRange("-")) for r in b], ShardPiece(0)) for b in rows]


def _holds_its_rows(batch) -> bool:
    expected = torch.tensor(batch.indices, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 4, 4)
    return torch.equal(batch.images, expected)


def test_a_worker_reuses_a_batch_slot_only_after_the_main_process_dropped_the_batch():
    prefetch, slots = 2, 2 + SPARE_SLOTS
    loaded = decoded_batches(_RowImages(), _row_batches(40), 1, False, prefetch)  # type: ignore[arg-type]
    held = [next(loaded) for _ in range(12)]  # more batches than the worker has slots
    in_slots = [batch.slot for batch in held if batch.slot is not None]
    assert len(in_slots) == len(set(in_slots)) == slots  # the rest came in fresh shared memory
    while_held = [next(loaded) for _ in range(8)]
    assert [batch.slot for batch in while_held] == [None] * 8
    assert all(_holds_its_rows(batch) for batch in held + while_held)  # nothing written over
    del held, while_held
    later = []
    for batch in loaded:  # each batch dropped as the loop moves on: the slots come back
        assert _holds_its_rows(batch)
        later.append(batch.slot)
    assert len(later) == 20 and later.count(None) <= prefetch + 1  # made before the release
    assert len(set(later) - {None}) <= slots  # 20 batches in a few slots


# --- the sink: one write(rows, piece) for every source, in a process of its own ---------------


def _work(tmp_path: Path, total: int = 4, shard_size: int = 2):
    tmp_path.mkdir(exist_ok=True)
    return open_work_dir(tmp_path / "f.h5", {"k": 1}, shard_size, total, overwrite=False)


def _rows(indices: list[int]) -> ShardRows:
    features = np.arange(len(indices) * 3, dtype=np.float32).reshape(len(indices), 3)
    return ShardRows(indices, {"flatten": features + indices[0]})


def _content(path: Path) -> dict[str, list]:
    with h5py.File(path, "r") as f:
        names: list[str] = []
        f.visit(lambda name: names.append(name) if isinstance(f[name], h5py.Dataset) else None)
        return {name: f[name][()].tolist() for name in names}


def test_the_writer_process_publishes_the_same_shards_as_writing_in_this_process(tmp_path):
    batches = [
        (_rows([0]), ShardPiece(0)),
        (_rows([1]), ShardPiece(0, last=True)),
        (_rows([2, 3]), ShardPiece(1, failures=((3, "Bad"),), last=True)),
    ]
    published = {}
    for name, make in (("inline", lambda s: s), ("process", SinkProcess)):
        work = _work(tmp_path / name)
        sink = make(ShardSink(work, "float32"))
        for rows, piece in batches:
            sink.write(rows, piece)
        sink.close()
        assert work.is_done(0) and work.is_done(1)
        published[name] = [_content(work.shard_path(shard)) for shard in (0, 1)]
    assert published["process"] == published["inline"]


def test_a_writer_error_reaches_the_run_as_one_line_and_publishes_nothing(tmp_path):
    work = _work(tmp_path)
    work.shard_path(0).mkdir()  # the shard cannot be published there: the child's OSError
    sink = SinkProcess(ShardSink(work, "float32"))
    with pytest.raises(FeatxError) as raised:
        sink.write(_rows([0]), ShardPiece(0))
        sink.write(_rows([1]), ShardPiece(0, last=True))
        for _ in range(100):  # the error surfaces at a later write, or at close
            sink.write(_rows([2]), ShardPiece(1))
        sink.close()
    assert "\n" not in str(raised.value) and str(work.path) in str(raised.value)
    assert sorted(os.listdir(work.path)) == ["run.json", "shard-000000.h5"]  # the folder only


def test_a_discarded_run_publishes_no_half_shard_and_leaves_no_temporary(tmp_path):
    work = _work(tmp_path)
    sink = SinkProcess(ShardSink(work, "float32"))
    sink.write(_rows([0]), ShardPiece(0))
    sink.discard()
    assert not work.is_done(0)
    assert sorted(os.listdir(work.path)) == ["run.json"]


def test_the_writer_process_outlives_no_killed_run(tmp_path):
    """The main process killed (its end of the pipe closed, as the kernel does on SIGKILL): the
    writer discards what it holds and exits; SIGINT and SIGTERM alone do not stop it."""
    work = _work(tmp_path)
    sink = SinkProcess(ShardSink(work, "float32"))
    sink.write(_rows([0]), ShardPiece(0))
    os.kill(sink._process.pid, signal.SIGINT)
    os.kill(sink._process.pid, signal.SIGTERM)
    sink.write(_rows([1]), ShardPiece(0, last=True))
    sink.write(_rows([2]), ShardPiece(1))  # shard 1 half written when the run dies
    sink._outbox.close()  # what the kernel does to a killed process's pipe
    sink._process.join(60)
    assert sink._process.exitcode == 0
    assert work.is_done(0) and not work.is_done(1)  # only a shard whose last batch arrived
    assert sorted(os.listdir(work.path)) == ["run.json", "shard-000000.h5"]  # no temporary


# --- the shard size: the device's rule, and a resume keeps its run's ---------------------------


def test_a_resume_without_a_shard_size_finishes_the_run_with_the_size_it_started_with(
    photos, tmp_path, monkeypatch
):
    import featx.pipeline as pipeline
    from featx import ExtractConfig
    from featx.errors import Interrupted
    from featx.pipeline import extract

    config = ExtractConfig(
        model="resnet18", weights="none", image_size=32, workers=0, progress=False, quiet=True
    )
    real, calls = pipeline.compute, []

    def interrupted_at_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "compute", interrupted_at_the_second_batch)
    out = tmp_path / "f.h5"
    with pytest.raises(Interrupted):
        extract(photos, out, config.replace(shard_size=2, batch_size=1))
    monkeypatch.setattr(pipeline, "compute", real)
    resumed = extract(photos, out, config.replace(batch_size=1))  # no shard size: adopted
    assert resumed.shards_done_before == 1
    whole = extract(photos, tmp_path / "whole.h5", config.replace(shard_size=2, batch_size=1))
    with h5py.File(out, "r") as a, h5py.File(whole.output, "r") as b:
        assert a["paths"][()].tolist() == b["paths"][()].tolist()
        assert np.array_equal(a["features/flatten"][()], b["features/flatten"][()])


# --- the shape of the path itself -----------------------------------------------------------

FEATX = Path(__file__).resolve().parent.parent / "featx"
# sources.source_of is the one place that maps a work list to its source
SEAMS = [
    "pipeline.py",
    "data/loader.py",
    "data/work.py",
    "store/shards.py",
    "store/sink_process.py",
]


@pytest.mark.parametrize("module", SEAMS)
def test_no_stage_asks_which_kind_of_source_it_has(module):
    """The loop, the loader and the sink meet through typed hand-offs (WorkBatch, ShardPiece,
    Batch): no duck typing across those seams."""
    import ast

    tree = ast.parse((FEATX / module).read_text())
    asked = [
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("getattr", "hasattr", "isinstance")
    ]
    assert asked == []


def test_no_module_is_over_400_lines_and_the_loop_reads_in_one_screen():
    import ast

    long = {
        str(path.relative_to(FEATX)): n
        for path in FEATX.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > 400
    }
    assert long == {}
    tree = ast.parse((FEATX / "pipeline.py").read_text())
    (run,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run"]
    assert run.end_lineno - run.lineno + 1 <= 30
