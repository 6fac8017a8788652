"""Heads a practitioner can trust: a near-constant feature cannot flip a prediction, `.cls`
numbers get their names, predict and evaluate show the truth and the mistakes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from featx.config import HeadConfig
from featx.heads.apply import predict
from featx.heads.model import HEADER_KEY, load_head
from featx.heads.rows import SCALE_FLOOR, floored_scale
from featx.heads.train import train_head
from featx.store.reader import FeatureFile
from tests.archives import jpeg, write_tar
from tests.conftest import save
from tests.test_head import RESNET18, crops, write_features

CLASSES = {"cat": "chelsea", "coffee": "coffee", "rocket": "rocket"}


# --- a near-constant feature ------------------------------------------------------------------


def near_constant_case(tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """Two well-separated classes; feature 0 has std 4.8e-6 on the training rows and moves by
    ±0.015 on the held-out ones (a standardised value of about ±3,000 without a floor)."""
    rng = np.random.default_rng(0)
    centres = np.array([[-1.0] * 9, [1.0] * 9])
    y_train, y_val = np.repeat([0, 1], 100), np.repeat([0, 1], 20)
    x_train = np.hstack(
        [rng.normal(0, 4.8e-6, (200, 1)), centres[y_train] + rng.normal(size=(200, 9))]
    )
    shift = np.where(np.arange(40) % 2, 0.015, -0.015)[:, None]
    x_val = np.hstack([shift, centres[y_val] + rng.normal(size=(40, 9))])
    train = write_features(tmp_path / "train.h5", x_train.astype(np.float32), y_train, ["a", "b"])
    val = write_features(tmp_path / "val.h5", x_val.astype(np.float32), y_val, ["a", "b"])
    return train, val, x_train.astype(np.float32), x_val.astype(np.float32)


def test_a_near_constant_feature_no_longer_flips_predictions(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train, val, x_train, x_val = near_constant_case(tmp_path)
    y_train, y_val = np.repeat([0, 1], 100), np.repeat([0, 1], 20)
    # The case bites: StandardScaler's standardisation flips held-out rows...
    scaler = StandardScaler().fit(x_train)
    scaled = LogisticRegression().fit(scaler.transform(x_train), y_train)
    assert scaled.score(scaler.transform(x_val), y_val) < 0.9
    # ...which logistic regression on the raw features gets right.
    raw = LogisticRegression(max_iter=5000).fit(x_train, y_train).predict(x_val)
    assert (raw == y_val).all()

    result = train_head(train, tmp_path / "h.head", HeadConfig(val=str(val)))
    assert result.metrics["accuracy"] == 1.0
    head = load_head(tmp_path / "h.head")
    assert (head.probabilities(x_val).argmax(axis=1) == raw).all()
    assert head.header["scale_floor"] == SCALE_FLOOR
    assert head.module.std[0] == pytest.approx(SCALE_FLOOR * x_train.std(axis=0).mean(), rel=1e-3)


def test_the_floor_leaves_features_of_ordinary_scale_as_standard_scaler_has_them():
    from sklearn.preprocessing import StandardScaler

    x = np.random.default_rng(1).normal(size=(50, 6)) * [1, 2, 3, 0.5, 1e-6, 0]
    scale = floored_scale(x.std(axis=0))
    expected = StandardScaler().fit(x).scale_
    np.testing.assert_allclose(scale[:4], expected[:4], rtol=1e-12)
    floor = SCALE_FLOOR * x.std(axis=0).mean()
    np.testing.assert_allclose(scale[4:], [floor, floor])
    assert (floored_scale(np.zeros(3)) == 1).all()  # every feature constant: nothing to scale


def test_an_old_head_without_the_floor_predicts_exactly_as_before(tmp_path):
    train, val, x_train, x_val = near_constant_case(tmp_path)
    train_head(train, tmp_path / "new.head", HeadConfig(val=str(val)))
    # The head file as featx wrote it before the floor: the raw std, no scale_floor.
    tensors = load_file(tmp_path / "new.head")
    tensors["std"] = torch.from_numpy(np.where(x_train.std(axis=0) > 0, x_train.std(axis=0), 1))
    header = load_head(tmp_path / "new.head").header
    del header["scale_floor"]
    header["standardisation"] = "tensors mean and std, from the training rows only"
    save_file(tensors, tmp_path / "old.head", metadata={HEADER_KEY: json.dumps(header)})

    old = load_head(tmp_path / "old.head")
    z = (x_val - tensors["mean"].numpy()) / tensors["std"].numpy()
    logits = z @ tensors["net.0.weight"].numpy().T + tensors["net.0.bias"].numpy()
    expected = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    np.testing.assert_allclose(old.probabilities(x_val), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_readme_demo_head_gets_its_three_held_out_photos_right(tmp_path, cli):
    script = Path(__file__).parents[1] / "scripts" / "sample_photos.py"
    subprocess.run([sys.executable, script, tmp_path / "photos"], check=True, capture_output=True)
    model = ["--model", "efficientnet_lite0", "--workers", "0", "-q"]
    extracted = cli("extract", tmp_path / "photos", "-o", tmp_path / "feats.h5", *model)
    assert extracted.exit_code == 0, extracted.stderr
    trained = cli("train-head", tmp_path / "feats.h5", "-o", tmp_path / "cats.head", "--json")
    assert trained.exit_code == 0, trained.stderr
    metrics = json.loads(trained.stdout)
    assert metrics["val_size"] == 3 and metrics["accuracy"] == 1.0


# --- --class-names ----------------------------------------------------------------------------


def test_class_names_name_the_cls_numbers_so_a_folder_head_evaluates_tar_features(
    photo_arrays, tmp_path, cli
):
    for name, photo in CLASSES.items():
        for i, array in enumerate(crops(photo_arrays[photo], 8, 0)):
            save(array, tmp_path / "train" / name / f"{name}{i}.jpg", quality=90)
    members, truth = [], {}
    for number, photo in enumerate(CLASSES.values()):
        for i, array in enumerate(crops(photo_arrays[photo], 3, 8)):
            key = f"{number}{i:08d}"
            members += [(f"{key}.jpg", jpeg(array, 90)), (f"{key}.cls", str(number).encode())]
            truth[f"shard.tar/{key}.jpg"] = list(CLASSES)[number]
    write_tar(tmp_path / "tars" / "shard.tar", members)
    (tmp_path / "classes.txt").write_text("cat\ncoffee\nrocket\n")

    tar = tmp_path / "tars" / "shard.tar"
    extracted = cli(
        "extract", tar, "-o", tmp_path / "tar.h5", "--class-names", tmp_path / "classes.txt",
        *RESNET18, "--weights", "none",
    )  # fmt: skip
    assert extracted.exit_code == 0, extracted.stderr
    with FeatureFile(tmp_path / "tar.h5") as data:
        assert data.class_names == list(CLASSES)
        stored = {p: data.class_names[c] for p, c in zip(data.paths, data.labels, strict=True)}
    assert stored == truth

    folder = cli(
        "extract", tmp_path / "train", "-o", tmp_path / "f.h5", *RESNET18, "--weights", "none"
    )
    assert folder.exit_code == 0, folder.stderr
    trained = cli("train-head", tmp_path / "f.h5", "-o", tmp_path / "h.head")
    assert trained.exit_code == 0, trained.stderr
    evaluated = cli("evaluate", tmp_path / "tar.h5", "--head", tmp_path / "h.head", "--json")
    assert evaluated.exit_code == 0, evaluated.stderr
    predict(tmp_path / "tar.h5", tmp_path / "h.head", tmp_path / "p.csv")
    rows = list(csv.DictReader((tmp_path / "p.csv").read_text().splitlines()))
    right = sum(truth[row["path"]] == row["predicted_class"] for row in rows)
    assert json.loads(evaluated.stdout)["accuracy"] == pytest.approx(right / 9)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"cat\ncoffee\ncat\n", "line 3 repeats the name on line 1"),
        (b"cat\n\nrocket\n", "line 2 is empty"),
        (b"cat\n\xff\xfe\n", "not UTF-8"),
        (b"", "no class names"),
        (b"cat\x07\n", "control character"),
    ],
)
def test_a_bad_class_names_file_is_one_line_and_exit_2(tmp_path, cli, content, message):
    write_tar(tmp_path / "shard.tar", [("0.jpg", b"x"), ("0.cls", b"0")])
    (tmp_path / "names.txt").write_bytes(content)
    result = cli(
        "extract", tmp_path / "shard.tar", "-o", tmp_path / "o.h5",
        "--class-names", tmp_path / "names.txt", *RESNET18,
    )  # fmt: skip
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_class_names_refuse_a_folder_and_a_folder_as_the_file(tmp_path, cli, photos):
    folder = cli("extract", photos, "-o", tmp_path / "o.h5", "--class-names", photos, *RESNET18)
    assert folder.exit_code == 2 and "--class-names" in folder.stderr
    write_tar(tmp_path / "shard.tar", [("0.jpg", b"x"), ("0.cls", b"0")])
    directory = cli(
        "extract", tmp_path / "shard.tar", "-o", tmp_path / "o.h5", "--class-names", tmp_path,
        *RESNET18,
    )  # fmt: skip
    assert directory.exit_code == 2 and "not a regular file" in directory.stderr


def test_a_class_number_the_file_does_not_name_is_refused(tmp_path, cli, photo_arrays):
    image = jpeg(crops(photo_arrays["chelsea"], 1, 0)[0])
    write_tar(
        tmp_path / "shard.tar",
        [("0.jpg", image), ("0.cls", b"0"), ("1.jpg", image), ("1.cls", b"4")],
    )
    (tmp_path / "names.txt").write_text("cat\ncoffee\n")
    result = cli(
        "extract", tmp_path / "shard.tar", "-o", tmp_path / "o.h5",
        "--class-names", tmp_path / "names.txt", *RESNET18, "--weights", "none",
    )  # fmt: skip
    assert result.exit_code == 2 and "class 4" in result.stderr, result.stderr
