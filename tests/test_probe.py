"""featx probe: which layer of which backbone, by a linear probe and a kNN probe as good as
scikit-learn's, on features featx extracted from real images (scikit-learn's handwritten
digits); ties with the best, C at the grid's edge, and the learning curve."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from featx.config import ProbeConfig
from featx.heads.learning_curve import per_class_draw
from featx.heads.probe import probe, stratified_folds, tied
from featx.heads.probe_png import error_bars
from featx.store.reader import FeatureFile
from tests.conftest import save
from tests.test_head import write_features

DIGITS = 200
EXTRACT = ["--model", "resnet18", "--image-size", "32", "--workers", "0", "-q"]
LAYERS = ["--layer", "layer2", "--layer", "flatten"]
QUICK = ["--folds", "3", "--c-grid", "0.1"]  # one C: the parity test covers choosing it


@pytest.fixture(autouse=True)
def _one_thread():
    """The fits are tiny: on a shared 2-core machine intra-op threads only wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """The first 200 of scikit-learn's 8x8 handwritten digits as PNGs in class folders 0-9."""
    from sklearn.datasets import load_digits

    data = load_digits()
    root = tmp_path_factory.mktemp("digits")
    for i in range(DIGITS):
        save(
            (data.images[i] * (255 / 16)).astype(np.uint8), root / str(data.target[i]) / f"{i}.png"
        )
    return root


def _extract(folder: Path, out: Path, *weights: str) -> Path:
    from typer.testing import CliRunner

    from featx.cli import app

    args = ["extract", str(folder), "-o", str(out), *weights, *EXTRACT, *LAYERS]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def random_init(digits, tmp_path_factory) -> Path:
    return _extract(digits, tmp_path_factory.mktemp("f") / "random.h5", "--weights", "none")


@pytest.fixture(scope="module")
def other_weights(digits, tmp_path_factory) -> Path:
    """The same images through resnet18 with other (seeded, saved) weights: a second file."""
    import torchvision

    folder = tmp_path_factory.mktemp("w")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        torch.save(torchvision.models.resnet18().state_dict(), folder / "seed7.pth")
    return _extract(digits, folder / "seed7.h5", "--weights", str(folder / "seed7.pth"))


def _sklearn_fold_accuracy(x, y, train, test, c) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x[train])
    model = LogisticRegression(C=c, max_iter=10000, tol=1e-8)
    model.fit(scaler.transform(x[train]), y[train])
    return float(model.score(scaler.transform(x[test]), y[test]))


def test_fold_accuracies_and_chosen_c_match_sklearn_on_the_same_folds(random_init):
    """Outer folds: accuracy within 1 point of LogisticRegression at the same C, standardised on
    the training fold only. Inner folds: the same C as GridSearchCV picks on those folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    config = ProbeConfig(folds=4, inner_folds=2, c_grid=(0.01, 1.0), layers=("layer2",))
    (result,) = probe([random_init], config).probes
    with FeatureFile(random_init) as f:
        x, y = f.features("layer2")[:], f.labels
    folds = stratified_folds(y, 4, seed=0)
    assert len(result.fold_accuracy) == 4 and result.rows == len(y) == DIGITS
    for test, accuracy, c in zip(folds, result.fold_accuracy, result.fold_c, strict=True):
        train = np.setdiff1d(np.arange(len(y)), test)
        reference = _sklearn_fold_accuracy(x, y, train, test, c)
        assert abs(accuracy - reference) <= 0.01, (accuracy, reference, c)
        inner = [
            (np.setdiff1d(np.arange(len(train)), held), held)
            for held in stratified_folds(y[train], 2, seed=0)
        ]
        pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=10000, tol=1e-8))
        search = GridSearchCV(pipeline, {"logisticregression__C": [0.01, 1.0]}, cv=inner)
        assert search.fit(x[train], y[train]).best_params_["logisticregression__C"] == c
    assert result.accuracy == pytest.approx(np.mean(result.fold_accuracy))
    assert result.accuracy > 0.8  # random-init resnet18 features of digits do separate


def test_cli_compares_files_table_json_picture_and_the_best_heads_command(
    random_init, other_weights, tmp_path, cli
):
    picture = tmp_path / "probe.png"
    result = cli("probe", random_init, other_weights, *QUICK, "-o", picture, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    probes = report["probes"]
    assert {(Path(p["file"]).name, p["layer"]) for p in probes} == {
        (name, layer) for name in ("random.h5", "seed7.h5") for layer in ("layer2", "flatten")
    }
    accuracies = [p["accuracy"] for p in probes]
    assert accuracies == sorted(accuracies, reverse=True)
    assert {p["weights"] for p in probes} == {"none", "seed7.pth"}
    assert {p["dim"] for p in probes if p["layer"] == "layer2"} == {128}
    assert all(p["file_reads"] == 1 for p in probes)  # one read of each layer serves every fit
    for p in probes:
        assert p["accuracy_std"] == pytest.approx(np.std(p["fold_accuracy"]))
        assert 0 < p["balanced_accuracy"] <= 1 and p["fit_seconds"] > 0
    depth = {p["layer"]: p["depth"] for p in probes}
    assert 0 < depth["layer2"] < depth["flatten"] <= 1
    assert report["best"] == {k: probes[0][k] for k in ("file", "layer", "c")}
    assert report["protocol"]["c_grid"] == [0.1] and report["protocol"]["folds"] == 3
    # stderr: the table, best first, and the head's command, which works as printed.
    table = result.stderr.splitlines()
    assert "accuracy (mean ± std)" in table[0] and probes[0]["layer"] in table[1]
    command = report["train_head_command"]
    assert command in result.stderr and f"--layer {probes[0]['layer']}" in command
    words = shlex.split(command)
    assert words[:2] == ["featx", "train-head"]
    words[words.index("-o") + 1] = str(tmp_path / "best.head")
    trained = cli(*words[1:], "--json")
    assert trained.exit_code == 0, trained.stderr
    assert json.loads(trained.stdout)["layer"] == probes[0]["layer"]
    with Image.open(picture) as image:
        assert image.format == "PNG" and image.size[0] > 300
    again = cli("probe", random_init, *QUICK, "-o", picture)
    assert again.exit_code == 2 and "exists" in again.stderr  # no silent overwrite


def test_a_tiny_memory_budget_streams_and_gets_the_same_numbers(random_init):
    config = ProbeConfig(folds=2, c_grid=(0.1,), layers=("layer2",))
    (whole,) = probe([random_init], config).probes
    # 200 rows of 128 floats are 100 KB: more than half of 128 KB, so every fit reads the file.
    (streamed,) = probe([random_init], config.replace(memory_budget="128KB")).probes
    assert whole.file_reads == 1 and streamed.file_reads > 3
    assert np.allclose(streamed.fold_accuracy, whole.fold_accuracy, atol=0.01)


def test_max_rows_probes_a_stratified_seeded_subsample(random_init):
    config = ProbeConfig(folds=3, c_grid=(0.1,), layers=("layer2",), max_rows=100)
    first, second = (probe([random_init], config).probes[0] for _ in range(2))
    assert abs(first.rows - 100) <= 10
    assert first.fold_accuracy == second.fold_accuracy


def test_a_file_without_labels_is_refused_like_train_head(digits, tmp_path, cli):
    flat = tmp_path / "flat"
    for path in sorted(digits.glob("*/*.png"))[:4]:
        save(np.asarray(Image.open(path)), flat / path.name)
    unlabelled = _extract(flat, tmp_path / "flat.h5", "--weights", "none")
    result = cli("probe", unlabelled)
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert "4 of 4 rows are unlabelled" in message and "probe needs every image" in message
    trained = cli("train-head", unlabelled, "--layer", "flatten", "-o", tmp_path / "h.head")
    assert trained.exit_code == 2 and "rows are unlabelled" in trained.stderr


def test_too_few_rows_per_class_for_the_folds_is_a_usage_error(random_init, cli):
    result = cli("probe", random_init, "--folds", "40")
    assert result.exit_code == 2 and "--folds 40" in result.stderr


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(0, 4), min_size=2, max_size=80),
    st.integers(2, 6),
    st.integers(0, 2**16),
)
def test_stratified_folds_partition_the_rows_and_share_every_class(labels, k, seed):
    y = np.asarray(labels)
    folds = stratified_folds(y, k, seed)
    assert np.array_equal(np.sort(np.concatenate(folds)), np.arange(len(y)))
    for label in np.unique(y):
        counts = [int((y[fold] == label).sum()) for fold in folds]
        assert max(counts) - min(counts) <= 1
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    again = stratified_folds(y, k, seed)
    assert all(np.array_equal(a, b) for a, b in zip(folds, again, strict=True))


# --- the kNN protocol ---------------------------------------------------------------------------


@pytest.mark.parametrize("budget", ["2GB", "64KB"])  # in memory; streamed in blocks and chunks
def test_knn_fold_accuracies_match_sklearn_on_the_same_folds(random_init, budget):
    """DINO's kNN (L2-normalised, cosine, k nearest vote exp(sim / T)) against scikit-learn's
    KNeighborsClassifier with the cosine metric and the same weights, fold by fold."""
    from sklearn.neighbors import KNeighborsClassifier

    k, temperature = 20, 0.07
    config = ProbeConfig(
        folds=4, layers=("layer2",), protocol=("knn",), knn_k=k, knn_temperature=temperature
    )
    (result,) = probe([random_init], config.replace(memory_budget=budget)).probes
    assert result.accuracy is None and result.fold_accuracy == [] and result.c is None
    with FeatureFile(random_init) as f:
        x, y = f.features("layer2")[:].astype(np.float64), f.labels
    for test, accuracy in zip(
        stratified_folds(y, 4, seed=0), result.fold_knn_accuracy, strict=True
    ):
        train = np.setdiff1d(np.arange(len(y)), test)
        reference = KNeighborsClassifier(
            n_neighbors=k, metric="cosine", weights=lambda d: np.exp((1 - d) / temperature)
        )
        expected = reference.fit(x[train], y[train]).score(x[test], y[test])
        assert abs(accuracy - expected) <= 0.01, (accuracy, expected)
    assert result.knn_accuracy == pytest.approx(np.mean(result.fold_knn_accuracy))
    assert result.knn_accuracy_std == pytest.approx(np.std(result.fold_knn_accuracy))


# --- ties and the grid's edge ------------------------------------------------------------------


def test_identical_layers_are_tied_and_a_clearly_worse_one_is_not(random_init):
    config = ProbeConfig(folds=3, c_grid=(0.1,), layers=("layer2",), protocol=("linear",))
    first, second = probe([random_init, random_init], config).probes
    assert first.fold_accuracy == second.fold_accuracy
    assert first.tied_with_best and second.tied_with_best
    best = [0.90, 0.85, 0.92, 0.88, 0.90]
    assert tied(best, best)
    assert not tied([0.70, 0.66, 0.74, 0.69, 0.71], best)  # 19 points worse in every fold
    assert tied([0.91, 0.83, 0.92, 0.87, 0.91], best)  # 0.2 points apart, spread 1 point


def _imbalanced_blobs(path: Path) -> Path:
    """Two well-separated classes of 36 and 24 rows: a tiny C predicts the larger class alone."""
    rng = np.random.default_rng(0)
    y = np.array([0] * 36 + [1] * 24)
    x = rng.normal(size=(60, 4)) + 1.5 * np.where(y[:, None] == 1, 1, -1)
    return write_features(path, x.astype(np.float32), y, ["a", "b"])


def test_a_best_c_at_the_grids_edge_is_flagged_and_the_grid_widened(tmp_path):
    blobs = _imbalanced_blobs(tmp_path / "blobs.h5")
    config = ProbeConfig(folds=3, inner_folds=3, protocol=("linear",))
    (edge,) = probe([blobs], config.replace(c_grid=(1e-3, 1e-2))).probes
    assert edge.c_at_grid_edge
    assert all(c > 1e-2 for c in edge.fold_c)  # widened by a decade or more past 0.01
    assert min(edge.fold_accuracy) >= 0.9  # where the too-narrow grid alone gets 0.6
    (inside,) = probe([blobs], config.replace(c_grid=(1e-4, 1.0, 100.0))).probes
    assert not inside.c_at_grid_edge and inside.fold_c == [1.0, 1.0, 1.0]


# --- several files, the learning curve, the picture ---------------------------------------------


def test_files_of_different_image_sets_are_refused_in_one_line(random_init, digits, tmp_path, cli):
    fewer = tmp_path / "fewer"
    for path in sorted(digits.glob("*/*.png"))[::2]:
        save(np.asarray(Image.open(path)), fewer / path.parent.name / path.name)
    other = _extract(fewer, tmp_path / "fewer.h5", "--weights", "none")
    result = cli("probe", random_init, other, *QUICK)
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "different image sets" in message


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=8, max_size=60), st.integers(1, 3), st.integers(0, 99))
def test_per_class_draws_are_seeded_stratified_and_kept_out_of_the_scored_rest(labels, n, seed):
    y = np.asarray(labels)
    drawn, rest = per_class_draw(y, n, seed)
    for label in np.unique(y):
        assert (y[drawn] == label).sum() == min(n, (y == label).sum())
    assert not np.intersect1d(drawn, rest).size
    assert np.array_equal(np.sort(np.concatenate([drawn, rest])), np.arange(len(y)))
    again, _ = per_class_draw(y, n, seed)
    assert np.array_equal(drawn, again)


def test_cli_learning_curve_and_knn_in_table_json_and_picture(random_init, tmp_path, cli):
    picture = tmp_path / "curve.png"
    args = ["probe", random_init, *QUICK, "--layer", "layer2", "--per-class", "1,5", "--json"]
    result = cli(*args, "--knn-k", "5", "-o", picture)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    (row,) = report["probes"]
    assert report["protocol"]["per_class"] == [1, 5] and report["protocol"]["knn_k"] == 5
    assert len(row["fold_knn_accuracy"]) == 3 and 0 < row["knn_accuracy"] <= 1
    assert row["tied_with_best"] and row["c_at_grid_edge"] is False
    curve = {(p["protocol"], p["per_class"]): p for p in row["learning_curve"]}
    assert set(curve) == {(p, n) for p in ("linear", "knn") for n in (1, 5)}
    for point in curve.values():
        assert len(point["draw_accuracy"]) == 5
        assert point["accuracy"] == pytest.approx(np.mean(point["draw_accuracy"]))
    assert "knn (mean ± std)" in result.stderr and "5 per class" in result.stderr
    with Image.open(picture) as image:
        assert image.size[0] > image.size[1]  # two panels side by side
    too_many = cli("probe", random_init, *QUICK, "--per-class", "20")
    assert too_many.exit_code == 2 and "--per-class 20" in too_many.stderr


def test_error_bars_stay_inside_zero_and_one():
    below, above = error_bars([0.98, 0.03, 0.5], [0.05, 0.05, 0.05])
    assert np.allclose(below, [0.05, 0.03, 0.05]) and np.allclose(above, [0.02, 0.05, 0.05])


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_plot_method_draws_the_scatter(random_init, tmp_path, cli, method):
    out = tmp_path / f"{method}.png"
    result = cli("plot", random_init, "-o", out, "--layer", "layer2", "--method", method)
    assert result.exit_code == 0, result.stderr
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (800, 600)
    bad = cli("plot", random_init, "-o", out, "--method", "umap")
    assert bad.exit_code == 2 and "--method 'umap'" in bad.stderr
