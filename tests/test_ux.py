"""A newcomer's first hour (issue 16): no silent traps, honest progress and resume messages,
usage errors before torch loads, messages that say what to do."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

import featx
import featx.pipeline
from featx import defaults
from featx.config import ExtractConfig
from featx.data.worklist import scan_folder
from featx.errors import Interrupted
from featx.heads import apply
from featx.models import offline_ready
from featx.pipeline import Timings, extract, make_plan
from featx.preflight import _may_have_cuda
from tests.conftest import pause_at, save, wait_for_shards

TINY = ["--model", "resnet18", "--weights", "none", "--image-size", "32", "--workers", "0"]
TINY_CONFIG = ExtractConfig(
    model="resnet18", weights="none", image_size=32, workers=0, progress=False
)


@pytest.fixture
def signal_after_first_batch(monkeypatch):
    """A real SIGINT delivered to this process while the first batch is computed, as a user's
    Ctrl-C arrives mid-batch."""
    real = featx.pipeline.compute
    calls = []

    def compute(*args, **kwargs):
        if not calls:
            signal.raise_signal(signal.SIGINT)
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(featx.pipeline, "compute", compute)
    return calls


# --- 1. the layout of a folder ---------------------------------------------------------------


def test_non_image_files_beside_class_folders_do_not_make_a_dataset_unlabelled(photos, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(photos, folder)
    (folder / "README.txt").write_text("my dataset")
    (folder / "labels.csv").write_text("path,label\n")
    images = scan_folder(folder)
    assert images.class_names == ["animal", "thing"]
    assert sorted(set(images.labels)) == [0, 1] and len(images) == 5
    assert images.describe() == "5 images in 2 classes (animal, thing)"


def test_a_stray_image_next_to_class_folders_is_a_warning_with_a_way_out(
    photos, photo_arrays, tmp_path, cli
):
    folder = tmp_path / "data"
    shutil.copytree(photos, folder)
    save(photo_arrays["coffee"][:64, :64], folder / "stray.jpg")
    result = cli("extract", folder, "-o", tmp_path / "f.h5", *TINY)
    assert result.exit_code == 0, result.stderr
    warning = next(line for line in result.stderr.splitlines() if "warning" in line)
    assert "stray.jpg" in warning and "unlabelled" in warning
    assert "move" in warning and "--labels" in warning  # the ways out
    assert "featx: 6 unlabelled images" in result.stderr


def test_every_extract_says_what_it_read_and_its_steady_speed_apart_from_start_up(
    photos, tmp_path, cli
):
    said = cli("extract", photos, "-o", tmp_path / "a.h5", *TINY, "--batch-size", "2", "--json")
    assert said.exit_code == 0, said.stderr
    assert "featx: 5 images in 2 classes (animal, thing)" in said.stderr
    summary = json.loads(said.stdout)
    for kept in ("images_per_second", "elapsed_s", "loop_s"):  # the old keys stay
        assert kept in summary
    assert 0 < summary["startup_s"] <= summary["elapsed_s"]
    assert summary["steady_images_per_second"] > 0
    assert "img/s after" in said.stderr and "s of start-up" in said.stderr
    quiet = cli("extract", photos, "-o", tmp_path / "b.h5", *TINY, "-q")
    assert quiet.exit_code == 0 and quiet.stderr == ""


# --- 2. Ctrl-C and resume ----------------------------------------------------------------------


def test_ctrl_c_says_stopping_at_once_then_how_many_images_are_kept(
    photos, tmp_path, capfd, signal_after_first_batch
):
    out = tmp_path / "f.h5"
    config = TINY_CONFIG.replace(shard_size=2, batch_size=2)
    with pytest.raises(Interrupted) as interrupted:
        extract(photos, out, config)
    assert interrupted.value.exit_code == 130
    assert "stopping after this batch" in capfd.readouterr().err  # from the handler itself
    # The batch in flight completed shard 0: its 2 images are kept, and said so.
    assert "2 of 5 images are kept" in str(interrupted.value)
    assert "run the same command again to resume" in str(interrupted.value)
    result = extract(photos, out, config)
    assert "resuming: 2 of 5 images already done" in capfd.readouterr().err
    assert result.images == 5 and result.shards_done_before == 1


def test_ctrl_c_before_any_shard_finished_does_not_promise_a_resume(
    photos, tmp_path, signal_after_first_batch
):
    with pytest.raises(Interrupted) as interrupted:
        extract(photos, tmp_path / "f.h5", TINY_CONFIG.replace(batch_size=2))  # one 256 shard
    message = str(interrupted.value)
    assert "nothing is kept" in message and "again to resume" not in message


@pytest.mark.slow
def test_sigint_to_a_real_process_prints_stopping_then_the_images_kept(many_photos, tmp_path):
    out = tmp_path / "f.h5"
    command = [sys.executable, "-m", "featx", "extract", str(many_photos), "-o", str(out)]
    command += [*TINY, "--shard-size", "4", "--batch-size", "2"]
    pause = pause_at(tmp_path, "featx.data.decode.decode_bytes", 5)  # the 2nd shard's 1st image
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=pause.env)
    pause.wait(process)
    wait_for_shards(out, 1, process)
    process.send_signal(signal.SIGINT)
    pause.release()  # the batch in flight finishes, then the run stops
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert lines[0] == "featx: 48 images in 2 classes (a, b)"
    assert lines[1].startswith("featx: stopping after this batch")
    kept = 4 * len(list(out.with_name("f.h5.featx").glob("shard-*.h5")))
    assert lines[2].startswith(f"featx: error: interrupted by SIGINT: {kept} of 48 images are kept")
    assert "Traceback" not in stderr


def test_the_default_shard_is_about_a_minute_on_a_slow_cpu_and_a_second_or_more_on_a_gpu(
    photos, tmp_path
):
    slow_cpu_images_per_second = 4  # ResNet-50, 2 slow cores (the issue measured 4-9)
    assert defaults.shard_size_for("cpu") / slow_cpu_images_per_second <= 70
    h100_resnet50_fp16_images_per_second = 12_268  # the model's eager ceiling, measured
    assert defaults.shard_size_for("cuda") / h100_resnet50_fp16_images_per_second >= 1
    # unset, the rule for the run's device decides; given, the option does
    assert make_plan(photos, tmp_path / "a.h5", TINY_CONFIG).shard_size == 256
    assert make_plan(photos, tmp_path / "b.h5", TINY_CONFIG.replace(shard_size=3)).shard_size == 3


# --- 3. predict on images: a resume that is real ------------------------------------------------


@pytest.fixture(scope="module")
def features(photos, tmp_path_factory) -> Path:
    """One small features file with two layers, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("ux") / "f.h5"
    extract(photos, out, TINY_CONFIG.replace(layers=("layer1", "flatten"), quiet=True))
    return out


@pytest.fixture(scope="module")
def head_file(features) -> Path:
    from featx.config import HeadConfig
    from featx.heads.train import train_head

    train_head(features, features.with_name("p.head"), HeadConfig(layer="flatten"))
    return features.with_name("p.head")


def test_interrupted_predict_on_images_resumes_from_its_kept_shards(
    photos, head_file, tmp_path, monkeypatch, capsys, signal_after_first_batch, cli
):
    original = apply.extraction_config
    monkeypatch.setattr(
        apply, "extraction_config", lambda *a: original(*a).replace(shard_size=2, batch_size=2)
    )
    out = tmp_path / "p.csv"
    with pytest.raises(Interrupted) as interrupted:
        apply.predict(photos, head_file, out)
    message = str(interrupted.value)
    assert "2 of 5 images are kept" in message and "run the same command again" in message
    work = Path(str(apply.scratch_features(out)) + ".featx")
    assert len(list(work.glob("shard-*.h5"))) == 1  # kept where the same command looks again
    capsys.readouterr()
    again = cli("predict", photos, "--head", head_file, "-o", out)
    assert again.exit_code == 0, again.stderr
    assert "resuming: 2 of 5 images already done" in again.stderr
    assert not work.exists() and not apply.scratch_features(out).exists()
    assert len(out.read_text().splitlines()) == 6


def test_predict_progress_bar_is_labelled_by_the_images_not_a_temporary_file(
    photos, head_file, tmp_path, cli
):
    result = cli("predict", photos, "--head", head_file, "-o", tmp_path / "p.csv", "--progress")
    assert result.exit_code == 0, result.stderr
    assert f"features of {photos.name}" in result.stderr
    assert ".features.h5:" not in result.stderr and "featx-predict" not in result.stderr


# --- 4. usage errors before torch ----------------------------------------------------------------


def test_usage_errors_come_before_torch_is_imported(photos, tmp_path):
    (tmp_path / "exists.h5").write_bytes(b"")
    out = str(tmp_path / "o.h5")
    cases = {
        "batch_size": [str(photos), "-o", out, "--batch-size", "0"],
        "pool": [str(photos), "-o", out, "--pool", "bogus"],
        "mps": [str(photos), "-o", out, "--device", "mps"],
        "no_folder": [str(photos), "-o", str(tmp_path / "missing" / "dir" / "f.h5")],
        "exists": [str(photos), "-o", str(tmp_path / "exists.h5")],
        "no_source": [str(tmp_path / "no-such-folder"), "-o", out],
    }
    if not _may_have_cuda():  # on a machine with a GPU driver, torch has to decide
        cases["cuda"] = [str(photos), "-o", out, "--device", "cuda"]
    cases = {name: ["extract", *args] for name, args in cases.items()}
    (tmp_path / "h.head").write_bytes(b"")
    cases["predict_no_folder"] = ["predict", str(photos), "--head", str(tmp_path / "h.head"),
                                  "-o", str(tmp_path / "missing" / "p.csv")]  # fmt: skip
    cases["predict_no_head"] = ["predict", str(photos), "--head", str(tmp_path / "x.head"),
                                "-o", str(tmp_path / "p.csv")]  # fmt: skip
    cases["train_exists"] = ["train-head", str(tmp_path / "exists.h5"), "-o",
                             str(tmp_path / "exists.h5")]  # fmt: skip
    script = textwrap.dedent(
        """
        import json, sys
        from featx.cli import main
        codes = {}
        for name, args in json.loads(sys.argv[1]).items():
            sys.argv = ["featx", *args]
            try:
                main()
            except SystemExit as exit:
                codes[name] = exit.code
        print(json.dumps({"codes": codes, "torch": "torch" in sys.modules}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True
    )
    report = json.loads(done.stdout)
    assert report["codes"] == {name: 2 for name in cases}, done.stderr
    assert report["torch"] is False
    errors = done.stderr.splitlines()
    assert len(errors) == len(cases) and all(e.startswith("featx: error: ") for e in errors)
    assert any("mkdir -p" in e for e in errors)


# --- 5. messages ---------------------------------------------------------------------------------


def test_timm_offline_hint_points_at_the_hugging_face_cache(photos, tmp_path, monkeypatch, cli):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = cli("extract", photos, "-o", tmp_path / "f.h5", "--model", "timm:resnet18")
    assert result.exit_code == 1
    assert str(tmp_path / "hf" / "hub") in result.stderr and "torch/hub" not in result.stderr
    assert "featx weights fetch timm:resnet18 --weights DEFAULT" in result.stderr


def test_torchvision_offline_hint_names_the_model_and_weights(photos, tmp_path, monkeypatch, cli):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    result = cli("extract", photos, "-o", tmp_path / "f.h5", "--model", "resnet18")
    assert result.exit_code == 1
    assert "featx weights fetch resnet18 --weights IMAGENET1K_V1" in result.stderr


def test_unknown_weights_list_each_name_once(photos, tmp_path, cli):
    result = cli("extract", photos, "-o", tmp_path / "f.h5", "--model", "resnet18", "--weights",
                 "IMAGENET1K_V9")  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr.count("DEFAULT") == 1 and "IMAGENET1K_V1" in result.stderr


def test_a_resume_with_other_settings_names_only_what_changed(
    photos, tmp_path, cli, signal_after_first_batch
):
    out = tmp_path / "f.h5"
    with pytest.raises(Interrupted):
        extract(photos, out, TINY_CONFIG.replace(batch_size=2))
    other = cli("extract", photos, "-o", out, *TINY[:-4], "--image-size", "48", "--workers", "0")
    assert other.exit_code == 2
    message = other.stderr.strip()
    assert "transform.crop: 32 → 48" in message and "transform.resize:" in message
    assert "mean" not in message and "std" not in message  # unchanged keys are not shown
    assert message.endswith("or pass --overwrite to discard it")
    assert "…" not in message


def test_info_on_a_folder_is_one_clean_line(photos, cli):
    result = cli("info", photos)
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "is a folder" in result.stderr
    assert "errno" not in result.stderr and "unable to" not in result.stderr


def test_info_on_a_file_that_is_not_hdf5_is_one_clean_line(tmp_path, cli):
    (tmp_path / "notes.h5").write_text("not hdf5")
    result = cli("info", tmp_path / "notes.h5")
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "errno" not in result.stderr


def test_models_with_a_pattern_matching_nothing_is_an_error_naming_the_timm_option(cli):
    result = cli("models", "timm")
    assert result.exit_code == 2 and result.stdout == ""
    assert "featx models --timm" in result.stderr


def test_models_offline_names_the_models_that_need_no_network(cli):
    result = cli("models", "--offline")
    assert result.exit_code == 0
    assert result.stdout.split() == offline_ready() and "efficientnet_lite0" in result.stdout


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"featx {featx.__version__}"


# --- 6. honest numbers and files ------------------------------------------------------------------


def test_steady_rate_leaves_the_first_batch_out():
    # 2 files in the first 5 s (model warm-up, workers), then 40 files in 10 s.
    ran = Timings(0.0, first_batch_s=5.0, first_batch_files=2, computed=42, loop_s=15.0)
    assert ran.steady_rate() == pytest.approx(40 / 10)
    one_batch = Timings(0.0, first_batch_s=5.0, first_batch_files=2, computed=2, loop_s=5.0)
    assert one_batch.steady_rate() == pytest.approx(2 / 5)


def test_head_files_are_world_readable_like_every_other_output(head_file):
    umask = os.umask(0o022)
    os.umask(umask)
    assert head_file.stat().st_mode & 0o777 == 0o666 & ~umask


def test_evaluate_refuses_to_overwrite_its_metrics_unless_asked(features, head_file, tmp_path, cli):
    metrics = ["--head", head_file, "-o", tmp_path / "m.json", "-q"]
    first = cli("evaluate", features, *metrics)
    assert first.exit_code == 0, first.stderr
    written = (tmp_path / "m.json").read_text()
    second = cli("evaluate", features, *metrics)
    assert second.exit_code == 2 and "--overwrite" in second.stderr
    assert (tmp_path / "m.json").read_text() == written
    forced = cli("evaluate", features, *metrics, "--overwrite")
    assert forced.exit_code == 0, forced.stderr


# --- 8. export ---------------------------------------------------------------------------------


def reference(path: Path) -> dict:
    """The file as plain h5py reads it."""
    with h5py.File(path) as f:
        return {
            "paths": [p.decode() for p in f["paths"][:]],
            "labels": f["labels"][:],
            "class_names": json.loads(f.attrs["class_names"]),
            "layer1": f["features/layer1"][:],
            "flatten": f["features/flatten"][:],
        }


def test_export_npy_writes_features_paths_labels_and_class_names(features, cli):
    result = cli("export", features, "--format", "npy", "-q")
    assert result.exit_code == 0, result.stderr
    folder = features.with_name("f_npy")  # the default: beside the features file
    expected = reference(features)
    for name in ("layer1", "flatten", "labels"):
        np.testing.assert_array_equal(np.load(folder / f"{name}.npy"), expected[name])
    assert np.load(folder / "paths.npy").tolist() == expected["paths"]
    assert (
        np.load(folder / "class_names.npy").tolist()
        == expected["class_names"]
        == [
            "animal",
            "thing",
        ]
    )
    again = cli("export", features, "--format", "npy")
    assert again.exit_code == 2 and "--overwrite" in again.stderr


def test_export_parquet_has_one_row_per_image_with_its_class(features, tmp_path, cli):
    import pyarrow.parquet as pq

    out = tmp_path / "x.parquet"
    result = cli(
        "export", features, "--format", "parquet", "--layer", "flatten", "-o", out, "--json"
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["output"] == str(out)
    table = pq.read_table(out)
    expected = reference(features)
    assert table.column_names == ["path", "label", "class_name", "flatten"]
    assert table.column("path").to_pylist() == expected["paths"]
    np.testing.assert_array_equal(table.column("label").to_numpy(), expected["labels"])
    names = [expected["class_names"][i] for i in expected["labels"]]
    assert table.column("class_name").to_pylist() == names
    np.testing.assert_array_equal(
        np.stack(table.column("flatten").to_numpy(zero_copy_only=False)), expected["flatten"]
    )
    metadata = json.loads(table.schema.metadata[b"featx"])
    assert metadata["class_names"] == expected["class_names"] and metadata["model"] == "resnet18"


def test_export_refuses_an_unknown_format_in_one_line(features, cli):
    result = cli("export", features, "--format", "csv")
    assert result.exit_code == 2 and "expected one of npy, parquet" in result.stderr
