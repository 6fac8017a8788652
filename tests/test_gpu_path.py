"""The GPU path's orchestration, driven on the CPU through the same code (streams and events
are no-ops here; the batch decoder is injected): grouped resizes, and features that are not
finite refused instead of written."""

from __future__ import annotations

import pytest
import torch

from featx.data.decode import resize_crop
from featx.data.gpu_decode import grouped_resize_crop
from featx.errors import FeatxError
from featx.models import CutModel

TRANSFORMS = [
    {"resize": 40, "crop": 32, "interpolation": "bilinear", "antialias": True},  # uint8 kernel
    {"resize": 40, "crop": 32, "interpolation": "nearest", "antialias": False},  # v2 float path
    {"resize": 80, "crop": 72, "interpolation": "bicubic", "antialias": True},  # crop pads
]


@pytest.mark.parametrize("transform", TRANSFORMS, ids=lambda t: t["interpolation"])
def test_images_of_one_size_resized_in_one_call_equal_one_call_each(transform):
    generator = torch.Generator().manual_seed(0)
    sizes = [(50, 70), (50, 70), (64, 48), (50, 70), (33, 33)]
    images = {
        row: torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator)
        for row, (h, w) in zip([4, 0, 7, 2, 9], sizes, strict=True)
    }
    grouped = grouped_resize_crop(images, transform)
    assert sorted(grouped) == sorted(images)
    for row, image in images.items():
        assert torch.equal(grouped[row], resize_crop(image, transform)), row


def _first_row_inf(value: torch.Tensor) -> torch.Tensor:
    value = value.clone()
    value[0] = float("inf")
    return value


def test_features_that_are_not_finite_are_refused_in_one_line_and_never_written(
    photos, tmp_path, cli, monkeypatch
):
    forward = CutModel.forward

    def overflowing(self, images):  # the first row of every batch overflows
        outputs = forward(self, images)
        return {name: _first_row_inf(value) for name, value in outputs.items()}

    monkeypatch.setattr(CutModel, "forward", overflowing)
    out = tmp_path / "f.h5"
    settings = ["--model", "resnet18", "--weights", "none", "--image-size", "32"]
    result = cli("extract", photos, "-o", out, *settings, "--workers", "0", "--device", "cpu", "-q")
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert "non-finite features (inf or NaN) in flatten at --precision fp32" in line
    assert not out.exists()
    assert not list((tmp_path / "f.h5.featx").glob("shard-*.h5"))
    with pytest.raises(FeatxError, match="--precision bf16 or fp32"):
        from featx.runtime.device import to_host

        to_host({"x": torch.tensor([[1.0], [float("nan")]])}, 2, "fp16").wait()


def test_a_cpu_run_names_no_gpu(photos, tmp_path, cli):
    import h5py

    out = tmp_path / "f.h5"
    settings = ["--model", "resnet18", "--weights", "none", "--image-size", "32", "-q"]
    assert cli("extract", photos, "-o", out, *settings, "--device", "cpu").exit_code == 0
    with h5py.File(out, "r") as f:
        assert "gpu" not in f.attrs and "gpu_decoder" not in f.attrs


@pytest.mark.gpu
def test_a_gpu_run_records_the_gpu_and_the_decoder(photos, tmp_path, cli):
    import json

    import h5py

    out = tmp_path / "f.h5"
    settings = ["--model", "resnet18", "--weights", "none", "--image-size", "32", "-q"]
    result = cli("extract", photos, "-o", out, *settings, "--device", "cuda", "--decode", "gpu")
    assert result.exit_code == 0, result.output
    with h5py.File(out, "r") as f:
        assert f.attrs["gpu"] == torch.cuda.get_device_name(0)
        assert "nvJPEG" in json.loads(f.attrs["gpu_decoder"])["library"]


class _Viewing(torch.nn.Module):
    """A model that view()s its 4-D input, as some do: channels_last memory cannot be viewed."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor):
        flat = x.view(x.shape[0], -1)
        return self.inner(flat.view(x.shape))


def test_a_model_that_cannot_run_channels_last_runs_in_the_default_layout(monkeypatch):
    from featx.models import load_backbone

    backbone = load_backbone("resnet18", "none", 32)
    cut = backbone.cut
    monkeypatch.setattr(type(backbone), "cut", lambda self, layers: _Viewing(cut(layers)))
    model = CutModel(backbone, ["flatten"], "avg").eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        got = model(images)["flatten"]
        # torchvision's own modules, default layout
        reference = backbone.model.eval()
        x = images.float().div(255).sub(model.mean).div(model.std)
        x = reference.avgpool(
            reference.layer4(
                reference.layer3(
                    reference.layer2(
                        reference.layer1(
                            reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
                        )
                    )
                )
            )
        )
    assert model.memory_format == torch.contiguous_format
    torch.testing.assert_close(got, torch.flatten(x, 1), rtol=1e-4, atol=1e-5)


# --- the decode reuse race: a decode queued behind a long kernel gives a quiet decode's pixels ---

RACE_TRANSFORM = {"resize": 64, "crop": 56, "interpolation": "bilinear", "antialias": True}
RACE_SLEEP_CYCLES = 10**9  # torch.cuda._sleep: about half a second of one busy kernel on a GPU


def _worker_batches(folder, policy, count: int, size: int) -> list:
    """Batches of ``size`` JPEGs of ``folder`` encoded as featx's workers encode them."""
    from featx.data.loader import SampleDataset, collate
    from featx.data.work import FileRange, WorkItem

    dataset = SampleDataset(policy)
    paths = sorted(folder.rglob("*.jpg"))[: count * size]
    items = [dataset[WorkItem(row, FileRange(str(path)))] for row, path in enumerate(paths)]
    batches = [collate(items[i : i + size]) for i in range(0, len(items), size)]
    assert all(b.encoded is not None and len(b.encoded.indices) == size for b in batches)
    return batches


def check_queued_decodes_match_quiet_ones(folder, device: torch.device, decoder, busy) -> None:
    """Decode batches quietly (synchronised one by one), then again with ``busy()`` queueing a
    long kernel: (1) on the current stream before a decode, as the model's work is; (2) right
    after a batch's decode, before its resize (the decoded images are then still being read
    when the next batch's decoder may reuse their memory), with the next batch decoded back to
    back. Every image must be bit-identical to its quiet decode. On the CPU (``busy`` a no-op,
    a CPU decoder injected) this checks the harness itself."""
    from featx.data.decode import DecodePolicy
    from featx.data.gpu_decode import DecodeStream, on_device

    policy = DecodePolicy(RACE_TRANSFORM, mode="gpu")
    first, second, third = _worker_batches(folder, policy, 3, 16)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    quiet = []
    for batch in (first, second, third):
        quiet.append(on_device(batch, policy, device, decoder).images.clone())
        sync()

    def busy_after(files, where):  # the decoder, then a long kernel before the resize
        images = decoder(files, where)
        busy()
        return images

    stream = DecodeStream(device)
    busy()  # (1) the model's stream busy when the decode is queued
    behind = on_device(first, policy, device, decoder, stream=stream).images
    # (2) a long kernel between this decode and its resize, the next batches back to back
    slow = on_device(second, policy, device, busy_after, stream=stream).images
    after = on_device(third, policy, device, decoder, stream=stream).images
    again = on_device(first, policy, device, decoder, stream=stream).images
    sync()
    for name, got, want in (
        ("behind a busy stream", behind, quiet[0]),
        ("a long kernel before its resize", slow, quiet[1]),
        ("the batch after that", after, quiet[2]),
        ("back to back again", again, quiet[0]),
    ):
        assert got.shape == want.shape, name
        differing = (got != want).flatten(1).any(1).nonzero().flatten().tolist()
        assert torch.equal(got, want), f"{name}: images {differing} differ from a quiet decode"


def test_the_queued_decode_harness_on_the_cpu(many_photos):
    from torchvision.io import ImageReadMode, decode_jpeg

    def cpu_decoder(files, device):
        return decode_jpeg(files, mode=ImageReadMode.RGB, device=device)

    check_queued_decodes_match_quiet_ones(
        many_photos, torch.device("cpu"), cpu_decoder, lambda: None
    )


@pytest.mark.gpu
def test_a_decode_queued_behind_a_long_kernel_gives_a_quiet_decodes_pixels(many_photos):
    from featx.data.gpu_decode import nvjpeg

    check_queued_decodes_match_quiet_ones(
        many_photos,
        torch.device("cuda"),
        nvjpeg,
        lambda: torch.cuda._sleep(RACE_SLEEP_CYCLES),
    )
