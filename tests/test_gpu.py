"""The GPU path, specified. Its orchestration runs here on the CPU through the same code, with
torchvision's CPU ``decode_jpeg(list)`` standing in for nvJPEG; the ``gpu``-marked tests at the
end need CUDA (``python scripts/gpu_check.py`` runs them and the throughput table)."""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F1
from torchvision.transforms.v2 import functional as F2

from featx import ExtractConfig, extract
from featx.data.batch import Batch, Encoded
from featx.data.decode import RESIZE, DecodePolicy, resize_crop
from featx.data.gpu_decode import gpu_decodable, is_device_error, on_device
from featx.data.loader import SampleDataset, collate, decoded_batches, file_items
from featx.data.work import ShardPiece, WorkBatch
from featx.data.worklist import scan_folder
from featx.errors import FeatxError, ResumeMismatch, UsageError
from featx.pipeline import make_plan
from featx.runtime import device as devices
from featx.store.workdir import open_work_dir
from tests.conftest import SETTINGS, save

TRANSFORM = {"resize": 73, "crop": 64, "interpolation": "bilinear", "antialias": True}
GPU_POLICY = DecodePolicy(TRANSFORM, mode="gpu")
CPU = torch.device("cpu")
FAST = ExtractConfig(model="resnet18", weights="none", image_size=64, workers=0, progress=False)


def jpeg(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def cpu_batch_decoder(files, device):
    """nvJPEG's stand-in: one call for the whole list, no partial result when a file is bad."""
    return [image.to(device) for image in decode_jpeg(list(files), mode=ImageReadMode.RGB)]


def inverting_decoder(files, device):
    """A batch decoder whose pixels differ from the CPU path's (as nvJPEG's chroma upsampling
    does), so a test sees which decoder made each image."""
    return [255 - image for image in cpu_batch_decoder(files, device)]


def encoded_batch(files: dict[int, bytes]) -> Batch:
    return Batch([], None, encoded=Encoded.pack([(i, as_tensor(d)) for i, d in files.items()]))


def features(path: Path) -> tuple[list[str], np.ndarray, list[str]]:
    with h5py.File(path) as f:
        failed = sorted(p.decode() for p in f["failed/paths"][:]) if "failed" in f else []
        layer = next(iter(f["features"]))
        return [p.decode() for p in f["paths"][:]], f["features"][layer][:], failed


@pytest.fixture(scope="module")
def jpegs(photo_arrays) -> dict[str, bytes]:
    return {name: jpeg(photo_arrays[name][:120, :160]) for name in ("chelsea", "coffee", "rocket")}


# --- 1. CPU preprocessing at the per-core limit -----------------------------------------------


def test_resize_is_torchvisions_uint8_resize_within_one_grey_level_of_transforms(photo_arrays):
    """featx's uint8 resize is torchvision v2's on uint8 (its native kernel on AVX2/AVX512/arm,
    as here) and at most one grey level from the weights' transforms(), which resize in float."""
    native = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    for name, array in photo_arrays.items():
        image = decode_jpeg(as_tensor(jpeg(array)), mode=ImageReadMode.RGB)
        ours = resize_crop(image, TRANSFORM)
        v2 = F2.center_crop(F2.resize(image, [73], antialias=True), [64])
        v1 = F1.center_crop(F1.resize(image, [73], InterpolationMode.BILINEAR, antialias=True), 64)
        assert ours.shape == v1.shape == (3, 64, 64) and ours.dtype == torch.uint8
        assert (ours.int() - v1.int()).abs().max() <= 1, name
        if native:
            assert torch.equal(ours, v2), name


def test_the_resize_is_recorded_and_a_resume_across_a_change_is_refused(photos, tmp_path):
    out = tmp_path / "f.h5"
    plan = make_plan(photos, out, FAST)
    assert plan.fingerprint["decode"]["resize"] == RESIZE
    before = copy.deepcopy(plan.fingerprint)
    del before["decode"]["resize"]  # a run started before the resize was recorded
    open_work_dir(out, before, plan.shard_size, len(plan.source.images), overwrite=False)
    with pytest.raises(ResumeMismatch, match="decode.resize"):
        extract(photos, out, FAST)


def test_bench_reports_per_worker_preprocessing_and_no_gpu_figures_on_a_cpu(photos):
    from featx.bench import bench

    # On the CPU also on a GPU machine; in batches of 2, as the bench decodes 11 batches and runs
    # at least 11 more end to end, however short min_seconds is.
    report = bench(photos, FAST.replace(device="cpu", batch_size=2), min_seconds=0.05)
    assert report["decode_images_per_second_per_worker"] > 0
    assert report["gpu_decode_images_per_second"] is None
    assert report["peak_gpu_memory_mb"] is None


# --- 2. GPU decode orchestration, with a CPU stand-in for nvJPEG ------------------------------


def test_a_bad_file_never_changes_how_its_neighbours_are_decoded(jpegs):
    good = {0: jpegs["chelsea"], 2: jpegs["coffee"], 3: jpegs["rocket"]}
    mixed = {**good, 1: b"\xff\xd8\xff\xe0 not really a JPEG" + b"\0" * 64}
    alone = on_device(encoded_batch(good), GPU_POLICY, CPU, inverting_decoder)
    shared = on_device(encoded_batch(mixed), GPU_POLICY, CPU, inverting_decoder)
    assert shared.indices == [0, 2, 3] and [i for i, _ in shared.failures] == [1]
    assert torch.equal(shared.images, alone.images)
    # ...and every good file was decoded by the batch decoder, not by the CPU fallback:
    for row, index in enumerate(shared.indices):
        inverted = 255 - decode_jpeg(as_tensor(good[index]), mode=ImageReadMode.RGB)
        assert torch.equal(shared.images[row], resize_crop(inverted, TRANSFORM))


def test_a_file_the_batch_decoder_refuses_alone_is_decoded_on_the_cpu(jpegs):
    refused = len(jpegs["coffee"])

    def picky(files, device):  # like nvJPEG refusing a stream libjpeg accepts
        if any(len(f) == refused for f in files):
            raise RuntimeError("nvjpegDecode failed: unsupported stream")
        return inverting_decoder(files, device)

    batch = on_device(encoded_batch(dict(enumerate(jpegs.values()))), GPU_POLICY, CPU, picky)
    assert batch.indices == [0, 1, 2] and not batch.failures
    upright = decode_jpeg(as_tensor(jpegs["coffee"]), mode=ImageReadMode.RGB)
    assert torch.equal(batch.images[1], resize_crop(upright, TRANSFORM))  # the CPU's pixels
    assert not torch.equal(batch.images[0], resize_crop(255 - upright, TRANSFORM))


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        RuntimeError("NVJPEG_STATUS_EXECUTION_FAILED"),
    ],
    ids=["oom", "cuda", "nvjpeg-execution"],
)
def test_device_errors_are_never_image_failures(jpegs, error):
    def failing(files, device):
        raise error

    assert is_device_error(error)
    with pytest.raises(type(error)):
        on_device(encoded_batch(dict(enumerate(jpegs.values()))), GPU_POLICY, CPU, failing)
    assert not is_device_error(RuntimeError("Image is incomplete or truncated"))


def exif_rotated(array: np.ndarray, path: Path) -> Path:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    return save(array, path, quality=90, exif=exif.tobytes())


def test_edge_files_take_the_cpu_path_and_fail_or_turn_like_it(photo_arrays, tmp_path):
    """EXIF-oriented, truncated, progressive, gray-in-CMYK...: whatever nvJPEG would get wrong or
    might accept differently is decoded by the CPU path, so pixels and failures match it."""
    array = photo_arrays["chelsea"][:120, :160]
    full = jpeg(array)
    (tmp_path / "truncated.jpg").write_bytes(full[: len(full) * 2 // 3])
    (tmp_path / "plain.jpg").write_bytes(full)
    exif_rotated(array, tmp_path / "exif.jpg")
    save(array, tmp_path / "progressive.jpg", quality=90, progressive=True)
    save(photo_arrays["camera"][:100, :100], tmp_path / "gray.jpg", quality=90)
    images = scan_folder(tmp_path)
    routed = {p: gpu_decodable(images.absolute(i), GPU_POLICY) for i, p in enumerate(images.paths)}
    assert {p for p, data in routed.items() if data is not None} == {"gray.jpg", "plain.jpg"}
    assert "decoded on the CPU" in GPU_POLICY.describe()["exif_orientation"]

    def decoded(mode: str) -> Batch:
        dataset = SampleDataset(DecodePolicy(TRANSFORM, mode=mode))
        batch = collate([dataset[item] for item in file_items(images, range(len(images)))])
        return on_device(batch, dataset.policy, CPU, cpu_batch_decoder)

    gpu = decoded("gpu")
    cpu = decoded("cpu")
    assert gpu.failures == cpu.failures and [images.paths[i] for i, _ in cpu.failures] == [
        "truncated.jpg"
    ]
    assert gpu.indices == cpu.indices
    assert torch.equal(gpu.images, cpu.images)
    assert cpu.images[cpu.indices.index(images.paths.index("exif.jpg"))].shape == (3, 64, 64)


def test_a_batch_leaves_a_worker_as_two_tensors_whatever_its_size(jpegs):
    items = [(i, as_tensor(data), "") for i, data in enumerate(list(jpegs.values()) * 100)]
    items += [(999, torch.zeros(3, 64, 64, dtype=torch.uint8), "")]
    batch = collate(items)
    tensors = [t for t in (batch.images, batch.encoded and batch.encoded.data) if t is not None]
    assert len(tensors) == 2 and len(batch.encoded.indices) == 300
    assert [bytes(f.numpy()) for f in batch.encoded.files()[:3]] == list(jpegs.values())


@pytest.mark.slow
def test_a_big_gpu_batch_with_two_workers_needs_few_file_descriptors(jpegs, tmp_path):
    """Issue 12 item 5: one shared-memory tensor per encoded JPEG ran 2 workers out of file
    descriptors at ulimit -n 1024 and batch 1024 (EMFILE, then a hang). Scaled down: 128 fds."""
    for i in range(512):
        (tmp_path / f"img{i:04d}.jpg").write_bytes(jpegs["chelsea"])
    script = textwrap.dedent(
        f"""
        import resource
        from featx.data.decode import DecodePolicy
        from featx.data.loader import SampleDataset, decoded_batches, file_items
        from featx.data.work import ShardPiece, WorkBatch
        from featx.data.worklist import scan_folder
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
        images = scan_folder({str(tmp_path)!r})
        dataset = SampleDataset(DecodePolicy({TRANSFORM!r}, mode="gpu"))
        batches = [
            WorkBatch(file_items(images, range(s, s + 256)), ShardPiece(0))
            for s in range(0, 512, 256)
        ]
        got = [len(b.encoded.indices) for b in decoded_batches(dataset, batches, 2, False, 2, 60)]
        print(got)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[256, 256]"


class _Stuck(torch.utils.data.Dataset):
    """A worker that never answers: a read hung on a dead network mount."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, item):
        time.sleep(3600)


def test_a_stuck_worker_ends_the_run_with_one_line_instead_of_hanging_it():
    batches = [WorkBatch([(0, b""), (1, b"")], ShardPiece(0))]
    loaded = decoded_batches(_Stuck(), batches, 1, False, timeout=1)  # type: ignore[arg-type]
    with pytest.raises(FeatxError, match="no batch from the decode workers in 1 s"):
        next(loaded)


# --- 3. the loop: no host synchronisation per batch --------------------------------------------


def test_results_reach_the_host_through_the_same_code_on_a_cpu(tmp_path, photos):
    """On a CPU the device→host step is the same code with nothing to wait for, and the writer
    thread (which waits on CUDA) gives the same file as writing in the loop."""
    outputs = {"a": torch.randn(4, 8), "b": torch.randn(4, 2, 3).half()}
    pending = devices.to_host(outputs, 3)
    assert pending.event is None
    host = pending.wait()
    assert np.array_equal(host["a"], outputs["a"][:3].numpy())
    assert host["b"].dtype == np.float32 and np.array_equal(host["b"], outputs["b"][:3].float())
    config = FAST.replace(batch_size=2, shard_size=3)
    extract(photos, tmp_path / "thread.h5", config)
    extract(photos, tmp_path / "inline.h5", config.replace(write_behind=False))
    thread, inline = features(tmp_path / "thread.h5"), features(tmp_path / "inline.h5")
    assert thread[0] == inline[0] and len(thread[0]) == 5
    assert np.array_equal(thread[1], inline[1])


# --- 7-10. defaults, device binding, out of memory --------------------------------------------


@pytest.mark.parametrize(
    ("given", "device", "cores", "ranks", "expected"),
    [
        ((None, None), "cuda", 64, 8, (256, 7, 2)),  # 8 ranks share a 64-core node
        ((None, None), "cuda", 64, 1, (256, 16, 2)),
        ((None, None), "cpu", 2, 1, (32, 1, 4)),
        ((None, None), "cpu", 32, 1, (32, 8, 4)),
        ((64, 3), "cuda", 64, 8, (64, 3, 4)),  # given values always win
    ],
)
def test_batch_workers_and_prefetch_follow_the_device_and_the_ranks(
    given, device, cores, ranks, expected
):
    feed = devices.feed(*given, torch.device(device), cores, ranks)
    assert (feed.batch_size, feed.workers, feed.prefetch) == expected


def test_fp32_on_cuda_computes_without_tf32_and_puts_the_flags_back():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    with devices.exact_fp32("fp32", torch.device("cuda")):
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before
    with devices.exact_fp32("fp16", torch.device("cuda")):
        assert torch.backends.cudnn.allow_tf32 == before[0]


def test_device_binding_and_a_local_rank_beyond_the_gpus_is_one_line():
    cuda = torch.device("cuda")
    assert devices.bound_device(torch.device("cuda:1"), None, 2) == torch.device("cuda", 1)
    assert devices.bound_device(cuda, 1, 2) == torch.device("cuda", 1)
    assert devices.bound_device(CPU, 5, 0) == CPU
    with pytest.raises(UsageError, match=r"^LOCAL_RANK 2: this machine has 2 CUDA device"):
        devices.bound_device(cuda, 2, 2)
    with pytest.raises(UsageError, match=r"^--device cuda:3: this machine has 2"):
        devices.bound_device(torch.device("cuda:3"), None, 2)


def test_out_of_memory_is_one_line_naming_batch_size_and_keeps_finished_shards(
    photos, tmp_path, cli, monkeypatch
):
    import featx.pipeline as pipeline

    real, calls = pipeline.compute, []

    def runs_out_on_the_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "compute", runs_out_on_the_third_batch)
    out = tmp_path / "f.h5"
    settings = [*SETTINGS[:8], "--shard-size", "2", "--batch-size", "1", "-q"]
    result = cli("extract", photos, "-o", out, *settings)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--batch-size 1" in lines[0] and "out of memory" in lines[0]
    assert [p.name for p in sorted(Path(f"{out}.featx").glob("shard-*.h5"))] == ["shard-000000.h5"]
    monkeypatch.setattr(pipeline, "compute", real)
    assert cli("extract", photos, "-o", out, *settings).exit_code == 0  # resumes
    with h5py.File(out) as f:
        assert len(f["paths"]) == 5


# --- on a CUDA device (scripts/gpu_check.py) ---------------------------------------------------

CUDA_FAST = FAST.replace(device="cuda")


@pytest.fixture(scope="module")
def edge_photos(tmp_path_factory, photo_arrays) -> Path:
    """Photos nvJPEG must not get wrong: EXIF-rotated, gray, corrupt, truncated, plus good ones."""
    root = tmp_path_factory.mktemp("edge")
    for name in ("chelsea", "coffee", "rocket", "astronaut"):
        save(photo_arrays[name], root / f"{name}.jpg", quality=90)
    exif_rotated(photo_arrays["chelsea"], root / "exif.jpg")
    save(photo_arrays["camera"], root / "gray.jpg", quality=90)
    full = (root / "coffee.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "corrupt.jpg").write_bytes(full[:600] + os.urandom(4000) + full[4600:])
    return root


@pytest.mark.gpu
def test_fp16_default_on_cuda_matches_fp32_on_the_cpu(photos, tmp_path):
    extract(photos, tmp_path / "cpu.h5", FAST)
    extract(photos, tmp_path / "cuda.h5", CUDA_FAST)  # precision auto: fp16 on CUDA
    with h5py.File(tmp_path / "cuda.h5") as f:
        assert f.attrs["precision"] == "fp16"
    np.testing.assert_allclose(
        features(tmp_path / "cuda.h5")[1], features(tmp_path / "cpu.h5")[1], rtol=2e-2, atol=2e-2
    )


@pytest.mark.gpu
def test_nvjpeg_edge_files_decode_or_fail_like_the_cpu_path(edge_photos, tmp_path):
    exact = CUDA_FAST.replace(precision="fp32", max_failures="none")
    extract(edge_photos, tmp_path / "cpu.h5", exact)
    extract(edge_photos, tmp_path / "gpu.h5", exact.replace(decode="gpu"))
    cpu, gpu = features(tmp_path / "cpu.h5"), features(tmp_path / "gpu.h5")
    assert gpu[0] == cpu[0] and gpu[2] == cpu[2] and "truncated.jpg" in cpu[2]
    row = cpu[0].index("exif.jpg")
    assert np.array_equal(gpu[1][row], cpu[1][row])  # routed to the CPU decoder: same pixels
    # nvJPEG's chroma upsampling differs from libjpeg's by a few grey levels
    np.testing.assert_allclose(gpu[1], cpu[1], rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
def test_nvjpeg_neighbours_decode_the_same_in_any_batch(jpegs):
    from featx.data.gpu_decode import nvjpeg

    cuda = torch.device("cuda")
    good = {0: jpegs["chelsea"], 2: jpegs["coffee"]}
    alone = [
        on_device(encoded_batch({i: d}), GPU_POLICY, cuda, nvjpeg).images for i, d in good.items()
    ]
    mixed = on_device(encoded_batch({**good, 1: jpegs["rocket"][:500]}), GPU_POLICY, cuda, nvjpeg)
    assert mixed.indices == [0, 2] and [i for i, _ in mixed.failures] == [1]
    assert torch.equal(mixed.images[0], alone[0][0]) and torch.equal(mixed.images[1], alone[1][0])


@pytest.mark.gpu
def test_workers_and_batch_size_do_not_change_gpu_features(many_photos, tmp_path):
    exact = CUDA_FAST.replace(precision="fp32", decode="gpu")
    extract(many_photos, tmp_path / "a.h5", exact.replace(workers=0, batch_size=7))
    extract(many_photos, tmp_path / "b.h5", exact.replace(workers=2, batch_size=32))
    a, b = features(tmp_path / "a.h5"), features(tmp_path / "b.h5")
    assert a[0] == b[0]
    np.testing.assert_allclose(a[1], b[1], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_compiled_model_matches_eager_on_cuda(photos, tmp_path):
    extract(photos, tmp_path / "eager.h5", CUDA_FAST)
    extract(photos, tmp_path / "compiled.h5", CUDA_FAST.replace(compile=True, batch_size=4))
    eager, compiled = features(tmp_path / "eager.h5"), features(tmp_path / "compiled.h5")
    np.testing.assert_allclose(compiled[1], eager[1], rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_rank_torchrun_on_two_gpus_gives_the_one_process_file(many_photos, tmp_path):
    out = tmp_path / "dist.h5"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "featx",
         "extract", str(many_photos), "-o", str(out), "--device", "cuda", "--precision", "fp32",
         *SETTINGS],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    extract(many_photos, tmp_path / "one.h5", CUDA_FAST.replace(precision="fp32", shard_size=4))
    one, dist = features(tmp_path / "one.h5"), features(out)
    assert one[0] == dist[0]
    np.testing.assert_allclose(dist[1], one[1], rtol=1e-4, atol=1e-5)
