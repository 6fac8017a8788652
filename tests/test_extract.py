"""featx extract: features equal torchvision's own, labels, bad images, output file, CLI."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
import torchvision
from torchvision.io import ImageReadMode, decode_image
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.transforms._presets import ImageClassification

from featx import ExtractConfig, FeatureFile, extract
from tests.conftest import RESIZE_TOLERANCE, SMALL


def reference_features(root, relpaths, weights_file, layers, pool="avg", crop=64):
    """What featx must produce, computed with torchvision alone: decode_image, the weights'
    ImageClassification preset at this crop size, create_feature_extractor, then pooling."""
    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(weights_file, weights_only=True))
    model.eval()
    preset = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    resize = round(crop * preset.resize_size[0] / preset.crop_size[0])
    transform = ImageClassification(crop_size=crop, resize_size=resize)
    extractor = create_feature_extractor(model, {layer: layer for layer in layers})
    expected = {}
    with torch.no_grad():
        for rel in relpaths:
            image = decode_image(str(root / rel), mode=ImageReadMode.RGB)
            out = extractor(transform(image).unsqueeze(0))
            vectors = {}
            for layer, value in out.items():
                if value.ndim == 4:
                    value = value.mean(dim=(2, 3)) if pool == "avg" else value.amax(dim=(2, 3))
                vectors[layer] = value[0].numpy()
            expected[rel] = vectors
    return expected


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def test_features_equal_torchvision_reference_for_several_layers_in_one_pass(
    photos, resnet18_file, tmp_path, cli
):
    out = tmp_path / "feats.h5"
    result = cli(
        "extract",
        photos,
        "-o",
        out,
        *SMALL,
        "--weights",
        resnet18_file,
        "--layer",
        "layer3",
        "--layer",
        "flatten",
    )
    assert result.exit_code == 0, result.output
    with h5py.File(out, "r") as f:  # plain h5py reads it
        paths = [p.decode() for p in f["paths"][:]]
        stored = {layer: f["features"][layer][:] for layer in ("layer3", "flatten")}
        assert f["features/layer3"].shape == (5, 256)
        assert f["features/flatten"].shape == (5, 512)
        assert f["features/flatten"].dtype == np.float32
    expected = reference_features(photos, paths, resnet18_file, ["layer3", "flatten"])
    for row, rel in enumerate(paths):
        for layer in ("layer3", "flatten"):
            assert relative_error(stored[layer][row], expected[rel][layer]) < RESIZE_TOLERANCE, (
                rel,
                layer,
            )


def test_max_pool_matches_reference(photos, resnet18_file, tmp_path):
    out = tmp_path / "max.h5"
    extract(
        photos,
        out,
        ExtractConfig(
            model="resnet18",
            weights=str(resnet18_file),
            layers=("layer2",),
            pool="max",
            image_size=64,
            workers=0,
            progress=False,
        ),
    )
    with FeatureFile(out) as f:
        paths, stored = f.paths, f.features()[:]
    expected = reference_features(photos, paths, resnet18_file, ["layer2"], pool="max")
    for row, rel in enumerate(paths):
        assert relative_error(stored[row], expected[rel]["layer2"]) < RESIZE_TOLERANCE


def test_class_folders_become_labels_in_sorted_order(photos, tmp_path):
    out = tmp_path / "f.h5"
    extract(
        photos,
        out,
        ExtractConfig(model="resnet18", weights="none", image_size=64, workers=0, progress=False),
    )
    with FeatureFile(out) as f:
        assert f.class_names == ["animal", "thing"]
        assert f.paths == [
            "animal/astronaut.png",
            "animal/chelsea.jpg",
            "thing/coffee.jpg",
            "thing/rocket.jpg",
            "thing/sub/camera.png",
        ]
        assert f.labels.tolist() == [0, 0, 1, 1, 1]
        assert f.labels.dtype == np.int64
        assert f.attrs["complete"] is True or f.attrs["complete"] == 1


def test_unlabelled_folder_gets_label_minus_one(photos, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted(photos.rglob("*.jpg")):
        shutil.copy(path, flat / path.name)
    out = tmp_path / "f.h5"
    extract(
        flat,
        out,
        ExtractConfig(model="resnet18", weights="none", image_size=64, workers=0, progress=False),
    )
    with FeatureFile(out) as f:
        assert f.paths == ["chelsea.jpg", "coffee.jpg", "rocket.jpg"]
        assert f.labels.tolist() == [-1, -1, -1]
        assert f.class_names == []


def test_file_records_full_provenance(photos, resnet18_file, tmp_path):
    out = tmp_path / "f.h5"
    extract(
        photos,
        out,
        ExtractConfig(
            model="resnet18", weights=str(resnet18_file), image_size=64, workers=0, progress=False
        ),
    )
    with h5py.File(out, "r") as f:
        attrs = dict(f.attrs)
        for key in (
            "class_names",
            "model",
            "weights",
            "layers",
            "pool",
            "transform",
            "featx_version",
            "torch_version",
            "torchvision_version",
            "created",
            "source",
            "complete",
        ):
            assert key in attrs, key
        transform = json.loads(attrs["transform"])
        assert transform["crop"] == 64 and transform["resize"] == 73
        assert transform["mean"] == [0.485, 0.456, 0.406]
        assert transform["interpolation"] == "bilinear"
        assert json.loads(attrs["layers"]) == ["flatten"]  # the classifier's input by default
        assert attrs["model"] == "resnet18"
        weights = json.loads(attrs["weights"])
        assert weights["weights"] == "file" and len(weights["sha256"]) == 64
        assert attrs["torch_version"] == str(torch.__version__)
        assert bool(attrs["complete"])


def test_bad_images_are_recorded_and_good_ones_are_unchanged(photos, tmp_path):
    dirty = tmp_path / "dirty"
    shutil.copytree(photos, dirty)
    (dirty / "animal" / "empty.jpg").write_bytes(b"")
    (dirty / "thing" / "page.jpg").write_text("<html><body>not an image</body></html>")
    good = (photos / "thing" / "coffee.jpg").read_bytes()
    (dirty / "thing" / "half.jpg").write_bytes(good[: len(good) // 2])
    config = ExtractConfig(
        model="resnet18", weights="none", image_size=64, workers=0, progress=False, batch_size=3
    )
    extract(photos, tmp_path / "clean.h5", config)
    extract(dirty, tmp_path / "dirty.h5", config)
    with FeatureFile(tmp_path / "clean.h5") as clean, FeatureFile(tmp_path / "dirty.h5") as f:
        assert f.paths == clean.paths
        assert f.labels.tolist() == clean.labels.tolist()
        np.testing.assert_allclose(f.features()[:], clean.features()[:], rtol=1e-5, atol=1e-6)
        failed = dict(f.failed)
    assert sorted(failed) == ["animal/empty.jpg", "thing/half.jpg", "thing/page.jpg"]
    assert "empty" in failed["animal/empty.jpg"]
    assert failed["thing/page.jpg"].startswith("UnidentifiedImageError")
    assert "truncated" in failed["thing/half.jpg"].lower()


def test_cli_json_summary_on_stdout_and_info(photos, tmp_path, cli):
    out = tmp_path / "f.h5"
    result = cli("extract", photos, "-o", out, *SMALL, "--weights", "none", "--json")
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    assert summary["images"] == 5 and summary["failed"] == 0
    assert summary["output"] == str(out)
    info = cli("info", out, "--json")
    assert info.exit_code == 0
    described = json.loads(info.stdout)
    assert described["images"] == 5
    assert described["feature_shapes"] == {"flatten": [512]}
    assert described["model"] == "resnet18"
    assert described["class_counts"] == {"animal": 2, "thing": 3}
    assert described["class_names"] == ["animal", "thing"]
    human = cli("info", out)
    assert "features/flatten: 5 x 512 float32" in human.stdout


def test_existing_output_is_refused_unless_overwrite(photos, tmp_path, cli):
    out = tmp_path / "f.h5"
    assert cli("extract", photos, "-o", out, *SMALL, "--weights", "none").exit_code == 0
    again = cli("extract", photos, "-o", out, *SMALL, "--weights", "none")
    assert again.exit_code == 2
    assert "exists" in again.stderr and "--overwrite" in again.stderr
    replaced = cli(
        "extract", photos, "-o", out, *SMALL, "--weights", "none", "--pool", "max", "--overwrite"
    )
    assert replaced.exit_code == 0
    with FeatureFile(out) as f:
        assert f.attrs["pool"] == "max"


def test_wrong_layer_fails_before_any_image_with_suggestions(photos, tmp_path, cli):
    result = cli(
        "extract", photos, "-o", tmp_path / "f.h5", *SMALL, "--weights", "none", "--layer", "layer5"
    )
    assert result.exit_code == 2
    assert "no layer 'layer5' in resnet18" in result.stderr
    assert "did you mean" in result.stderr and "layer4" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "f.h5").exists()
    assert not (tmp_path / "f.h5.featx").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "resnet51"], "unknown model 'resnet51'"),
        (["--weights", "IMAGENET9K"], "has weights DEFAULT"),
        (["--pool", "mean"], "--pool 'mean'"),
        (["--weights", "missing.pth"], "no such file"),
    ],
)
def test_bad_options_are_one_line_usage_errors(photos, tmp_path, cli, args, message):
    result = cli("extract", photos, "-o", tmp_path / "f.h5", "--image-size", "64", "-q", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_source_and_unwritable_output_fail_before_work(tmp_path, cli, photos):
    missing = cli("extract", tmp_path / "nope", "-o", tmp_path / "f.h5", *SMALL)
    assert missing.exit_code == 2 and "no such file or directory" in missing.stderr
    no_dir = cli("extract", photos, "-o", tmp_path / "no" / "f.h5", *SMALL)
    assert no_dir.exit_code == 2 and "does not exist" in no_dir.stderr


def test_float16_storage(photos, tmp_path):
    out = tmp_path / "f.h5"
    extract(
        photos,
        out,
        ExtractConfig(
            model="resnet18",
            weights="none",
            image_size=64,
            workers=0,
            progress=False,
            dtype="float16",
        ),
    )
    with FeatureFile(out) as f:
        assert f.features().dtype == np.float16


def test_pool_none_keeps_maps_and_layers_lists_shapes(photos, tmp_path, cli):
    out = tmp_path / "f.h5"
    extract(
        photos,
        out,
        ExtractConfig(
            model="resnet18",
            weights="none",
            image_size=64,
            layers=("layer4",),
            pool="none",
            workers=0,
            progress=False,
        ),
    )
    with FeatureFile(out) as f:
        assert f.features().shape == (5, 512, 2, 2)
    listing = cli("layers", "resnet18", "--image-size", "64", "--json")
    layers = {entry["name"]: entry for entry in json.loads(listing.stdout)["layers"]}
    assert layers["layer4"]["shape"] == [512, 2, 2] and layers["layer4"]["dim"] == 512
    assert layers["layer1"]["shape"] == [64, 16, 16]
    assert layers["flatten"]["dim"] == 512
    assert json.loads(listing.stdout)["default"] == "flatten"
    table = cli("layers", "resnet18", "--image-size", "64")
    assert "layer4.1.relu_1" in table.stdout and "(default)" in table.stdout


def test_workers_give_the_same_features_as_in_process_decoding(photos, tmp_path):
    base = ExtractConfig(model="resnet18", weights="none", image_size=64, progress=False)
    extract(photos, tmp_path / "a.h5", base.replace(workers=0))
    extract(photos, tmp_path / "b.h5", base.replace(workers=2, batch_size=2))
    with FeatureFile(tmp_path / "a.h5") as a, FeatureFile(tmp_path / "b.h5") as b:
        assert a.paths == b.paths
        np.testing.assert_allclose(a.features()[:], b.features()[:], rtol=1e-5, atol=1e-6)
