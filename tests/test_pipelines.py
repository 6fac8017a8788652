"""Shell pipelines and CI: file lists on stdin, JSON on stdout, exit codes, configs, plots.

Real bash pipelines where the pipe, the stream or the exit status is the point; the CLI
in-process (``cli``) where only what a command does is.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from featx import FeatureFile
from tests.conftest import pause_at

ROOT = Path(__file__).resolve().parents[1]
FEATX = f"{shlex.quote(sys.executable)} -m featx"
SMALL = "--model resnet18 --weights none --image-size 64 --workers 0"


def shell(
    script: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run a real bash pipeline, with pipefail so every stage's failure shows."""
    return subprocess.run(
        ["bash", "-c", f"set -o pipefail\n{script}"],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.slow
def test_paths_on_stdin_and_json_summary_through_a_pipe(photos, tmp_path):
    result = shell(
        f"find {photos} -name '*.jpg' | {FEATX} extract - -o {tmp_path}/new.h5 "
        f"{SMALL} --json | {shlex.quote(sys.executable)} -c "
        '\'import json,sys; d=json.load(sys.stdin); print(d["images_per_second"] > 0,'
        ' d["images"], d["failed"], d["output"])\''
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "3", "0", f"{tmp_path}/new.h5"]
    with FeatureFile(tmp_path / "new.h5") as f:
        assert sorted(Path(p).name for p in f.paths) == ["chelsea.jpg", "coffee.jpg", "rocket.jpg"]
        assert f.labels.tolist() == [-1, -1, -1]


@pytest.mark.slow
def test_nul_separated_paths_from_find_print0(photos, tmp_path):
    odd = tmp_path / "odd names"
    odd.mkdir()
    for path in photos.rglob("*.png"):
        (odd / f"with space\nand newline {path.name}").write_bytes(path.read_bytes())
    result = shell(
        f"find {shlex.quote(str(odd))} -type f -print0 | {FEATX} extract - -0 "
        f"-o {tmp_path}/f.h5 {SMALL} -q --root {shlex.quote(str(odd))}"
    )
    assert result.returncode == 0, result.stderr
    with FeatureFile(tmp_path / "f.h5") as f:
        assert sorted(f.paths) == [
            "with space\nand newline astronaut.png",
            "with space\nand newline camera.png",
        ]


def test_files_from_with_labels_csv_and_relative_root(photos, tmp_path, cli, monkeypatch):
    listing = tmp_path / "list.txt"
    listing.write_text("animal/chelsea.jpg\nthing/coffee.jpg\nthing/rocket.jpg\n")
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\nanimal/chelsea.jpg,cat\nthing/coffee.jpg,drink\n")
    monkeypatch.chdir(photos)
    result = cli(
        "extract",
        "--files-from",
        listing,
        "--labels",
        labels,
        "-o",
        tmp_path / "f.h5",
        *SMALL.split(),
        "-q",
    )
    assert result.exit_code == 0, result.output
    with FeatureFile(tmp_path / "f.h5") as f:
        assert f.paths == ["animal/chelsea.jpg", "thing/coffee.jpg", "thing/rocket.jpg"]
        assert f.class_names == ["cat", "drink"]
        assert f.labels.tolist() == [0, 1, -1]  # not in the CSV: unlabelled


def test_stdout_carries_only_machine_output(photos, tmp_path, cli, monkeypatch):
    result = shell(f"{FEATX} extract {photos} -o {tmp_path}/f.h5 {SMALL}")
    assert result.returncode == 0
    assert result.stdout == ""  # the human summary went to stderr
    assert "wrote" in result.stderr
    assert "\r" not in result.stderr  # stderr is not a terminal: no progress bar
    monkeypatch.setenv("NO_COLOR", "1")
    forced = cli("extract", photos, "-o", tmp_path / "g.h5", *SMALL.split(), "--progress")
    assert forced.exit_code == 0
    assert "img/s" in forced.stderr and "\x1b[" not in forced.stderr


@pytest.mark.slow
def test_broken_pipe_is_quiet_and_the_output_intact(photos, tmp_path):
    result = shell(
        f"{FEATX} extract {photos} -o {tmp_path}/f.h5 {SMALL} --json | head -1; "
        f"{FEATX} models --timm | head -1"
    )
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr
    with FeatureFile(tmp_path / "f.h5") as f:
        assert len(f) == 5 and f.attrs["complete"]


@pytest.mark.parametrize(
    ("script", "code"),
    [
        pytest.param(  # a whole run in a subprocess; the fast lane has others
            "{featx} extract {photos} -o {tmp}/ok.h5 {small} -q", 0, marks=pytest.mark.slow
        ),
        ("{featx} extract {photos} -o {tmp}/x.h5 {small} --pool mean", 2),
        ("{featx} extract {photos} -o {tmp}/x.h5 {small} --no-such-flag", 2),
        ("{featx} extract {tmp}/missing -o {tmp}/x.h5 {small}", 2),
        ("{featx} info {tmp}/missing.h5", 2),
        pytest.param(  # exit 3 in the fast lane: test_faults.py's test_max_failures_exits_3...
            "{featx} extract {dirty} -o {tmp}/x.h5 {small} --max-failures 1",
            3,
            marks=pytest.mark.slow,
        ),
    ],
)
def test_documented_exit_codes(photos, tmp_path, script, code):
    dirty = tmp_path / "dirty"
    dirty.mkdir()
    for path in sorted(photos.rglob("*.jpg")):
        (dirty / path.name).write_bytes(path.read_bytes())
    (dirty / "broken1.jpg").write_bytes(b"not a jpeg")
    (dirty / "broken2.png").write_bytes(b"")
    result = shell(
        script.format(featx=FEATX, photos=photos, tmp=tmp_path, small=SMALL, dirty=dirty)
    )
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    if code == 3:
        assert "--max-failures" in result.stderr
        assert (tmp_path / "x.h5").exists()


def extract_configs() -> list[Path]:
    """configs/*.toml with an [extract] table ([train-head] ones run in test_head.py)."""
    import tomllib

    return [
        p
        for p in sorted((ROOT / "configs").glob("*.toml"))
        if "extract" in tomllib.loads(p.read_text())
    ]


def test_configs_folder_holds_the_promised_examples():
    names = {p.stem for p in extract_configs()}
    assert {
        "vgg16-block5",
        "resnet50-penultimate",
        "resnet50-texture",
        "efficientnet-lite0-offline",
    } <= names


@pytest.mark.parametrize("config", extract_configs(), ids=lambda p: p.stem)
def test_every_config_in_configs_runs(config, photos, tmp_path, cli):
    """Each example config runs as written; flags override it (random weights: no download)."""
    import tomllib

    section = tomllib.loads(config.read_text())
    out = tmp_path / "f.h5"
    flags = ["--weights", "none", "--image-size", "64", "--workers", "0", "-q"]
    result = cli("extract", "--config", config, photos, "-o", out, *flags)
    assert result.exit_code == 0, result.output
    with FeatureFile(out) as f:
        assert f.attrs["model"] == section["extract"]["model"]
        assert f.layers == section["extract"]["layers"]
        assert f.attrs["pool"] == section["extract"]["pool"]
        assert f.attrs["weights"]["weights"] == "none"  # the flag won over the config


def test_plot_writes_a_png_of_the_requested_size(photos, tmp_path, cli):
    feats = tmp_path / "f.h5"
    assert cli("extract", photos, "-o", feats, *SMALL.split(), "-q").exit_code == 0
    result = cli(
        "plot", feats, "-o", tmp_path / "features.png", "--width", "640", "--height", "480"
    )
    assert result.exit_code == 0, result.output
    png = tmp_path / "features.png"
    assert png.stat().st_size > 5000
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (640, 480)


def test_shell_completion_script(cli, monkeypatch):
    # Typer's --show-completion is a plain flag that detects the shell from the parent
    # processes and ignores the word after it: under `sh -c` it answers "Shell sh not
    # supported", and in a pytest whose launching shell has exited (a long session, reparented
    # to init) "Shell  not supported", exit 1. With detection off it takes the shell's name.
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    result = cli("--show-completion", "bash")
    assert result.exit_code == 0, (result.stdout, result.stderr, repr(result.exception))
    assert "_FEATX_COMPLETE" in result.stdout


def test_every_help_has_an_example(cli):
    import typer.main

    from featx.cli import app

    group = typer.main.get_command(app)
    paths = [[name] for name in group.commands]
    paths += [["weights", name] for name in group.commands["weights"].commands]
    for path in paths:
        result = cli(*path, "--help")
        assert result.exit_code == 0, path
        assert "Example: featx" in result.stdout, path


def test_sigterm_during_start_up_exits_143_with_one_line(photos, tmp_path):
    """SLURM may send TERM before the first batch: still 143, one line, no traceback."""
    pause = pause_at(tmp_path, "featx.pipeline.make_plan")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "featx",
            "extract",
            str(photos),
            "-o",
            str(tmp_path / "f.h5"),
            *SMALL.split(),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=pause.env,
    )
    try:
        pause.wait(process)  # featx has started: its handler is set, no image is read yet
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        pause.release()
    assert process.returncode == 143
    assert "Traceback" not in stderr
    assert "run the same command again to resume" in stderr


def test_labels_csv_from_excel_with_bom_and_rows_for_other_files(
    photos, tmp_path, cli, monkeypatch
):
    listing = tmp_path / "list.txt"
    listing.write_text("animal/chelsea.jpg\nthing/coffee.jpg\n")
    labels = tmp_path / "labels.csv"
    labels.write_bytes(
        "\ufeffPath,Label\nanimal/chelsea.jpg,cat\nthing/coffee.jpg,drink\n"
        "elsewhere/x.jpg,horse\n".encode()
    )
    monkeypatch.chdir(photos)
    options = ["--files-from", listing, *SMALL.split(), "-q"]
    result = cli("extract", *options, "--labels", labels, "-o", tmp_path / "f.h5")
    assert result.exit_code == 0, result.output
    with FeatureFile(tmp_path / "f.h5") as f:
        assert f.class_names == ["cat", "drink"]  # no class without a listed file
        assert f.labels.tolist() == [0, 1]
    nothing = tmp_path / "none.csv"
    nothing.write_text("a.jpg,x\n")
    refused = cli("extract", *options, "--labels", nothing, "-o", tmp_path / "g.h5")
    assert refused.exit_code == 2 and "no row names a listed file" in refused.stderr


def test_json_summary_is_printed_even_when_too_many_images_failed(tmp_path, cli):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"not a jpeg")
    (folder / "b.png").write_bytes(b"")
    result = cli("extract", folder, "-o", tmp_path / "f.h5", *SMALL.split(), "--json")
    assert result.exit_code == 3
    summary = json.loads(result.stdout)
    assert summary["images"] == 0 and summary["failed"] == 2
    with FeatureFile(tmp_path / "f.h5") as f:
        assert len(f.failed) == 2 and f.features().shape == (0, 512)
