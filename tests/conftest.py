"""Shared fixtures: tiny real photo folders, seeded random weights, a CLI runner.

Nothing here touches the network: models get seeded random weights saved to a local file, and
the photos are scikit-image's bundled samples.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from featx import ExtractConfig
from featx.cli import app

os.environ.setdefault("FEATX_OFFLINE", "1")  # belt and braces: no test may download
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per test process (and the featx processes it starts): the xdist workers share
    # the cores, and two threads each would only contend for them.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
# featx resizes in uint8 with fixed-point weights (decode.RESIZE); torchvision's transforms()
# resizes in float and rounds. Pixels then differ by at most one grey level (1/255) on 7-18% of
# them, which moves a seeded random resnet18's features by at most 2.5e-3 of their largest
# magnitude (measured: crops 64 and 224, the five sample photos, layer1 to flatten). 5e-3 leaves
# twice that; an error in the preprocessing itself (a wrong size, crop or normalisation) is >1e-1.
RESIZE_TOLERANCE = 5e-3
SMALL = ["--model", "resnet18", "--image-size", "64", "--workers", "0", "-q"]


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None and not _has_cuda():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _rng_hygiene():
    """Each test starts from the same RNG state and leaves it as it found it."""
    state = torch.get_rng_state()
    np_state = np.random.get_state()
    torch.manual_seed(0)
    np.random.seed(0)
    yield
    torch.set_rng_state(state)
    np.random.set_state(np_state)


def sample_photos() -> dict[str, np.ndarray]:
    import skimage.data as data

    return {
        "chelsea": data.chelsea(),  # a cat
        "coffee": data.coffee(),
        "rocket": data.rocket(),
        "astronaut": data.astronaut(),
        "camera": data.camera(),  # grayscale
    }


@pytest.fixture(scope="session")
def photo_arrays() -> dict[str, np.ndarray]:
    return sample_photos()


def save(array: np.ndarray, path: Path, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **options)
    return path


@pytest.fixture(scope="session")
def photos(tmp_path_factory, photo_arrays) -> Path:
    """Two class folders of real photos, JPEG and PNG, one grayscale."""
    root = tmp_path_factory.mktemp("photos")
    save(photo_arrays["chelsea"], root / "animal" / "chelsea.jpg", quality=90)
    save(photo_arrays["astronaut"], root / "animal" / "astronaut.png")
    save(photo_arrays["coffee"], root / "thing" / "coffee.jpg", quality=90)
    save(photo_arrays["rocket"], root / "thing" / "rocket.jpg", quality=90)
    save(photo_arrays["camera"], root / "thing" / "sub" / "camera.png")
    return root


@pytest.fixture(scope="session")
def resnet18_file(tmp_path_factory) -> Path:
    """A seeded random-init resnet18 state dict, as a user's local weight file."""
    import torchvision

    torch.manual_seed(1234)
    model = torchvision.models.resnet18()
    path = tmp_path_factory.mktemp("weights") / "resnet18-seeded.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def cli():
    """Run the CLI in-process as a user types it; returns the click Result."""
    runner = CliRunner()

    def run(*args: object, input: str | None = None):
        return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)

    return run


def run_featx(*args: object, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m featx`` in a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "featx", *map(str, args)],
        capture_output=True,
        text=True,
        check=check,
        **kwargs,
    )


SETTINGS = [
    "--model",
    "resnet18",
    "--weights",
    "none",
    "--image-size",
    "64",
    "--workers",
    "0",
    "--shard-size",
    "4",
    "--batch-size",
    "2",
    "--device",  # also on a GPU machine: the CPU tests' files compare bit for bit, whatever
    "cpu",  # the number of processes (two torchrun ranks on one GPU are refused, as designed)
    "-q",
]
SETTINGS_CONFIG = ExtractConfig(  # SETTINGS, as a library call
    model="resnet18",
    weights="none",
    image_size=64,
    workers=0,
    shard_size=4,
    batch_size=2,
    device="cpu",
    progress=False,
)


def featx_process(
    source: Path, out: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "featx", "extract", str(source), "-o", str(out), *SETTINGS, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.fixture(scope="session")
def many_photos(tmp_path_factory, photo_arrays) -> Path:
    """48 small JPEGs in two classes, cut from the sample photos."""
    root = tmp_path_factory.mktemp("many")
    arrays = [photo_arrays[name] for name in ("chelsea", "coffee", "rocket", "astronaut")]
    for i in range(48):
        array = arrays[i % 4]
        top, left = (i * 7) % 60, (i * 13) % 80
        crop = array[top : top + 160, left : left + 200]
        save(crop, root / ("a" if i % 2 else "b") / f"img{i:03d}.jpg", quality=85)
    return root


@pytest.fixture(scope="session")
def uninterrupted(many_photos, tmp_path_factory, cli) -> Path:
    """The file one uninterrupted ``featx extract many_photos ... SETTINGS`` gives."""
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    result = cli("extract", many_photos, "-o", out, *SETTINGS)
    assert result.exit_code == 0, result.output
    return out


def assert_same_file(a: Path, b: Path) -> None:
    """Same datasets, same values bit for bit, same attributes (but the creation time)."""
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        names_a, names_b = [], []
        fa.visit(names_a.append)
        fb.visit(names_b.append)
        assert names_a == names_b
        for name in names_a:
            if isinstance(fa[name], h5py.Dataset):
                assert fa[name].dtype == fb[name].dtype, name
                np.testing.assert_array_equal(fa[name][()], fb[name][()], err_msg=name)
        assert sorted(fa.attrs) == sorted(fb.attrs)
        for key in fa.attrs:
            if key != "created":
                assert str(fa.attrs[key]) == str(fb.attrs[key]), key


def wait_until(
    condition: Callable[[], bool], process: subprocess.Popen, what: str, limit: float = 300
) -> None:
    """Return once ``condition()`` holds; fail at once if ``process`` ends first. ``limit`` only
    turns a hang into a failure: how fast the process gets there does not matter."""
    deadline = time.monotonic() + limit
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {process.communicate()[1]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {limit} s")
        time.sleep(0.005)


def wait_for_shards(out: Path, count: int, process: subprocess.Popen, limit: float = 300) -> None:
    """Return once ``process``'s run into ``out`` has published ``count`` shards."""
    work = out.with_name(out.name + ".featx")

    def published() -> bool:
        return len(list(work.glob("shard-*.h5"))) >= count

    wait_until(published, process, f"{count} published shards", limit)


def shim_env(folder: Path, code: str) -> dict[str, str]:
    """An environment whose Python processes run ``code`` first (a sitecustomize on PYTHONPATH):
    how a test puts a misbehaving decoder or a pause into a real ``featx`` process."""
    shim = folder / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(code)
    # The shim imports featx before `-m` puts the working folder on sys.path: keep PYTHONPATH,
    # or a checkout other than the installed one tests the installed featx.
    path = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


@dataclass
class Pause:
    """A point in a real ``featx`` process where it stops until the test lets it go on.

    Run the process with ``env``; ``wait(process)`` returns once it has stopped there (so what
    it did before is done, and it does nothing more until ``release()``).
    """

    env: dict[str, str]
    held: Path  # while this file exists, the process waits
    reached: Path  # the process creates this file when it stops

    def wait(self, process: subprocess.Popen) -> None:
        wait_until(self.reached.exists, process, "the pause")

    def release(self) -> None:
        self.held.unlink(missing_ok=True)


def pause_at(folder: Path, function: str, call: int = 1, env: dict | None = None) -> Pause:
    """Pause featx processes at the ``call``-th call of ``function`` ("module.name"), e.g.
    ``pause_at(tmp_path, "featx.data.decode.decode_bytes", 5)``: before the 5th image is decoded
    (with ``--workers 0`` the main process decodes, in order)."""
    module, name = function.rsplit(".", 1)
    held, reached = folder / "pause-held", folder / "pause-reached"
    held.touch()
    code = f"""\
import importlib, os, time
_module = importlib.import_module({module!r})
_original = getattr(_module, {name!r})
_calls = 0
def _paused(*args, **kwargs):
    global _calls
    _calls += 1
    if _calls == {call}:
        open({str(reached)!r}, "w").close()
        while os.path.exists({str(held)!r}):
            time.sleep(0.01)
    return _original(*args, **kwargs)
setattr(_module, {name!r}, _paused)
"""
    shimmed = shim_env(folder, code)
    return Pause({**shimmed, **(env or {})}, held, reached)
