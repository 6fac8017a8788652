"""``featx extract --augment K``: each image's clean view exactly as without it, and K seeded
augmented views in ``views/<layer>`` that depend only on (seed, image, view).

References: the plain run's file for the clean view; torchvision's own ``resized_crop`` and
``hflip`` and the model's own forward for a view.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from featx.config import ExtractConfig
from featx.data import views as views_module
from featx.data.views import ViewPolicy, crop_box, view_key
from featx.pipeline import extract
from featx.store.merge import merge
from tests.conftest import SETTINGS, SETTINGS_CONFIG, assert_same_file

# 3 shards of 16 images, 2 images (6 crops) per forward pass
AUGMENTED = dataclasses.replace(
    SETTINGS_CONFIG, augment=2, augment_seed=7, shard_size=16, batch_size=6
)


@pytest.fixture(scope="module")
def augmented(many_photos, tmp_path_factory) -> Path:
    """The 48 photos, --augment 2 --augment-seed 7, one uninterrupted run."""
    out = tmp_path_factory.mktemp("augmented") / "views.h5"
    extract(many_photos, out, AUGMENTED)
    return out


def _datasets(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        names: list[str] = []
        f.visit(names.append)
        return {name: f[name][()] for name in names if isinstance(f[name], h5py.Dataset)}


def test_augment_0_gives_exactly_the_file_of_a_run_without_it(
    many_photos, uninterrupted, tmp_path, cli
):
    out = tmp_path / "zero.h5"
    result = cli("extract", many_photos, "-o", out, *SETTINGS, "--augment", "0")
    assert result.exit_code == 0, result.output
    assert_same_file(out, uninterrupted)
    with h5py.File(out, "r") as f:
        assert "views" not in f and "augment" not in f.attrs


def test_the_clean_view_is_the_plain_runs_features_and_the_views_sit_beside_them(
    augmented, uninterrupted
):
    plain, views = _datasets(uninterrupted), _datasets(augmented)
    for name, values in plain.items():  # features, paths, labels, failed: bit for bit
        np.testing.assert_array_equal(views[name], values, err_msg=name)
    layer = next(name for name in plain if name.startswith("features/")).split("/", 1)[1]
    stacked = views[f"views/{layer}"]
    assert stacked.shape == (48, 2, *plain[f"features/{layer}"].shape[1:])
    assert stacked.dtype == plain[f"features/{layer}"].dtype
    # views differ from the clean view and from each other
    assert not np.allclose(stacked[:, 0], plain[f"features/{layer}"])
    assert not np.allclose(stacked[:, 0], stacked[:, 1])
    with h5py.File(augmented, "r") as f:
        recorded = f.attrs["augment"]
    assert '"views": 2' in recorded and '"seed": 7' in recorded and "crop-flip" in recorded


def test_a_view_is_torchvisions_resized_crop_and_flip_through_the_models_own_forward(
    augmented, many_photos
):
    from torchvision.io import decode_jpeg
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    from featx.models import load_backbone

    backbone = load_backbone("resnet18", "none", 64)
    transform = backbone.transform
    with h5py.File(augmented, "r") as f:
        name = f["paths"][5].decode()
        layer = next(iter(f["features"]))
        stored = f[f"views/{layer}"][5]
    data = (many_photos / name).read_bytes()
    image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    key = view_key(7, name)
    crops = []
    for view in (1, 2):  # the crop box and flip drawn from (key, view) alone
        draw = random.Random(key * 1_000_003 + view)
        top, left, h, w = crop_box(*image.shape[-2:], draw)
        crop = F.resized_crop(
            image,
            top,
            left,
            h,
            w,
            [transform["crop"]] * 2,
            interpolation=InterpolationMode(transform["interpolation"]),
            antialias=True,
        )
        crops.append(F.horizontal_flip(crop) if draw.random() < views_module.FLIP else crop)
    model = backbone.model.eval()
    model.fc = torch.nn.Identity()  # its forward now ends at the classifier's input: the layer
    x = torch.stack(crops).float().div(255)
    x = F.normalize(x, transform["mean"], transform["std"])
    with torch.no_grad():
        reference = model(x).numpy()
    scale = np.abs(reference).max()
    np.testing.assert_allclose(stored, reference, atol=5e-3 * scale)


def test_a_views_key_depends_on_the_seed_and_the_image_name_only():
    assert view_key(7, "a/img001.jpg") == view_key(7, "a/img001.jpg")
    assert view_key(7, "a/img001.jpg") != view_key(8, "a/img001.jpg")
    assert view_key(7, "a/img001.jpg") != view_key(7, "a/img002.jpg")
    assert ViewPolicy(2, 7).describe()["views"] == 2


@pytest.mark.slow
def test_a_resume_with_other_batches_and_workers_gives_the_same_views(
    augmented, many_photos, tmp_path, monkeypatch
):
    import featx.pipeline

    out = tmp_path / "resumed.h5"
    work = out.with_name(out.name + ".featx")

    def stop_before_assembly(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(featx.pipeline, "finish", stop_before_assembly)
        with pytest.raises(KeyboardInterrupt):
            extract(many_photos, out, AUGMENTED)
    shards = sorted(work.glob("shard-*.h5"))
    assert len(shards) == 3 and not out.exists()
    for shard in shards[::2]:  # two shards computed again, in other batches, by a worker
        shard.unlink()
    extract(many_photos, out, dataclasses.replace(AUGMENTED, batch_size=9, workers=1))
    assert_same_file(out, augmented)


@pytest.mark.slow
def test_shard_parts_then_merge_give_the_one_process_views(augmented, many_photos, tmp_path):
    out = tmp_path / "parts.h5"
    for k in range(3):
        extract(many_photos, out, dataclasses.replace(AUGMENTED, shard=(k, 3)))
    merge(out)
    merged, single = _datasets(out), _datasets(augmented)
    assert sorted(merged) == sorted(single)
    for name, values in single.items():
        np.testing.assert_array_equal(merged[name], values, err_msg=name)


def test_augment_is_in_the_fingerprint_a_resume_with_other_views_is_refused(
    photos, tmp_path, monkeypatch
):
    import featx.pipeline
    from featx.errors import ResumeMismatch

    out = tmp_path / "f.h5"
    with monkeypatch.context() as patched:
        patched.setattr(featx.pipeline, "finish", lambda *a, **k: (_ for _ in ()).throw(OSError))
        with pytest.raises(OSError):
            extract(photos, out, AUGMENTED)
    for other in (dataclasses.replace(AUGMENTED, augment_seed=8), SETTINGS_CONFIG):
        with pytest.raises(ResumeMismatch, match="augment"):
            extract(photos, out, other)


def test_augment_takes_0_to_64_views():
    from featx.errors import UsageError

    with pytest.raises(UsageError, match="augment"):
        ExtractConfig(augment=65)
    with pytest.raises(UsageError, match="augment"):
        ExtractConfig(augment=-1)


def test_probe_on_real_views_learns_from_every_view_of_the_drawn_images_only(
    augmented, monkeypatch
):
    """`featx probe --per-class N` on an --augment file: a `linear+views` learning curve whose
    fits train on every view of the drawn images and score the other images' clean views."""
    from featx.config import ProbeConfig
    from featx.heads import _probe_folds
    from featx.heads.probe import probe

    splits = []
    split_rows = _probe_folds.LayerRows.split_rows

    def recorded(self, train, test, views):
        trained, scored = split_rows(self, train, test, views)
        splits.append((views, set(self.images_of(trained)), set(self.images_of(scored))))
        return trained, scored

    monkeypatch.setattr(_probe_folds.LayerRows, "split_rows", recorded)
    config = ProbeConfig(
        folds=2, inner_folds=2, c_grid=(1.0,), per_class=(4,), protocol=("linear",)
    )
    (layer,) = probe([augmented], config).probes
    protocols = [point.protocol for point in layer.learning_curve]
    assert protocols == ["linear", "linear+views"]
    assert layer.accuracy_with_views is not None
    assert any(views for views, _, _ in splits)
    for _, trained, scored in splits:  # no image on both sides, whatever the fit
        assert trained and scored and not trained & scored
    curve_fits = [(t, s) for views, t, s in splits if views and len(t) == 8]  # 4 per class
    assert len(curve_fits) == 5  # one per seeded draw


def test_with_decode_gpu_the_views_are_made_by_the_cpu_workers_and_the_file_says_so():
    from featx.models import load_backbone
    from featx.plan import decode_policy

    backbone = load_backbone("resnet18", "none", 64)
    config = dataclasses.replace(AUGMENTED, decode="gpu", quiet=True)
    policy = decode_policy(backbone, config, torch.device("cuda"))  # a device object, no GPU
    assert policy.mode == "cpu" and policy.views == ViewPolicy(2, 7)
    assert "nvJPEG" not in policy.describe()["jpeg"]
    plain = decode_policy(backbone, dataclasses.replace(config, augment=0), torch.device("cuda"))
    assert plain.mode == "gpu" and plain.views is None


@pytest.mark.slow
def test_with_pool_none_the_views_are_spatial_maps_that_average_to_the_pooled_views(
    augmented, many_photos, tmp_path
):
    maps_out = tmp_path / "maps.h5"
    extract(many_photos, maps_out, dataclasses.replace(AUGMENTED, pool="none", layers=("layer4",)))
    with h5py.File(maps_out, "r") as maps, h5py.File(augmented, "r") as pooled:
        spatial = maps["views/layer4"][()]
        assert spatial.ndim == 5 and spatial.shape[:2] == (48, 2)  # [N, K, C, H, W]
        assert spatial.shape[2:] == maps["features/layer4"].shape[1:]
        # resnet18's own avgpool + flatten after layer4 is the default layer's view
        np.testing.assert_allclose(
            spatial.mean(axis=(3, 4)), pooled["views/flatten"][()], rtol=1e-4, atol=1e-5
        )
