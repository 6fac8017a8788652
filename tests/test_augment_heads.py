"""Heads on augmented features files (``featx extract --augment K``): train-head trains on every
view of its training images and validates on the clean views of the others, probe folds by image
and reports the accuracy with and without the views in training, predict and evaluate average
over the views with --tta; plain files behave exactly as before."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from featx.config import HeadConfig
from featx.heads.model import load_head
from featx.heads.rows import SCALE_FLOOR, stratified_split
from featx.heads.train import head_split, train_head
from featx.heads.views import ImageViews, image_of, rows_of
from featx.store.reader import FeatureFile
from tests.augmented import augmented_copy
from tests.conftest import save

DIGITS = 120
K = 2
EXTRACT = ["--model", "resnet18", "--image-size", "32", "--workers", "0", "-q", "--weights", "none"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from sklearn.datasets import load_digits

    data = load_digits()
    root = tmp_path_factory.mktemp("digits")
    for i in range(DIGITS):
        pixels = (data.images[i] * (255 / 16)).astype(np.uint8)
        save(pixels, root / str(data.target[i]) / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def plain(digits, tmp_path_factory) -> Path:
    from typer.testing import CliRunner

    from featx.cli import app

    out = tmp_path_factory.mktemp("plain") / "digits.h5"
    args = ["extract", str(digits), "-o", str(out), *EXTRACT, "--layer", "layer3", "--layer"]
    result = CliRunner().invoke(app, [*args, "flatten"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def augmented(plain, tmp_path_factory) -> Path:
    return augmented_copy(plain, tmp_path_factory.mktemp("aug") / "digits-aug.h5", views=K)


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
        HeadConfig(layer="flatten", weight_decay=decay, patience=1000),
    )
    clean, views, y = _all(augmented)
    train, val = stratified_split(y, 0.2, seed=0)
    x_train = np.concatenate([clean[train], views[train].reshape(-1, clean.shape[1])])
    y_train = np.concatenate([y[train], np.repeat(y[train], K)])
    theirs = _reference_probabilities(x_train, y_train, clean[val], c=1 / (decay * len(x_train)))
    ours = load_head(tmp_path / "aug.head").probabilities(clean[val])
    assert np.abs(ours - theirs).max() < 5e-3
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
