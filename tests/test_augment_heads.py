"""Heads on augmented features files (``featx extract --augment K``): train-head trains on every
view of its training images and validates on the clean views of the others, probe folds by image
and reports the accuracy with and without the views in training, predict and evaluate average
over the views with --tta; plain files behave exactly as before."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from featx.config import HeadConfig, PredictConfig, ProbeConfig, parse_bytes
from featx.errors import EXIT_USAGE
from featx.heads._probe_folds import stratified_folds
from featx.heads.apply import evaluate, predict
from featx.heads.model import load_head
from featx.heads.probe import probe
from featx.heads.rows import SCALE_FLOOR, FeatureRows, stratified_split
from featx.heads.train import head_split, train_head
from featx.heads.views import ImageViews, image_of, rows_of
from featx.store.reader import FeatureFile
from tests import test_probe
from tests.test_probe import DIGITS, _extract

K = 2
digits = test_probe.digits  # its fixtures: the digits as PNGs, one torch thread
_one_thread = test_probe._one_thread


@pytest.fixture(scope="module")
def plain(digits, tmp_path_factory) -> Path:
    """test_probe's extraction of its digits: resnet18 at 32 px, seeded random weights."""
    return _extract(digits, tmp_path_factory.mktemp("plain") / "digits.h5", "--weights", "none")


@pytest.fixture(scope="module")
def augmented(digits, tmp_path_factory) -> Path:
    """The same digits through ``featx extract --augment K``: real crop-flip views."""
    out = tmp_path_factory.mktemp("aug") / "digits-aug.h5"
    return _extract(digits, out, "--weights", "none", "--augment", str(K))


def _all(path: Path, layer: str = "flatten") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(clean [n, d], views [n, K, d], labels) read with h5py alone."""
    with h5py.File(path) as f:
        return f[f"features/{layer}"][:], f[f"views/{layer}"][:], f["labels"][:]


def _reference_probabilities(x_train, y_train, x_test, c):
    """scikit-learn's LogisticRegression at C on standardised rows (the README's floored
    scale: max(std_j, SCALE_FLOOR * mean std))."""
    from sklearn.linear_model import LogisticRegression

    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std = np.maximum(std, SCALE_FLOOR * std.mean())
    model = LogisticRegression(C=c, max_iter=10000, tol=1e-8)
    model.fit((x_train - mean) / std, y_train)
    return model.predict_proba((x_test - mean) / std)


# --- the row numbering ------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 9),
    k=st.integers(1, 4),
    bounds=st.tuples(st.integers(0, 60), st.integers(0, 60)),
)
def test_image_views_read_clean_rows_then_each_images_views_in_order(
    tmp_path_factory, n, k, bounds
):
    rng = np.random.default_rng(n * 10 + k)
    clean, views = rng.normal(size=(n, 3)), rng.normal(size=(n, k, 3))
    flat = np.concatenate([clean, views.reshape(n * k, 3)])
    path = tmp_path_factory.mktemp("iv") / "f.h5"
    with h5py.File(path, "w") as f:
        f["c"], f["v"] = clean, views
        source = ImageViews(f["c"], f["v"])
        start, stop = sorted(b % (len(flat) + 1) for b in bounds)
        assert source.shape == flat.shape
        assert np.array_equal(source[start:stop], flat[start:stop])
    rows = rows_of(np.arange(n), n, k)
    assert np.array_equal(rows, np.arange(n * (1 + k)))
    assert np.array_equal(
        image_of(rows, n, k), np.concatenate([np.arange(n), np.repeat(np.arange(n), k)])
    )


# --- train-head -------------------------------------------------------------------------------


def test_train_head_split_keeps_every_view_of_an_image_on_one_side(augmented, plain):
    with FeatureFile(augmented) as f:
        labels, n, k = f.labels, len(f), f.augmented_views
    assert k == K
    split = head_split(labels, k, HeadConfig(val_split=0.25, seed=3))
    train_of_rows = image_of(split.train_rows, n, k)
    assert not set(train_of_rows) & set(split.val_images)
    assert set(train_of_rows) == set(split.train_images)
    # every view of every training image, each once
    assert np.array_equal(
        np.bincount(train_of_rows, minlength=n)[split.train_images],
        [1 + K] * len(split.train_images),
    )
    assert len(split.train_rows) == len(np.unique(split.train_rows)) == len(split.train_images) * 3
    # the images are split as a plain file's rows are
    train, val = stratified_split(labels, 0.25, seed=3)
    assert np.array_equal(split.train_images, train) and np.array_equal(split.val_images, val)
    with FeatureFile(plain) as f:
        plain_split = head_split(f.labels, f.augmented_views, HeadConfig(val_split=0.25, seed=3))
    assert np.array_equal(plain_split.train_rows, train) and plain_split.views == 1


def test_train_head_on_views_matches_sklearn_trained_on_every_view_of_the_training_images(
    augmented, tmp_path
):
    decay = 1e-2
    result = train_head(
        augmented,
        tmp_path / "aug.head",
        HeadConfig(layer="layer2", weight_decay=decay, patience=1000),
    )
    clean, views, y = _all(augmented, "layer2")
    train, val = stratified_split(y, 0.2, seed=0)
    x_train = np.concatenate([clean[train], views[train].reshape(-1, clean.shape[1])])
    y_train = np.concatenate([y[train], np.repeat(y[train], K)])
    theirs = _reference_probabilities(x_train, y_train, clean[val], c=1 / (decay * len(x_train)))
    ours = load_head(tmp_path / "aug.head").probabilities(clean[val])
    # the same objective solved: L-BFGS stops at its own tolerance, sklearn's at tol=1e-8
    assert np.abs(ours - theirs).max() < 1e-2
    accuracy = float((theirs.argmax(axis=1) == y[val]).mean())
    assert result.metrics["accuracy"] == pytest.approx(accuracy, abs=1 / len(val) + 1e-9)
    assert result.metrics["train_size"] == len(train) and result.metrics["val_size"] == len(val)
    assert result.metrics["trained_on_views"] == 1 + K
    assert load_head(tmp_path / "aug.head").header["training"]["trained_on_views"] == 1 + K


def test_train_head_on_a_plain_file_records_one_view_and_ignores_nothing(plain, tmp_path, cli):
    result = cli("train-head", plain, "--layer", "flatten", "-o", tmp_path / "p.head", "--json")
    assert result.exit_code == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["trained_on_views"] == 1
    assert "clean views" not in metrics["evaluated_on"]


def test_train_head_cli_says_what_it_trained_on(augmented, tmp_path, cli):
    result = cli("train-head", augmented, "--layer", "flatten", "-o", tmp_path / "a.head")
    assert result.exit_code == 0, result.stderr
    assert "× 3 views" in result.stderr and "clean views only" in result.stderr


# --- probe ------------------------------------------------------------------------------------

ONE_C = ProbeConfig(folds=3, c_grid=(0.1,), layers=("layer2",), protocol=("linear",))


@pytest.mark.parametrize("budget", ["512MB", "40KB"])  # held in memory; streamed from the file
def test_probe_folds_keep_every_view_of_an_image_on_one_side(augmented, budget):
    from featx.heads._probe_folds import LayerRows

    clean, views, y = _all(augmented, "layer2")
    with FeatureFile(augmented) as f:
        keep = np.arange(0, len(f), 2)  # as --max-rows keeps some: sorted image rows
        source = LayerRows(f, "layer2", keep, f.labels, parse_bytes(budget))
        assert source.in_memory == (budget == "512MB")
        for test in stratified_folds(y[keep], 3, seed=0):
            train = np.setdiff1d(np.arange(len(keep)), test)
            trained, scored = source.split_rows(train, test, views=True)
            assert not set(source.images_of(trained)) & set(source.images_of(scored))
            assert np.array_equal(source.images_of(scored), keep[test])
            assert np.array_equal(np.unique(source.images_of(trained)), keep[train])
            # the rows read are each training image's clean row and all its views
            read = FeatureRows(source.base, trained, 1 << 30).load()
            expected = np.concatenate(
                [clean[keep[train]], views[keep[train]].reshape(-1, clean.shape[1])]
            )
            assert np.array_equal(np.sort(read, axis=0), np.sort(expected, axis=0))
            scored_rows = FeatureRows(source.base, scored, 1 << 30).load()
            assert np.array_equal(scored_rows, clean[keep[test]])


def test_probe_reports_accuracy_with_and_without_views_as_sklearn_on_the_same_folds(
    augmented, plain
):
    (result,) = probe([augmented], ONE_C).probes
    (before,) = probe([plain], ONE_C).probes
    # trained on clean rows: exactly what a file without views gives
    assert result.fold_accuracy == before.fold_accuracy and result.accuracy == before.accuracy
    assert before.accuracy_with_views is None and before.views_per_image == 1
    assert result.views_per_image == 1 + K and result.fold_c_with_views == [0.1] * 3
    clean, views, y = _all(augmented, "layer2")
    folds = stratified_folds(y, 3, seed=0)
    for test, accuracy in zip(folds, result.fold_accuracy_with_views, strict=True):
        train = np.setdiff1d(np.arange(len(y)), test)
        x_train = np.concatenate([clean[train], views[train].reshape(-1, clean.shape[1])])
        y_train = np.concatenate([y[train], np.repeat(y[train], K)])
        reference = _reference_probabilities(x_train, y_train, clean[test], 0.1)
        expected = float((reference.argmax(axis=1) == y[test]).mean())
        assert abs(accuracy - expected) <= 1 / len(test) + 1e-9, (accuracy, expected)
    assert result.accuracy_with_views == pytest.approx(np.mean(result.fold_accuracy_with_views))


def test_probe_cli_shows_both_accuracies_only_for_a_file_with_views(augmented, plain, cli):
    quick = ["--folds", "3", "--c-grid", "0.1", "--layer", "layer2", "--protocol", "linear"]
    result = cli("probe", augmented, *quick, "--json")
    assert result.exit_code == 0, result.stderr
    (row,) = json.loads(result.stdout)["probes"]
    assert {"accuracy", "accuracy_with_views", "c_with_views", "views_per_image"} <= set(row)
    assert row["views_per_image"] == 3 and row["c_with_views"] == 0.1
    assert "with views" in result.stderr.splitlines()[0]
    # train-head trains on every view of this file: its weight decay is for all those rows
    with FeatureFile(augmented) as f:
        train, _ = stratified_split(f.labels, 0.2, seed=0)
    assert f"--weight-decay {1 / (0.1 * len(train) * 3):.6g}" in result.stderr
    plain_run = cli("probe", plain, *quick, "--json")
    (row,) = json.loads(plain_run.stdout)["probes"]
    assert row["accuracy_with_views"] is None and "with views" not in plain_run.stderr


# --- predict and evaluate: --tta --------------------------------------------------------------


@pytest.fixture(scope="module")
def head(augmented, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("head") / "digits.head"
    train_head(augmented, out, HeadConfig(layer="layer2"))
    return out


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("budget", ["512MB", "20KB"])  # one block; many blocks
def test_tta_is_the_mean_of_the_heads_probabilities_over_each_images_views(
    augmented, head, tmp_path, budget
):
    config = PredictConfig(tta=True, top_k=0, memory_budget=budget)
    result = predict(augmented, head, tmp_path / "p.csv", config)
    clean, views, y = _all(augmented, "layer2")
    model = load_head(head)
    per_view = [model.probabilities(clean)] + [model.probabilities(views[:, k]) for k in range(K)]
    mean = np.mean(per_view, axis=0)
    rows = _csv(tmp_path / "p.csv")
    assert [row["predicted_class"] for row in rows] == [
        model.class_names[i] for i in mean.argmax(1)
    ]
    got = np.array([float(row["probability"]) for row in rows])
    assert np.allclose(got, mean.max(axis=1), rtol=1e-5, atol=1e-7)
    assert result.views_averaged == 1 + K
    assert result.accuracy == pytest.approx(float((mean.argmax(1) == y).mean()), abs=1e-6)
    metrics = evaluate(augmented, head, tmp_path / "e.json", config).metrics
    assert metrics["views_averaged"] == 1 + K
    assert metrics["accuracy"] == pytest.approx(float((mean.argmax(1) == y).mean()), abs=1e-6)


def test_without_tta_predict_and_evaluate_use_the_clean_view_alone(
    augmented, plain, head, tmp_path
):
    predict(augmented, head, tmp_path / "aug.csv", PredictConfig())
    predict(plain, head, tmp_path / "plain.csv", PredictConfig())
    assert (tmp_path / "aug.csv").read_bytes() == (tmp_path / "plain.csv").read_bytes()
    clean, _, y = _all(augmented, "layer2")
    expected = float((load_head(head).probabilities(clean).argmax(1) == y).mean())
    metrics = evaluate(augmented, head, tmp_path / "e.json").metrics
    assert metrics["views_averaged"] == 1
    assert metrics["accuracy"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_tta_without_views_is_a_one_line_usage_error(plain, digits, head, tmp_path, cli, command):
    for source, says in [(plain, "has none"), (digits, "extract it with --augment K")]:
        result = cli(command, source, "--head", head, "-o", tmp_path / "out", "--tta")
        assert result.exit_code == EXIT_USAGE, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and says in result.stderr
        assert not (tmp_path / "out").exists()


def test_tta_cli_says_how_many_views_each_prediction_averages(augmented, head, tmp_path, cli):
    result = cli("predict", augmented, "--head", head, "-o", tmp_path / "p.csv", "--tta", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["views_averaged"] == 1 + K
    assert "each the mean of 3 views" in result.stderr


# --- info and export --------------------------------------------------------------------------


def test_info_says_images_times_views_for_an_augmented_file(augmented, plain, cli):
    result = cli("info", augmented)
    assert result.exit_code == 0, result.stderr
    assert f"{DIGITS} images × (1 + {K}) views" in result.stdout
    assert json.loads(cli("info", augmented, "--json").stdout)["views_per_image"] == 1 + K
    assert "views" not in cli("info", plain).stdout.splitlines()[0]


def test_export_npy_keeps_each_images_views_in_its_row(augmented, plain, tmp_path, cli):
    result = cli("export", augmented, "-o", tmp_path / "aug", "--format", "npy")
    assert result.exit_code == 0, result.stderr
    assert f"with {K} augmented views each" in result.stderr
    clean, views, _ = _all(augmented, "layer2")
    assert np.array_equal(np.load(tmp_path / "aug" / "layer2.npy"), clean)
    assert np.array_equal(np.load(tmp_path / "aug" / "views" / "layer2.npy"), views)
    result = cli("export", plain, "-o", tmp_path / "plain", "--format", "npy", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["views_per_image"] == 1
    assert "augmented" not in result.stderr
    assert not (tmp_path / "plain" / "views").exists()
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == sorted(
        p.name for p in (tmp_path / "aug").iterdir() if p.name != "views"
    )


def test_export_parquet_carries_each_images_views_in_its_row(augmented, plain, tmp_path, cli):
    import pyarrow.parquet as pq

    assert (
        cli("export", augmented, "-o", tmp_path / "a.parquet", "--format", "parquet").exit_code == 0
    )
    table = pq.read_table(tmp_path / "a.parquet")
    clean, views, _ = _all(augmented, "layer2")
    assert table.num_rows == DIGITS
    assert np.array_equal(np.array(table["layer2"].to_pylist()), clean)
    assert np.array_equal(np.array(table["views/layer2"].to_pylist()), views)
    assert cli("export", plain, "-o", tmp_path / "p.parquet", "--format", "parquet").exit_code == 0
    plain_columns = pq.read_table(tmp_path / "p.parquet").column_names
    assert plain_columns == [c for c in table.column_names if not c.startswith("views/")]
