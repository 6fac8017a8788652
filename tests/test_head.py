"""featx train-head, predict, evaluate: heads as good as scikit-learn's, safe to save, hard to
misapply, and trainable on files larger than the memory budget."""

from __future__ import annotations

import csv
import json
import shutil
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from featx.config import HeadConfig, parse_bytes, settings
from featx.errors import HeadMismatch, UsageError
from featx.heads.apply import csv_columns, evaluate, predict
from featx.heads.model import load_head
from featx.heads.reports import classification_metrics, report_paths
from featx.heads.rows import FeatureRows, stratified_split
from featx.heads.train import train_head
from featx.models import weights_spec
from featx.store.features_file import write_attrs
from featx.store.reader import FeatureFile
from featx.store.shards import STRING
from tests.conftest import save

TRANSFORM = {"resize": 37, "crop": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
RESNET18 = ["--model", "resnet18", "--image-size", "32", "--workers", "0", "-q"]
NO_WEIGHTS = {
    "source": "torchvision",
    "name": "resnet18",
    "weights": "none",
    "file": None,
    "sha256": None,
}


def write_toml(path, text):
    path.write_text(text + "\n")
    return path


def write_features(
    path: Path,
    x: np.ndarray,
    y: np.ndarray,
    class_names: list[str],
    layer: str = "flatten",
    **attrs: object,
) -> Path:
    """A featx-shaped HDF5 file written with h5py alone, as `featx extract` lays it out."""
    with h5py.File(path, "w") as f:
        f.create_dataset(f"features/{layer}", data=x, chunks=(min(len(x), 512), *x.shape[1:]))
        names = [f"{class_names[c] if c >= 0 else 'unsorted'}/{i:05d}.jpg" for i, c in enumerate(y)]
        f.create_dataset("paths", data=np.asarray(names, dtype=object), dtype=STRING)
        f.create_dataset("labels", data=np.asarray(y, dtype=np.int64))
        write_attrs(
            f,
            {
                "class_names": class_names,
                "model": "resnet18",
                "weights": NO_WEIGHTS,
                "layers": [layer],
                "pool": "avg",
                "transform": TRANSFORM,
                "complete": True,
                **attrs,
            },
        )
    return path


def blobs(rows: int, dim: int, classes: int, spread: float, seed: int = 0):
    """Gaussian clusters, one per class, sorted by class like a class-folder extraction."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 3
    y = np.sort(rng.integers(0, classes, rows))
    x = centres[y] + rng.normal(size=(rows, dim)) * spread
    return (x * 4 + 7).astype(np.float32), y  # far from standardised, as real features are


def sklearn_accuracy(x: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray, C=1.0):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x[train])
    model = LogisticRegression(C=C, max_iter=5000).fit(scaler.transform(x[train]), y[train])
    return model.score(scaler.transform(x[val]), y[val]), model, scaler


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory) -> Path:
    """300 of scikit-learn's 8x8 handwritten digits as PNG files in class folders 0-9."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("digits")
    for i in range(300):
        pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
        save(pixels, root / str(digits.target[i]) / f"{i:04d}.png")
    return root


@pytest.fixture(scope="session")
def digits_features(digits_folder, tmp_path_factory) -> Path:
    from typer.testing import CliRunner

    from featx.cli import app

    out = tmp_path_factory.mktemp("digits-features") / "digits.h5"
    args = ["extract", str(digits_folder), "-o", str(out), "--weights", "none", *RESNET18]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def separable(tmp_path_factory) -> Path:
    x, y = blobs(1200, 24, 4, spread=1.0)
    return write_features(tmp_path_factory.mktemp("syn") / "blobs.h5", x, y, list("abcd"))


# --- as good as scikit-learn ------------------------------------------------------------------


@pytest.mark.slow
def test_linear_head_matches_sklearn_logistic_regression_on_digits_images(
    digits_features, tmp_path, cli
):
    result = cli("train-head", digits_features, "-o", tmp_path / "digits.head", "--json")
    assert result.exit_code == 0, result.stderr
    metrics = json.loads(result.stdout)
    with FeatureFile(digits_features) as f:
        x, y = f.features()[:], f.labels
    train, val = stratified_split(y, 0.2, seed=0)  # the identical split train-head used
    assert metrics["train_size"] == len(train) and metrics["val_size"] == len(val)
    assert [row["support"] for row in metrics["per_class"].values()] == np.bincount(y[val]).tolist()
    reference, _, _ = sklearn_accuracy(x, y, train, val)
    assert abs(metrics["accuracy"] - reference) <= 0.01, (metrics["accuracy"], reference)
    assert metrics["accuracy"] > 0.8  # random-init resnet18 features of digits do separate
    assert "accuracy" in result.stderr and "macro F1" in result.stderr


def test_linear_head_solves_sklearns_objective_on_separable_synthetic_data(separable, tmp_path):
    """Same split, same objective (C = 1 / (weight_decay * n_train)): same probabilities."""
    config = HeadConfig(weight_decay=1e-2, patience=1000)
    result = train_head(separable, tmp_path / "blobs.head", config)
    with FeatureFile(separable) as f:
        x, y = f.features()[:], f.labels
    train, val = stratified_split(y, 0.2, seed=0)
    reference, model, scaler = sklearn_accuracy(x, y, train, val, C=1 / (1e-2 * len(train)))
    assert result.metrics["accuracy"] == pytest.approx(reference, abs=0.01)
    assert result.metrics["accuracy"] > 0.98
    ours = load_head(tmp_path / "blobs.head").probabilities(x[val])
    theirs = model.predict_proba(scaler.transform(x[val]))
    assert np.abs(ours - theirs).max() < 2e-3
    assert result.metrics["stopped"] == "converged"


# --- the head file ----------------------------------------------------------------------------


def test_saved_head_is_safetensors_with_a_json_header_and_reproduces_predictions(
    separable, tmp_path
):
    from safetensors import safe_open

    path = tmp_path / "mlp.head"
    result = train_head(separable, path, HeadConfig(head="mlp", hidden=32, epochs=5))
    with safe_open(str(path), framework="pt") as f:  # no pickle anywhere: plain tensors
        header = json.loads(f.metadata()["featx_head"])
        assert {"mean", "std", "net.0.weight", "net.3.bias"} <= set(f.keys())
    assert header["class_names"] == list("abcd") and header["dim"] == 24
    assert header["layer"] == "flatten" and header["head"]["kind"] == "mlp"
    assert header["extraction"] == {
        "model": "resnet18",
        "weights": NO_WEIGHTS,
        "layer": "flatten",
        "pool": "avg",
        "transform": TRANSFORM,
    }
    head = load_head(path)
    with FeatureFile(separable) as f:
        x, y = f.features()[:], f.labels
    _, val = stratified_split(y, 0.2, seed=0)
    first = head.probabilities(x[val])
    head.save(tmp_path / "copy.head")
    assert np.array_equal(load_head(tmp_path / "copy.head").probabilities(x[val]), first)
    # the weights saved are the weights measured: the same accuracy, to the last row
    assert (first.argmax(axis=1) == y[val]).mean() == result.metrics["accuracy"]
    assert report_paths(path) == (tmp_path / "mlp.metrics.json", tmp_path / "mlp.confusion.png")
    saved = json.loads((tmp_path / "mlp.metrics.json").read_text())
    assert saved["confusion_matrix"] == result.metrics["confusion_matrix"]
    with Image.open(tmp_path / "mlp.confusion.png") as picture:
        assert picture.format == "PNG" and picture.width > 100


def test_training_is_deterministic_with_a_seed(separable, tmp_path):
    config = HeadConfig(head="mlp", hidden=16, epochs=5, seed=3)
    train_head(separable, tmp_path / "a.head", config)
    train_head(separable, tmp_path / "b.head", config)
    a, b = load_head(tmp_path / "a.head").module, load_head(tmp_path / "b.head").module
    for (name, left), right in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(left, right), name


def test_not_a_head_file_is_a_one_line_error(tmp_path, cli, separable):
    (tmp_path / "junk.head").write_bytes(b"\x80\x04not safetensors")
    result = cli("predict", separable, "--head", tmp_path / "junk.head", "-o", tmp_path / "p.csv")
    assert result.exit_code == 2
    assert (
        result.stderr.startswith("featx: error: head") and "not a safetensors file" in result.stderr
    )
    assert len(result.stderr.strip().splitlines()) == 1


# --- refusing what does not fit ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"layer": "layer3"}, "has no layer 'flatten'"),
        ({"model": "resnet50"}, "model: 'resnet18' → 'resnet50'"),
        ({"pool": "max"}, "pool: 'avg' → 'max'"),
        ({"transform": {**TRANSFORM, "crop": 64}}, "transform.crop: 32 → 64"),
        ({"weights": {**NO_WEIGHTS, "weights": "IMAGENET1K_V1"}}, "weights.weights: 'none'"),
    ],
)
def test_head_refuses_features_of_another_extraction(separable, tmp_path, cli, change, message):
    train_head(separable, tmp_path / "h.head", HeadConfig(epochs=2))
    x, y = blobs(40, 24, 4, spread=1.0, seed=1)
    other = write_features(tmp_path / "other.h5", x, y, list("abcd"), **change)
    result = cli("predict", other, "--head", tmp_path / "h.head", "-o", tmp_path / "p.csv")
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "p.csv").exists()
    with FeatureFile(other) as f, pytest.raises(HeadMismatch):
        load_head(tmp_path / "h.head").check(f)
    # --val must come from the same extraction too
    again = cli("train-head", separable, "-o", tmp_path / "v.head", "--val", other)
    assert again.exit_code == 2 and message.split(":")[0] in again.stderr


def test_unlabelled_rows_are_refused_for_training(tmp_path, cli):
    x, y = blobs(60, 8, 2, spread=1.0)
    y[5] = -1
    path = write_features(tmp_path / "f.h5", x, y, ["a", "b"])
    result = cli("train-head", path, "-o", tmp_path / "h.head")
    assert result.exit_code == 2
    assert "1 of 60 rows are unlabelled (label -1, e.g. unsorted/00005.jpg)" in result.stderr
    assert not (tmp_path / "h.head").exists()


def test_several_layers_need_layer_and_conflicting_options_are_named(tmp_path, cli, separable):
    path = tmp_path / "two.h5"
    shutil.copy(separable, path)
    with h5py.File(path, "a") as f:
        f["features/layer3"] = f["features/flatten"][:, :8]
        f.attrs["layers"] = json.dumps(["layer3", "flatten"])
    ambiguous = cli("train-head", path, "-o", tmp_path / "h.head")
    assert ambiguous.exit_code == 2 and "several layers (layer3, flatten)" in ambiguous.stderr
    picked = cli("train-head", path, "-o", tmp_path / "h.head", "--layer", "layer3", "--json")
    assert picked.exit_code == 0 and json.loads(picked.stdout)["layer"] == "layer3"
    assert load_head(tmp_path / "h.head").dim == 8
    both = cli("train-head", path, "-o", tmp_path / "x.head", "--val", path, "--val-split", "0.3")
    assert both.exit_code == 2 and "--val and --val-split" in both.stderr
    exists = cli("train-head", path, "-o", tmp_path / "h.head", "--layer", "layer3")
    assert exists.exit_code == 2 and "--overwrite" in exists.stderr


def test_head_config_checks_and_toml(tmp_path, cli, separable):
    with pytest.raises(UsageError, match="--head 'tree'"):
        HeadConfig(head="tree")
    with pytest.raises(UsageError, match="--optimizer lbfgs is for --head linear"):
        HeadConfig(head="mlp", optimizer="lbfgs")
    with pytest.raises(UsageError, match="--val-split"):
        HeadConfig(val_split=1.0)
    with pytest.raises(UsageError, match="unknown option"):
        settings(HeadConfig, {}, write_toml(tmp_path / "typo.toml", "hiden = 3"))
    assert parse_bytes("64KB") == 65536 and parse_bytes("2GB") == 2 << 30
    config = tmp_path / "head.toml"
    config.write_text(
        '[train-head]\nhead = "mlp"\nhidden = 16\nepochs = 3\nclass-weight = "balanced"\n'
    )
    result = cli("train-head", separable, "-o", tmp_path / "t.head", "--config", config, "-q")
    assert result.exit_code == 0 and result.stderr == ""
    header = load_head(tmp_path / "t.head").header
    assert header["head"] == {"kind": "mlp", "hidden": 16, "dropout": 0.2}
    assert header["training"]["config"]["class_weight"] == "balanced"


def head_configs() -> list[Path]:
    import tomllib

    root = Path(__file__).resolve().parents[1] / "configs"
    return [p for p in sorted(root.glob("*.toml")) if "train-head" in tomllib.loads(p.read_text())]


@pytest.mark.parametrize("config", head_configs(), ids=lambda p: p.stem)
def test_every_train_head_config_in_configs_runs(config, separable, tmp_path, cli):
    import tomllib

    table = tomllib.loads(config.read_text())["train-head"]
    out = tmp_path / "c.head"
    result = cli("train-head", separable, "-o", out, "--config", config, "--epochs", "2", "-q")
    assert result.exit_code == 0, result.stderr
    trained_with = load_head(out).header["training"]["config"]
    assert trained_with["head"] == table.get("head", "linear")
    assert trained_with["epochs"] == 2  # the flag won over the config


# --- training: validation file, class weights, MLP --------------------------------------------


def test_val_file_and_evaluate_give_the_same_metrics(separable, tmp_path, cli):
    x, y = blobs(200, 24, 4, spread=1.0, seed=0)  # the same clusters, new rows
    held = write_features(tmp_path / "held.h5", x + 0.1, y, list("abcd"))
    trained = cli("train-head", separable, "-o", tmp_path / "h.head", "--val", held, "--json")
    assert trained.exit_code == 0, trained.stderr
    metrics = json.loads(trained.stdout)
    assert metrics["train_size"] == 1200 and metrics["val_size"] == 200
    result = cli("evaluate", held, "--head", tmp_path / "h.head", "--json")
    assert result.exit_code == 0, result.stderr
    measured = json.loads(result.stdout)
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "confusion_matrix", "per_class"):
        assert measured[key] == metrics[key], key
    assert (tmp_path / "held.h.metrics.json").is_file()  # beside the source, named by the head
    assert (tmp_path / "held.h.confusion.png").is_file()


def test_evaluate_matches_classes_by_name_and_refuses_unknown_ones(separable, tmp_path):
    train_head(separable, tmp_path / "h.head", HeadConfig())
    x, y = blobs(200, 24, 4, spread=1.0, seed=0)
    keep = y >= 2  # only classes c and d, listed in another order
    reordered = write_features(tmp_path / "cd.h5", x[keep], 3 - y[keep], ["d", "c"])
    same = write_features(tmp_path / "abcd.h5", x, y, list("abcd"))
    by_name = evaluate(reordered, tmp_path / "h.head").metrics
    direct = evaluate(same, tmp_path / "h.head").metrics
    for name in "cd":  # the same rows, the same predictions: the same recall
        for key in ("recall", "support"):
            assert by_name["per_class"][name][key] == direct["per_class"][name][key]
    assert by_name["per_class"]["a"]["support"] == 0
    unknown = write_features(tmp_path / "e.h5", x, y, ["a", "b", "c", "elephant"])
    with pytest.raises(UsageError, match="classes the head does not know: elephant"):
        evaluate(unknown, tmp_path / "h.head")


def test_balanced_class_weight_recovers_a_rare_class(tmp_path):
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(1900, int), np.ones(100, int)]  # 5% rare, overlapping the common class
    x = rng.normal(size=(2000, 4)).astype(np.float32)
    x[:, 0] += y * 1.5
    path = write_features(tmp_path / "skew.h5", x, y, ["common", "rare"])
    plain = train_head(path, tmp_path / "plain.head", HeadConfig()).metrics
    balanced = train_head(path, tmp_path / "bal.head", HeadConfig(class_weight="balanced")).metrics
    assert balanced["per_class"]["rare"]["recall"] > plain["per_class"]["rare"]["recall"] + 0.3
    assert balanced["balanced_accuracy"] > plain["balanced_accuracy"]


def test_mlp_head_learns_what_a_linear_head_cannot(tmp_path):
    rng = np.random.default_rng(0)
    points = rng.uniform(-1, 1, size=(1500, 2))
    y = (np.hypot(*points.T) > 0.7).astype(int)  # a disc inside a ring
    x = np.c_[points, rng.normal(size=(1500, 6)) * 0.1].astype(np.float32)
    path = write_features(tmp_path / "ring.h5", x, y, ["inside", "outside"])
    linear = train_head(path, tmp_path / "l.head", HeadConfig()).metrics
    mlp = train_head(path, tmp_path / "m.head", HeadConfig(head="mlp", hidden=64, lr=1e-2)).metrics
    assert mlp["accuracy"] > 0.9 > linear["accuracy"] + 0.1


# --- memory -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_streams_a_file_larger_than_the_memory_budget(tmp_path):
    x, y = blobs(4000, 512, 4, spread=12.0)
    path = write_features(tmp_path / "big.h5", x.astype(np.float16), y, list("wxyz"))
    feature_bytes = 4000 * 512 * 4  # as float32, what training would hold if it loaded it all
    whole = train_head(path, tmp_path / "whole.head", HeadConfig(patience=3)).metrics
    tracemalloc.start()
    try:
        streamed = train_head(
            path, tmp_path / "streamed.head", HeadConfig(patience=3, memory_budget="1MB")
        ).metrics
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < feature_bytes / 4, (peak, feature_bytes)
    assert streamed["accuracy"] == pytest.approx(whole["accuracy"], abs=0.002)
    with FeatureFile(path) as f:
        sample = f.features()[:2000].astype(np.float32)
    a = load_head(tmp_path / "whole.head").probabilities(sample)
    b = load_head(tmp_path / "streamed.head").probabilities(sample)
    assert np.abs(a - b).max() < 1e-3  # full-batch L-BFGS: the same optimum either way


def test_feature_rows_stream_every_row_once_in_bounded_reads(separable):
    with FeatureFile(separable) as f:
        dataset = f.features()
        index = np.flatnonzero(np.arange(len(f)) % 3 != 1)
        rows = FeatureRows(dataset, index, budget=24 * 4 * 4 * 100)  # blocks of 100 rows
        assert not rows.in_memory and rows.block_rows == 100
        for rng in (None, np.random.default_rng(0)):
            seen = []
            for positions, x in rows.blocks(rng):
                assert len(positions) <= rows.block_rows
                assert np.array_equal(x, dataset[:][index[positions]])
                seen.append(positions)
            assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(len(index)))
        assert rows.largest_read <= rows.block_rows
        assert np.array_equal(rows.load(), dataset[:][index])


def test_stratified_split_holds_out_a_fraction_of_every_class():
    y = np.repeat(np.arange(4), [50, 10, 2, 1])
    train, val = stratified_split(y, 0.2, seed=0)
    assert np.bincount(y[val], minlength=4).tolist() == [10, 2, 1, 0]
    assert np.array_equal(np.sort(np.r_[train, val]), np.arange(len(y)))
    assert np.array_equal(stratified_split(y, 0.2, seed=0)[1], val)
    assert not np.array_equal(stratified_split(y, 0.2, seed=1)[1], val)


def test_metrics_equal_sklearns():
    from sklearn import metrics as sk

    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 300)  # class 4 never occurs; class 3 is never predicted
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 3, 300))
    ours = classification_metrics(y_true, y_pred, ["a", "b", "c", "d", "e"])
    assert ours["accuracy"] == pytest.approx(sk.accuracy_score(y_true, y_pred))
    assert ours["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y_true, y_pred))
    assert ours["macro_f1"] == pytest.approx(
        sk.f1_score(y_true, y_pred, average="macro", zero_division=0)
    )
    precision, recall, f1, support = sk.precision_recall_fscore_support(
        y_true, y_pred, labels=range(5), zero_division=0
    )
    for i, row in enumerate(ours["per_class"].values()):
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx(
            (precision[i], recall[i], f1[i])
        )
        assert row["support"] == support[i]
    assert ours["confusion_matrix"] == sk.confusion_matrix(y_true, y_pred, labels=range(5)).tolist()


# --- predict ----------------------------------------------------------------------------------


def test_weights_spec_turns_recorded_weights_back_into_a_weights_option(tmp_path):
    from featx.models import file_digest
    from featx.models._backbone import provenance

    assert weights_spec(provenance("torchvision", "resnet18", "IMAGENET1K_V1")) == "IMAGENET1K_V1"
    assert weights_spec(provenance("torchvision", "resnet18", "none")) == "none"
    assert weights_spec(provenance("timm", "timm:resnet18", "a1_in1k")) == "a1_in1k"
    weights = tmp_path / "my weights.pth"
    weights.write_bytes(b"tensors")
    recorded = provenance("torchvision", "resnet18", "file", str(weights), file_digest(weights))
    assert weights_spec(recorded) == str(weights)
    weights.write_bytes(b"other tensors")
    with pytest.raises(HeadMismatch, match="changed since"):
        weights_spec(recorded)
    weights.unlink()
    with pytest.raises(HeadMismatch, match="not there"):
        weights_spec(recorded)


@pytest.mark.slow
def test_predict_on_images_equals_extract_then_predict_on_features(
    photos, resnet18_file, tmp_path, cli
):
    features = tmp_path / "photos.h5"
    extracted = cli("extract", photos, "-o", features, *RESNET18, "--weights", resnet18_file)
    assert extracted.exit_code == 0, extracted.stderr
    trained = cli("train-head", features, "-o", tmp_path / "p.head", "-q")
    assert trained.exit_code == 0, trained.stderr
    folder = tmp_path / "new"
    shutil.copytree(photos, folder)
    (folder / "thing" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    from_images = cli("predict", folder, "--head", tmp_path / "p.head", "-o", tmp_path / "a.csv")
    assert from_images.exit_code == 0, from_images.stderr
    assert "skipped thing/broken.jpg" in from_images.stderr and "5 rows" in from_images.stderr
    from_file = cli("predict", features, "--head", tmp_path / "p.head", "-o", tmp_path / "b.csv")
    assert from_file.exit_code == 0, from_file.stderr
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    rows = list(csv.DictReader((tmp_path / "a.csv").read_text().splitlines()))
    assert list(rows[0]) == csv_columns(2)  # top-k is capped at the two classes
    assert [row["path"] for row in rows] == [
        "animal/astronaut.png",
        "animal/chelsea.jpg",
        "thing/coffee.jpg",
        "thing/rocket.jpg",
        "thing/sub/camera.png",
    ]
    for row in rows:
        assert row["predicted_class"] == row["top1_class"]
        assert float(row["top1_probability"]) >= float(row["top2_probability"])
        assert float(row["top1_probability"]) + float(row["top2_probability"]) == pytest.approx(
            1, abs=1e-5
        )
    assert not list(tmp_path.glob(".a.csv.features.h5*"))  # the scratch extraction is gone


def crops(array: np.ndarray, count: int, offset: int) -> list[np.ndarray]:
    """Deterministic crops (60-90% of each side), every other one mirrored, shrunk to 96 px."""
    height, width = array.shape[:2]
    out = []
    for i in range(offset, offset + count):
        scale = 0.6 + 0.3 * ((i * 7) % 10) / 10
        h, w = int(height * scale), int(width * scale)
        top, left = (height - h) * ((i * 3) % 5) // 4, (width - w) * ((i * 2) % 5) // 4
        crop = np.ascontiguousarray(array[top : top + h, left : left + w])
        image = Image.fromarray(crop[:, ::-1] if i % 2 else crop).convert("RGB")
        out.append(np.asarray(image.resize((96, 96 * h // w))))
    return out


def test_end_to_end_from_real_photos_through_extract_train_head_predict(
    photo_arrays, tmp_path, cli
):
    classes = {"cat": "chelsea", "coffee": "coffee", "rocket": "rocket"}
    for split, count, offset in (("train", 10, 0), ("new", 4, 10)):
        for name, photo in classes.items():
            for i, array in enumerate(crops(photo_arrays[photo], count, offset)):
                save(array, tmp_path / split / name / f"{name}{i}.jpg", quality=90)

    weights = ["--weights", "none"]
    extracted = cli("extract", tmp_path / "train", "-o", tmp_path / "f.h5", *RESNET18, *weights)
    assert extracted.exit_code == 0, extracted.stderr
    trained = cli("train-head", tmp_path / "f.h5", "-o", tmp_path / "photos.head", "--json")
    assert trained.exit_code == 0, trained.stderr
    metrics = json.loads(trained.stdout)
    assert metrics["class_names"] == ["cat", "coffee", "rocket"]
    assert metrics["train_size"] + metrics["val_size"] == 30 and metrics["epochs_run"] >= 1
    assert "precision  recall" in trained.stderr and "wrote" in trained.stderr

    predicted = cli(
        "predict",
        tmp_path / "new",
        "--head",
        tmp_path / "photos.head",
        "-o",
        tmp_path / "predictions.csv",
        "--top-k",
        "3",
        "--json",
    )
    assert predicted.exit_code == 0, predicted.stderr
    summary = json.loads(predicted.stdout)
    assert summary["rows"] == 12 and summary["failed"] == []
    rows = list(csv.DictReader((tmp_path / "predictions.csv").read_text().splitlines()))
    assert list(rows[0]) == csv_columns(3)
    right = sum(row["path"].split("/")[0] == row["predicted_class"] for row in rows)
    assert right >= 9, rows  # unseen crops of the three photos

    evaluated = cli("evaluate", tmp_path / "new", "--head", tmp_path / "photos.head", "--json")
    assert evaluated.exit_code == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["accuracy"] == pytest.approx(right / 12)
    assert (tmp_path / "new.photos.confusion.png").is_file()


def test_predict_library_call_and_existing_output(separable, tmp_path):
    train_head(separable, tmp_path / "h.head", HeadConfig(epochs=3))
    result = predict(separable, tmp_path / "h.head", tmp_path / "p.csv")
    assert result.rows == 1200 and sum(result.class_counts.values()) == 1200
    with pytest.raises(UsageError, match="exists"):
        predict(separable, tmp_path / "h.head", tmp_path / "p.csv")
    measured = evaluate(separable, tmp_path / "h.head", tmp_path / "e.metrics.json")
    assert measured.picture == str(tmp_path / "e.confusion.png")
    assert measured.metrics["rows"] == 1200


@pytest.mark.gpu
def test_head_trains_on_the_gpu_like_on_the_cpu(separable, tmp_path):
    cpu = train_head(separable, tmp_path / "cpu.head", HeadConfig(device="cpu")).metrics
    gpu = train_head(separable, tmp_path / "gpu.head", HeadConfig(device="cuda")).metrics
    assert gpu["accuracy"] == pytest.approx(cpu["accuracy"], abs=0.005)


def _header(**changes):
    header = {
        "class_names": ["a", "b"],
        "dim": 8,
        "layer": "avgpool",
        "head": {"kind": "mlp", "hidden": 16},
        "extraction": {
            "model": "resnet18",
            "layer": "avgpool",
            "pool": "avg",
            "weights": NO_WEIGHTS,
            "transform": TRANSFORM,
        },
    }
    return {**header, **changes}


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({}, ""),
        ({"class_names": [], "dim": 0}, "class_names must be a list of 1 to 100000 names"),
        ({"class_names": ["a", "x" * 1001]}, "class_names must be strings of at most 1000"),
        ({"dim": True, "head": {"kind": "rnn"}}, "dim must be an integer from 1 to 16777216"),
        ({"head": {"kind": "rnn"}, "layer": 3}, "head.kind must be one of linear, mlp"),
        ({"head": {"kind": "mlp", "hidden": 0}}, "head.hidden must be an integer from 1 to 65536"),
        ({"head": {"kind": "linear", "hidden": None}}, ""),
        ({"extraction": [], "layer": 3}, "extraction must be a table"),
        ({"extraction": {"model": "m", "layer": "l"}}, "extraction.pool must be a string"),
        ({"layer": None, "extraction": {"model": "m", "layer": "l", "pool": "p"}}, "layer must"),
        ({"extraction": {"model": "m", "layer": "l", "pool": "p"}}, "extraction.weights must be"),
        (
            {
                "extraction": {
                    "model": "m",
                    "layer": "l",
                    "pool": "p",
                    "weights": {},
                    "transform": 1,
                }
            },
            "extraction.transform must be a table",
        ),
        (
            {"extraction": {**_header()["extraction"], "transform": {"crop": 5000}}},
            "extraction.transform.crop must be an integer from 1 to 4096",
        ),
    ],
)
def test_header_problem_names_the_first_thing_wrong_in_a_fixed_order(changes, problem):
    from featx.heads.model import header_problem

    found = header_problem(_header(**changes))
    assert found.startswith(problem) and bool(found) == bool(problem)
