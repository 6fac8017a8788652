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
    # and probe, on the same 18 photos, gets every fold right (it scored 0.950 ± 0.100 before)
    probed = cli("probe", tmp_path / "feats.h5", "--json")
    assert probed.exit_code == 0, probed.stderr
    best = json.loads(probed.stdout)["probes"][0]
    assert best["accuracy"] == 1.0, best


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


# --- predict and evaluate on labelled input ----------------------------------------------------


@pytest.fixture(scope="module")
def labelled_photos(photo_arrays, tmp_path_factory, resnet18_file) -> dict[str, Path]:
    """Photos in class folders, their features by `featx extract` and a head; two new photos
    are in the wrong folder (a rocket under cat, a cat under coffee), so it has mistakes."""
    from typer.testing import CliRunner

    from featx.cli import app

    root = tmp_path_factory.mktemp("labelled")
    for split, count, offset in (("train", 6, 0), ("new", 5, 6)):
        for name, photo in CLASSES.items():
            for i, array in enumerate(crops(photo_arrays[photo], count, offset)):
                save(array, root / split / name / f"{name}{i}.jpg", quality=90)
    save(crops(photo_arrays["rocket"], 1, 20)[0], root / "new" / "cat" / "zz_rocket.jpg")
    save(crops(photo_arrays["chelsea"], 1, 20)[0], root / "new" / "coffee" / "zz_cat.jpg")
    model = [*RESNET18, "--weights", str(resnet18_file)]
    runner = CliRunner()
    for split in ("train", "new"):
        args = ["extract", str(root / split), "-o", str(root / f"{split}.h5"), *model]
        assert runner.invoke(app, args).exit_code == 0
    trained = runner.invoke(app, ["train-head", str(root / "train.h5"), "-o", str(root / "h.head")])
    assert trained.exit_code == 0, trained.stderr
    return {"root": root, "new": root / "new", "features": root / "new.h5", "head": root / "h.head"}


def test_predict_on_labelled_images_adds_true_class_keeps_features_and_prints_accuracy(
    labelled_photos, tmp_path, cli
):
    from tests.conftest import assert_same_file

    kept = tmp_path / "kept.h5"
    result = cli(
        "predict", labelled_photos["new"], "--head", labelled_photos["head"],
        "-o", tmp_path / "p.csv", "--features-out", kept, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader((tmp_path / "p.csv").read_text().splitlines()))
    assert [row["true_class"] for row in rows] == [row["path"].split("/")[0] for row in rows]
    right = sum(row["true_class"] == row["predicted_class"] for row in rows)
    summary = json.loads(result.stdout)
    assert summary["labelled_rows"] == 17 and summary["accuracy"] == pytest.approx(right / 17)
    assert f"accuracy {right / 17:.3f} on 17 labelled rows" in result.stderr
    assert "accuracy" not in result.stdout.replace('"accuracy"', "")  # stdout: JSON only
    # The kept features are what `featx extract` gives, and evaluate reads them as they are.
    assert_same_file(kept, labelled_photos["features"])
    again = cli("predict", kept, "--head", labelled_photos["head"], "-o", tmp_path / "q.csv")
    assert again.exit_code == 0, again.stderr
    assert (tmp_path / "q.csv").read_text() == (tmp_path / "p.csv").read_text()


def test_predict_on_unlabelled_features_has_no_true_class(separable_unlabelled, tmp_path):
    features, head = separable_unlabelled
    result = predict(features, head, tmp_path / "p.csv")
    header = (tmp_path / "p.csv").read_text().splitlines()[0]
    assert "true_class" not in header and result.accuracy is None and result.labelled_rows == 0


@pytest.fixture
def separable_unlabelled(tmp_path) -> tuple[Path, Path]:
    from tests.test_head import blobs

    x, y = blobs(60, 5, 2, spread=0.5)
    train = write_features(tmp_path / "t.h5", x, y, ["a", "b"])
    train_head(train, tmp_path / "h.head", HeadConfig(epochs=2))
    return write_features(tmp_path / "u.h5", x, np.full(60, -1), ["a", "b"]), tmp_path / "h.head"


def test_evaluate_errors_csv_lists_exactly_the_misclassified_rows(labelled_photos, tmp_path, cli):
    features, head = labelled_photos["features"], labelled_photos["head"]
    result = cli(
        "evaluate", features, "--head", head, "-o", tmp_path / "m.json",
        "--errors", tmp_path / "errors.csv", "--errors-png", tmp_path / "errors.png",
        "--top-k", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    # Independently: the head's probabilities on the features, row by row.
    loaded = load_head(head)
    with FeatureFile(features) as data:
        probs = loaded.probabilities(data.features(loaded.layer)[:])
        truth = [data.class_names[c] for c in data.labels]
        paths = data.paths
    predicted = [loaded.class_names[i] for i in probs.argmax(axis=1)]
    expected = [(path, t, p) for path, t, p in zip(paths, truth, predicted, strict=True) if t != p]
    assert expected, "the case needs mistakes"
    rows = list(csv.DictReader((tmp_path / "errors.csv").read_text().splitlines()))
    assert [(r["path"], r["true_class"], r["predicted_class"]) for r in rows] == expected
    assert list(rows[0]) == [
        "path", "true_class", "predicted_class", "probability",
        "top1_class", "top1_probability", "top2_class", "top2_probability",
    ]  # fmt: skip
    for row in rows:
        p = probs[paths.index(row["path"])]
        assert float(row["probability"]) == pytest.approx(p.max(), rel=1e-5)
        assert row["top1_class"] == row["predicted_class"]
    from PIL import Image

    with Image.open(tmp_path / "errors.png") as sheet:
        assert sheet.format == "PNG" and sheet.width > 100


def test_errors_csv_cells_are_spreadsheet_safe(tmp_path):
    from featx.heads.mistakes import Mistake, write_errors_csv

    mistake = Mistake("=cmd|' /C calc'!A0.jpg", 0, np.array([0.2, 0.8]))
    write_errors_csv(tmp_path / "e.csv", [mistake], ["=a", "+b"], 2, overwrite=False)
    (row,) = list(csv.DictReader((tmp_path / "e.csv").read_text().splitlines()))
    assert row["path"].startswith("'=") and row["true_class"] == "'=a"
    assert row["predicted_class"] == "'+b" and row["top2_class"] == "'=a"


def test_features_out_refuses_a_features_file_source(labelled_photos, tmp_path, cli):
    result = cli(
        "predict", labelled_photos["features"], "--head", labelled_photos["head"],
        "-o", tmp_path / "p.csv", "--features-out", tmp_path / "k.h5",
    )  # fmt: skip
    assert result.exit_code == 2 and "features file already" in result.stderr


# --- pictures ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "title",
    [
        "h.head: 20% of each class held out (seed 0)",
        "a_very_long_head_file_name_without_any_spaces_at_all_0123456789.head on x",
    ],
)
def test_confusion_png_title_is_never_clipped(tmp_path, title):
    from PIL import Image, ImageDraw

    from featx.heads.confusion_png import _font, confusion_png, title_lines

    confusion_png(
        [[2, 1, 0], [0, 3, 0], [1, 0, 2]], ["cat", "coffee", "rocket"], tmp_path / "c.png", title
    )
    with Image.open(tmp_path / "c.png") as image:
        width = image.width
        header = np.asarray(image.convert("L"))[:40]
    font = _font(14)
    lines = title_lines(title, font, width - 32)
    assert "".join(lines).replace(" ", "") == title.replace(" ", "")  # every character kept
    for line in lines:  # each line's drawn box lies inside the picture
        box = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((16, 16), line, font=font)
        assert 0 <= box[0] and box[2] <= width
    assert (header[:, -8:] == 255).all()  # no ink reaches the right edge
