"""The fault matrix of the [faults] issue: every good image extracted, every bad one explained in
``failed/``, nothing lost to a kill, a full disk or a second run.

Input rows place every bad file among good photos in one folder, extracted once, and check two
things: the good photos come out bit for bit as in a clean run (one image per batch, so
neighbours cannot change a row), and each bad file is listed in ``failed/`` with its exception
class and message. Pixel-level checks of the same rows are in tests/test_decode.py.

Real processes only where the process is the point: kills and signals, a decoder that kills its
worker, shell limits, file permissions as an ordinary user, a second process on one output, a
closed pipe. Resuming after them runs in-process.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from featx import ExtractConfig, FeatureFile, extract
from featx.config import too_many_failures
from featx.data.worklist import scan_folder
from tests.conftest import (
    SETTINGS,
    SETTINGS_CONFIG,
    assert_same_file,
    featx_process,
    pause_at,
    shim_env,
    wait_for_shards,
)

# rows with many bad files; --max-failures has its own test
CONFIG = SETTINGS_CONFIG.replace(batch_size=1, max_failures="none")
# The same settings on the command line.
ARGS = ["--model", "resnet18", "--weights", "none", "--image-size", "64", "--workers", "0"]
ARGS += ["--batch-size", "1", "--shard-size", "4", "-q"]


@dataclass
class Rows:
    """A features file, read into dicts keyed by stored path."""

    features: dict[str, np.ndarray]
    labels: dict[str, int]
    failed: dict[str, str]
    attrs: dict

    @classmethod
    def read(cls, path: Path) -> Rows:
        with FeatureFile(path) as f:
            vectors = f.features()[:]
            return cls(
                dict(zip(f.paths, vectors, strict=True)),
                dict(zip(f.paths, f.labels.tolist(), strict=True)),
                dict(f.failed),
                f.attrs,
            )


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def good(tmp_path_factory, photo_arrays) -> Path:
    """Three small photos, each as a JPEG and a PNG, in two class folders."""
    root = tmp_path_factory.mktemp("good")
    for folder, name in [("animal", "chelsea"), ("animal", "astronaut"), ("thing", "coffee")]:
        (root / folder).mkdir(exist_ok=True)
        small = Image.fromarray(photo_arrays[name]).reduce(4)
        small.save(root / folder / f"{name}.jpg", quality=90)
        small.save(root / folder / f"{name}-copy.png")
    return root


def opened(path: Path) -> Image.Image:
    """The decoded image, with its file closed (filterwarnings=error catches leaks)."""
    with Image.open(path) as image:
        return image.convert("RGB")


@pytest.fixture(scope="module")
def clean(good, tmp_path_factory) -> Rows:
    out = tmp_path_factory.mktemp("clean") / "clean.h5"
    extract(good, out, CONFIG)
    rows = Rows.read(out)
    assert len(rows.features) == 6 and not rows.failed
    return rows


def among_good(good: Path, tmp_path: Path) -> Path:
    """A copy of the good photos to add bad files to (inside the class folders)."""
    folder = tmp_path / "photos"
    shutil.copytree(good, folder)
    return folder


def extract_rows(source, tmp_path: Path, config: ExtractConfig = CONFIG) -> Rows:
    tmp_path.mkdir(exist_ok=True)
    out = tmp_path / "feats.h5"
    extract(source, out, config)
    return Rows.read(out)


def assert_good_unchanged(rows: Rows, clean: Rows) -> None:
    for path, vector in clean.features.items():
        np.testing.assert_array_equal(rows.features[path], vector, err_msg=path)
        assert rows.labels[path] == clean.labels[path]


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# --- inputs: one folder of bad files among the good photos, extracted once -----------------------
#
# Each `@bad_files` function adds its files to the shared folder and names the rows it expects
# to be extracted and to fail; the test below it checks what its files must give. One
# extraction serves them all (one image per batch: no file can change another's row), and
# `test_every_file_is_accounted_for_and_good_photos_are_unchanged` checks that nothing else
# was extracted or failed.


@dataclass
class Expected:
    extracted: set[str]
    failed: set[str]


BAD_FILES: list[Callable[[Path, Path], Expected]] = []


def bad_files(make: Callable[[Path, Path], Expected]) -> Callable[[Path, Path], Expected]:
    """Register ``make(folder, good)``: add files to ``folder``, return the rows they give."""
    BAD_FILES.append(make)
    return make


def swept_folder(good: Path, folder: Path) -> Expected:
    """The good photos and every registered bad file; what should come out of it."""
    shutil.copytree(good, folder)
    expected = Expected(set(), set())
    for make in BAD_FILES:
        rows = make(folder, good)
        expected.extracted |= rows.extracted
        expected.failed |= rows.failed
    return expected


@pytest.fixture(scope="module")
def swept(good, tmp_path_factory) -> tuple[Rows, Expected]:
    """The rows of one run over the folder of every bad file.

    The work list is scanned before the run so that a file can vanish between scan and read,
    and a directory named like an image can be listed as a file: both as in a real run.
    """
    tmp_path = tmp_path_factory.mktemp("swept")
    folder = tmp_path / "photos"
    expected = swept_folder(good, folder)
    work_list = scan_folder(folder)
    (folder / "thing" / "fleeting.jpg").unlink()
    work_list.paths.append("thing/listed-dir.jpg")  # a path list names a directory as a file
    work_list.labels.append(1)
    return extract_rows(work_list, tmp_path), expected


@pytest.fixture(scope="module")
def rows(swept) -> Rows:
    return swept[0]


def test_every_file_is_accounted_for_and_good_photos_are_unchanged(swept, clean):
    rows, expected = swept
    assert_good_unchanged(rows, clean)
    assert set(rows.features) == set(clean.features) | expected.extracted
    assert set(rows.failed) == expected.failed


@bad_files
def zero_byte_file(folder: Path, good: Path) -> Expected:
    (folder / "animal" / "empty.jpg").write_bytes(b"")
    return Expected(set(), {"animal/empty.jpg"})


def test_zero_byte_file_is_recorded(rows):
    assert rows.failed["animal/empty.jpg"] == "ValueError: empty file (0 bytes)"


@bad_files
def text_named_jpg(folder: Path, good: Path) -> Expected:
    (folder / "animal" / "page.jpg").write_text("<!doctype html><html><body>404</body></html>")
    (folder / "thing" / "notes.jpg").write_text("just some text\n" * 20)
    return Expected(set(), {"animal/page.jpg", "thing/notes.jpg"})


def test_text_and_html_named_jpg_are_recorded(rows):
    for path in ("animal/page.jpg", "thing/notes.jpg"):
        assert rows.failed[path].startswith(
            "UnidentifiedImageError: cannot identify image file: not JPEG"
        )


@bad_files
def truncated_jpegs(folder: Path, good: Path) -> Expected:
    names = set()
    for progressive in (False, True):
        data = encode(opened(good / "thing" / "coffee.jpg"), "JPEG", progressive=progressive)
        for keep in (0.01, 0.3, 0.6, 0.9):
            names.add(f"thing/cut-{progressive:d}-{keep}.jpg")
            (folder / "thing" / f"cut-{progressive:d}-{keep}.jpg").write_bytes(
                data[: int(len(data) * keep)]
            )
        names.add(f"thing/cut-{progressive:d}-no-eoi.jpg")
        (folder / "thing" / f"cut-{progressive:d}-no-eoi.jpg").write_bytes(data[:-2])
    return Expected(set(), names)


def test_jpeg_truncated_at_several_points_is_recorded(rows):
    truncated = {path: error for path, error in rows.failed.items() if "/cut-" in path}
    assert len(truncated) == 10, "no truncated JPEG passes as an image"
    for error in truncated.values():
        assert error in (
            "OSError: Truncated File Read",  # inside the header
            "RuntimeError: decode_jpeg, Image is incomplete or truncated",  # inside the scans
        ), error


@bad_files
def png_with_broken_crc(folder: Path, good: Path) -> Expected:
    data = bytearray((good / "animal" / "chelsea-copy.png").read_bytes())
    data[-20] ^= 0x01  # a bit in the last IDAT chunk: Pillow alone would not notice
    (folder / "animal" / "flipped.png").write_bytes(bytes(data))
    return Expected(set(), {"animal/flipped.png"})


def test_png_with_a_broken_crc_is_recorded(rows):
    assert rows.failed["animal/flipped.png"].startswith(
        "OSError: broken PNG file: bad CRC in the 'IDAT' chunk"
    )


def png_claiming_size(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def big_png(folder: Path) -> None:
    Image.new("RGB", (300, 300), (9, 9, 9)).save(folder / "thing" / "big.png")  # 90,000 pixels


@bad_files
def decompression_bombs(folder: Path, good: Path) -> Expected:
    (folder / "animal" / "bomb.png").write_bytes(png_claiming_size(30000, 30000))
    (folder / "animal" / "near-bomb.png").write_bytes(png_claiming_size(9500, 9500))
    big_png(folder)
    return Expected({"thing/big.png"}, {"animal/bomb.png", "animal/near-bomb.png"})


def test_decompression_bomb_is_recorded_and_the_limit_is_settable(good, clean, rows, tmp_path, cli):
    assert rows.failed["animal/bomb.png"].startswith("DecompressionBombError: Image size")
    assert rows.failed["animal/near-bomb.png"].startswith(
        "DecompressionBombWarning: Image size (90250000 pixels) exceeds limit of 89478485"
    )
    assert "thing/big.png" in rows.features

    folder = among_good(good, tmp_path)
    big_png(folder)
    limited = tmp_path / "limited.h5"
    result = cli("extract", folder, "-o", limited, *ARGS, "--max-image-pixels", "80000")
    assert result.exit_code == 0, result.output
    rows = Rows.read(limited)
    assert_good_unchanged(rows, clean)
    assert rows.failed["thing/big.png"].startswith(
        "DecompressionBombWarning: Image size (90000 pixels) exceeds limit of 80000 pixels"
    )
    assert rows.attrs["decode"]["max_image_pixels"] == 80000


def peak_memory_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_huge_but_legal_images_are_extracted_in_bounded_memory(good, clean, tmp_path):
    folder = among_good(good, tmp_path)
    huge = Image.linear_gradient("L").resize((9000, 8000))  # 72 MP: under the 89 MP limit
    huge.save(folder / "thing" / "huge.jpg", quality=80)
    huge.save(folder / "thing" / "huge.png", compress_level=1)
    del huge
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # restart the peak (VmHWM) from the memory in use now
    before = peak_memory_mb()
    rows = extract_rows(folder, tmp_path)
    # A full-size decode and float resize of 72 MP takes over 1 GB (measured: 1.04 GB).
    assert peak_memory_mb() - before < 450
    assert_good_unchanged(rows, clean)
    assert not rows.failed and {"thing/huge.jpg", "thing/huge.png"} <= set(rows.features)
    assert relative_error(rows.features["thing/huge.jpg"], rows.features["thing/huge.png"]) < 0.05


@bad_files
def cmyk_jpeg(folder: Path, good: Path) -> Expected:
    photo = opened(good / "animal" / "chelsea-copy.png")
    photo.convert("CMYK").save(folder / "animal" / "cmyk.jpg", quality=95)
    photo.save(folder / "animal" / "rgb.jpg", quality=95)
    return Expected({"animal/cmyk.jpg", "animal/rgb.jpg"}, set())


def test_cmyk_jpeg_is_extracted_as_its_rgb_colours(rows):
    assert relative_error(rows.features["animal/cmyk.jpg"], rows.features["animal/rgb.jpg"]) < 0.05


@bad_files
def sixteen_bit_png(folder: Path, good: Path) -> Expected:
    ramp = (np.arange(64 * 96, dtype=np.uint32).reshape(64, 96) * 10).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "thing" / "ramp16.png")  # mode I;16, up to 61,430
    eight_bit = ((ramp.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    Image.fromarray(eight_bit).save(folder / "thing" / "ramp8.png")
    return Expected({"thing/ramp16.png", "thing/ramp8.png"}, set())


def test_16_bit_png_is_scaled_to_8_bits_not_saturated(rows):
    np.testing.assert_array_equal(
        rows.features["thing/ramp16.png"], rows.features["thing/ramp8.png"]
    )


TRANSPARENT = ("rgba", "la", "palette")


@bad_files
def transparent_pngs(folder: Path, good: Path) -> Expected:
    """A photo under alpha=0 in three modes, and plain white and black images beside them."""
    photo = np.asarray(opened(good / "animal" / "chelsea-copy.png"))
    hidden = np.dstack([photo, np.zeros(photo.shape[:2], np.uint8)])
    Image.fromarray(hidden, "RGBA").save(folder / "animal" / "rgba.png")
    Image.fromarray(hidden, "RGBA").convert("LA").save(folder / "animal" / "la.png")
    palette = Image.fromarray(photo).quantize(16)
    palette.save(folder / "animal" / "palette.png", transparency=bytes(16))  # all 16 clear
    for background in [(255, 255, 255), (0, 0, 0)]:
        Image.new("RGB", photo.shape[1::-1], background).save(
            folder / "thing" / f"{background[0]}.png"
        )
    extracted = {f"animal/{name}.png" for name in TRANSPARENT} | {"thing/255.png", "thing/0.png"}
    return Expected(extracted, set())


def test_transparency_is_composited_onto_the_recorded_background(good, rows, tmp_path):
    folder = tmp_path / "transparent"
    for name in ("animal", "thing"):
        (folder / name).mkdir(parents=True)
    transparent_pngs(folder, good)
    black = extract_rows(folder, tmp_path, CONFIG.replace(background=(0, 0, 0)))
    for name in TRANSPARENT:  # the photo underneath never shows
        vector = rows.features[f"animal/{name}.png"]
        np.testing.assert_array_equal(vector, rows.features["thing/255.png"], err_msg=name)
        vector = black.features[f"animal/{name}.png"]
        np.testing.assert_array_equal(vector, black.features["thing/0.png"], err_msg=name)
    assert not black.failed
    assert "[255, 255, 255]" in rows.attrs["decode"]["alpha"]
    assert "[0, 0, 0]" in black.attrs["decode"]["alpha"]


@bad_files
def grayscale(folder: Path, good: Path) -> Expected:
    gray = opened(good / "thing" / "coffee.jpg").convert("L")
    gray.save(folder / "thing" / "gray.png")
    gray.convert("RGB").save(folder / "thing" / "gray-as-rgb.png")
    gray.save(folder / "thing" / "gray.jpg", quality=95)
    return Expected({"thing/gray.png", "thing/gray-as-rgb.png", "thing/gray.jpg"}, set())


def test_grayscale_is_extracted_as_three_equal_channels(rows):
    np.testing.assert_array_equal(
        rows.features["thing/gray.png"], rows.features["thing/gray-as-rgb.png"]
    )
    assert relative_error(rows.features["thing/gray.jpg"], rows.features["thing/gray.png"]) < 0.05


@bad_files
def exif_rotated(folder: Path, good: Path) -> Expected:
    upright = opened(good / "animal" / "chelsea-copy.png")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # a camera held sideways ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... says "rotate 90 degrees clockwise to view"
    stored.save(folder / "animal" / "exif.png", exif=exif.tobytes())
    stored.save(folder / "animal" / "exif.jpg", exif=exif.tobytes(), quality=95)
    stored.save(folder / "animal" / "sideways.jpg", quality=95)  # the same pixels, no EXIF
    upright.save(folder / "animal" / "upright.jpg", quality=95)
    names = ("exif.png", "exif.jpg", "sideways.jpg", "upright.jpg")
    return Expected({f"animal/{name}" for name in names}, set())


def test_exif_rotated_photo_is_described_upright(rows):
    np.testing.assert_array_equal(
        rows.features["animal/exif.png"], rows.features["animal/chelsea-copy.png"]
    )
    reference = rows.features["animal/upright.jpg"]
    turned = relative_error(rows.features["animal/exif.jpg"], reference)
    ignored = relative_error(rows.features["animal/sideways.jpg"], reference)
    assert turned < 0.05 and turned < ignored / 5, (turned, ignored)


@bad_files
def animated_gif(folder: Path, good: Path) -> Expected:
    first = opened(good / "thing" / "coffee.jpg")
    second = opened(good / "animal" / "chelsea.jpg").resize(first.size)
    first.save(folder / "thing" / "anim.gif", save_all=True, append_images=[second])
    opened(folder / "thing" / "anim.gif").save(folder / "thing" / "frame0.png")
    return Expected({"thing/anim.gif", "thing/frame0.png"}, set())


def test_animated_gif_is_extracted_from_its_first_frame(rows):
    np.testing.assert_array_equal(
        rows.features["thing/anim.gif"], rows.features["thing/frame0.png"]
    )


NOT_UTF8 = "animal/caf\\xe9-\\xff.jpg"  # as stored


@bad_files
def name_not_utf8(folder: Path, good: Path) -> Expected:
    name = os.path.join(os.fsencode(folder / "animal"), b"caf\xe9-\xff.jpg")
    with open(name, "wb") as handle:
        handle.write((good / "animal" / "chelsea.jpg").read_bytes())
    return Expected({NOT_UTF8}, set())


def test_file_name_that_is_not_utf8_is_stored_with_escapes(rows):
    np.testing.assert_array_equal(rows.features[NOT_UTF8], rows.features["animal/chelsea.jpg"])


@bad_files
def symlinks(folder: Path, good: Path) -> Expected:
    (folder / "animal" / "loop").symlink_to("..")  # the whole tree again, and again ...
    (folder / "thing" / "animals").symlink_to("../animal")  # a second way into a folder
    (folder / "thing" / "alias.jpg").symlink_to("coffee.jpg")  # a second name for a file
    (folder / "animal" / "dangling.jpg").symlink_to("moved-away.jpg")
    (folder / "thing" / "ouroboros.jpg").symlink_to("ouroboros.jpg")
    return Expected(set(), {"animal/dangling.jpg", "thing/ouroboros.jpg"})


def test_symlink_loops_are_entered_once_and_broken_links_are_recorded(rows):
    """Each real file once, by its name (the sweep test checks that nothing else came out)."""
    assert not [path for path in rows.features if "loop/" in path or "animals/" in path]
    assert "thing/alias.jpg" not in rows.features and "thing/coffee.jpg" in rows.features
    assert rows.failed["animal/dangling.jpg"] == "FileNotFoundError: No such file or directory"
    assert rows.failed["thing/ouroboros.jpg"] == "OSError: Too many levels of symbolic links"


@bad_files
def directories_named_like_images(folder: Path, good: Path) -> Expected:
    (folder / "animal" / "album.jpg").mkdir()  # found by the scan only
    (folder / "thing" / "listed-dir.jpg").mkdir()  # `swept` adds it to the work list
    return Expected(set(), {"thing/listed-dir.jpg"})


def test_directory_named_like_an_image_is_not_an_image(rows):
    assert "animal/album.jpg" not in rows.failed, "a folder scan walks into it, and finds nothing"
    assert rows.failed["thing/listed-dir.jpg"] == (
        "IsADirectoryError: a directory, not an image file"
    )


@bad_files
def fifo(folder: Path, good: Path) -> Expected:
    os.mkfifo(folder / "thing" / "pipe.jpg")
    return Expected(set(), {"thing/pipe.jpg"})


def test_fifo_named_like_an_image_is_recorded_not_waited_on(rows):
    assert rows.failed["thing/pipe.jpg"].startswith("OSError: not a regular file (a pipe")


@bad_files
def fleeting_file(folder: Path, good: Path) -> Expected:
    shutil.copy(good / "thing" / "coffee.jpg", folder / "thing" / "fleeting.jpg")
    return Expected(set(), {"thing/fleeting.jpg"})  # `swept` deletes it after the scan


def test_file_deleted_between_scan_and_read_is_recorded(rows):
    assert rows.failed["thing/fleeting.jpg"] == "FileNotFoundError: No such file or directory"


REFUSED_FORMATS = ("PCX", "PPM", "ICO", "TGA", "SGI")


@bad_files
def formats_not_claimed(folder: Path, good: Path) -> Expected:
    photo = opened(good / "thing" / "coffee.jpg")
    for fmt in REFUSED_FORMATS:
        photo.save(folder / "thing" / f"{fmt.lower()}.jpg", fmt)  # valid files, wrong name
    (folder / "thing" / "eps.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n")
    photo.save(folder / "thing" / "png-inside.jpg", "PNG")  # a claimed format: fine
    refused = {f"thing/{fmt.lower()}.jpg" for fmt in (*REFUSED_FORMATS, "EPS")}
    return Expected({"thing/png-inside.jpg"}, refused)


def test_formats_featx_does_not_claim_are_refused_by_content(rows):
    for fmt in (*REFUSED_FORMATS, "EPS"):
        assert rows.failed[f"thing/{fmt.lower()}.jpg"].startswith(
            "UnidentifiedImageError: cannot identify image file: not JPEG"
        )
    assert "thing/png-inside.jpg" in rows.features


# --- decoders that misbehave, files the user cannot read: a real process ----------------------


def as_ordinary_user() -> list[str]:
    """A command prefix under which file permissions hold even for root.

    root reads a chmod 000 file anyway (CAP_DAC_OVERRIDE); setpriv drops that capability from
    the child, which is then refused like any user.
    """
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and setpriv is missing: permissions cannot be enforced")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def decoder_shim(tmp_path: Path, before_decoding: str) -> dict[str, str]:
    """An environment whose ``featx`` runs ``before_decoding`` (given ``data``, the file's bytes)
    before each decode: a sitecustomize on PYTHONPATH stands in for a misbehaving decoder."""
    body = "\n".join("    " + line for line in before_decoding.strip().splitlines())
    return shim_env(
        tmp_path,
        "import ctypes, os, signal, time\n"
        "import featx.data.decode\n"
        "_decode_bytes = featx.data.decode.decode_bytes\n"
        "def decode_bytes(data, policy):\n"
        f"{body}\n"
        "    return _decode_bytes(data, policy)\n"
        "featx.data.decode.decode_bytes = decode_bytes\n",
    )


# Decoding a file whose bytes carry a marker kills its own process, as a segfault in libjpeg or
# the OOM killer would.
CRASHING_DECODER = """
if b"featx-test:SIGKILL" in data:
    os.kill(os.getpid(), signal.SIGKILL)
if b"featx-test:SIGSEGV" in data:
    ctypes.string_at(0)  # a real segmentation fault
"""


@pytest.fixture(scope="module")
def crashed(good, tmp_path_factory) -> Rows:
    """A real run, as a user without root's override of file permissions, with two files that
    kill the worker decoding them and one file it may not read; decoding workers share batches
    of 3 with good photos."""
    tmp_path = tmp_path_factory.mktemp("crashed")
    folder = among_good(good, tmp_path)
    photo = opened(good / "animal" / "chelsea.jpg")
    photo.save(folder / "animal" / "killer.jpg", comment=b"featx-test:SIGKILL")
    photo.save(folder / "thing" / "segfault.jpg", comment=b"featx-test:SIGSEGV")
    secret = folder / "animal" / "secret.jpg"
    shutil.copy(good / "animal" / "chelsea.jpg", secret)
    secret.chmod(0)
    out = tmp_path / "feats.h5"
    command = [*as_ordinary_user(), sys.executable, "-m", "featx", "extract", str(folder)]
    command += ["-o", str(out), *ARGS, "--workers", "2", "--batch-size", "3"]
    started = time.monotonic()
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        env=decoder_shim(tmp_path, CRASHING_DECODER),
    )
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 240, "nothing hangs"
    return Rows.read(out)


@pytest.mark.slow
def test_decoder_that_kills_its_worker_is_recorded_and_the_run_goes_on(crashed, clean):
    crash = "DecoderCrashed: the process decoding this file was killed by"
    assert crashed.failed["animal/killer.jpg"] == f"{crash} SIGKILL"
    assert crashed.failed["thing/segfault.jpg"] == f"{crash} SIGSEGV"
    assert set(crashed.failed) == {"animal/killer.jpg", "animal/secret.jpg", "thing/segfault.jpg"}
    assert sorted(crashed.features) == sorted(clean.features)
    for path, vector in clean.features.items():  # batches of 3, not 1: float noise only
        np.testing.assert_allclose(crashed.features[path], vector, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_unreadable_file_is_recorded(crashed):
    assert crashed.failed["animal/secret.jpg"] == "PermissionError: Permission denied"


# --- faults ------------------------------------------------------------------------------------


def kill_at(moment: str, process: subprocess.Popen, out: Path, rng: random.Random) -> None:
    """Wait for ``moment`` in ``process``'s run into ``out``, then SIGKILL it.

    "start-up": at a random time in interpreter start, scan, model building or the first
    batches; "published": as soon as one more shard is published; "writing": a little later,
    somewhere in writing the next shard.
    """
    work = out.with_name(out.name + ".featx")
    done = len(list(work.glob("shard-*.h5")))
    if moment == "start-up":
        deadline = time.monotonic() + rng.uniform(0, 3)
        while time.monotonic() < deadline and len(list(work.glob("shard-*.h5"))) == done:
            time.sleep(0.005)
    else:
        wait_for_shards(out, done + 1, process)
        if moment == "writing":
            time.sleep(rng.uniform(0, 0.05))
    assert process.poll() is None, "the run finished before its kill"
    process.kill()
    process.communicate()


@pytest.mark.slow
def test_sigkill_at_chosen_and_random_moments_then_a_final_run_gives_the_same_file(
    many_photos, uninterrupted, tmp_path, cli
):
    out = tmp_path / "feats.h5"
    work = out.with_name(out.name + ".featx")
    shards = 24  # 48 photos, 2 a shard: 5 kills, each after at most 2 more shards, leave work
    moments = ["start-up", "published", "writing", "writing", "published"]
    rng = random.Random(20)
    for moment in moments:
        kill_at(moment, featx_process(many_photos, out, "--shard-size", "2"), out, rng)
        for shard in work.glob("shard-*.h5"):  # what is published is whole
            with h5py.File(shard, "r") as f:
                assert f["index"].shape[0] + f["failed/index"].shape[0] == 2
    assert not out.exists()
    in_the_loop = len(moments) - moments.count("start-up")  # each one published a shard first
    assert in_the_loop <= len(list(work.glob("shard-*.h5"))) < shards
    result = cli("extract", many_photos, "-o", out, *SETTINGS, "--shard-size", "2")
    assert result.exit_code == 0, result.output
    assert_same_file(out, uninterrupted)


@pytest.mark.slow
def test_sigint_keeps_finished_shards_and_exits_130(many_photos, uninterrupted, tmp_path, cli):
    out = tmp_path / "feats.h5"
    pause = pause_at(tmp_path, "featx.data.decode.decode_bytes", 5)  # the 2nd shard's 1st image
    process = featx_process(many_photos, out, env=pause.env)
    pause.wait(process)
    wait_for_shards(out, 1, process)
    process.send_signal(signal.SIGINT)
    pause.release()  # the batch in flight finishes, then the run stops
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "interrupted by SIGINT" in stderr and "run the same command again to resume" in stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    work = out.with_name(out.name + ".featx")
    assert list(work.glob("shard-*.h5")) and not list(work.glob(".*tmp*"))
    assert cli("extract", many_photos, "-o", out, *SETTINGS).exit_code == 0
    assert_same_file(out, uninterrupted)


def featx_limited(source: Path, out: Path, shell_prefix: str) -> subprocess.CompletedProcess:
    """``featx extract`` under a shell limit such as ``ulimit -f 30``."""
    command = " ".join([sys.executable, "-m", "featx", "extract", str(source), "-o", str(out)])
    command += " " + " ".join(SETTINGS)
    return subprocess.run(
        ["bash", "-c", f"{shell_prefix}; exec {command}"],
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_disk_full_error(done: subprocess.CompletedProcess, out: Path, strerror: str) -> None:
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(f"featx: error: cannot write {out}: {strerror}")
    assert "free some space and run the same command again to resume" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # no HDF5 trace, no crash


@pytest.mark.slow
def test_file_size_limit_is_a_clear_error_and_resume_completes(
    many_photos, uninterrupted, tmp_path, cli
):
    # A shard (4 rows) is ~16 KB and the whole file ~100 KB: under `ulimit -f 40` every shard
    # is written and the assembly fails, as on a disk that fills up at the very end.
    out = tmp_path / "feats.h5"
    done = featx_limited(many_photos, out, "ulimit -f 40")
    assert_disk_full_error(done, out, "File too large")
    work = out.with_name(out.name + ".featx")
    assert len(list(work.glob("shard-*.h5"))) == 12
    for shard in work.glob("shard-*.h5"):  # every finished shard is readable
        with h5py.File(shard, "r") as f:
            assert f["features/flatten"].shape == (4, 512)
    assert not out.exists() and not list(tmp_path.glob(".feats.h5.tmp*"))
    assert cli("extract", many_photos, "-o", out, *SETTINGS).exit_code == 0
    assert_same_file(out, uninterrupted)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KB tmpfs: room for two shards of the run below, then ENOSPC."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_disk_full_keeps_finished_shards_and_resume_after_freeing_space_completes(
    many_photos, uninterrupted, small_disk, cli
):
    out = small_disk / "feats.h5"
    done = featx_limited(many_photos, out, "true")
    assert_disk_full_error(done, out, "No space left on device")
    work = out.with_name(out.name + ".featx")
    finished = sorted(work.glob("shard-*.h5"))
    assert 1 <= len(finished) < 12
    for shard in finished:
        with h5py.File(shard, "r") as f:
            assert f["features/flatten"].shape == (4, 512)
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    resumed = cli("extract", many_photos, "-o", out, *SETTINGS, "--json")
    assert resumed.exit_code == 0, resumed.output
    assert f'"shards_done_before": {len(finished)}' in resumed.stdout
    assert_same_file(out, uninterrupted)


# Before any work: a featx process that may not import torch (no model, no image read).
NO_TORCH = """\
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ImportError("featx imported torch before refusing")
sys.meta_path.insert(0, _NoTorch())
"""


def test_unwritable_output_and_missing_source_fail_before_any_work(
    photos, tmp_path, tmp_path_factory, cli
):
    locked = tmp_path / "read-only"
    locked.mkdir()
    locked.chmod(0o555)
    out = locked / "feats.h5"
    command = [*as_ordinary_user(), sys.executable, "-m", "featx", "extract", str(photos)]
    no_torch = shim_env(tmp_path_factory.mktemp("no-torch"), NO_TORCH)
    done = subprocess.run(
        [*command, "-o", str(out), *ARGS], capture_output=True, text=True, timeout=300, env=no_torch
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"featx: error: output {out}: folder {locked} is not writable\n"
    assert not list(locked.iterdir())

    missing = cli("extract", tmp_path / "nowhere", "-o", tmp_path / "f.h5", *ARGS)
    assert missing.exit_code == 2
    nowhere = tmp_path / "nowhere"
    assert missing.stderr == f"featx: error: source {nowhere}: no such file or directory\n"
    assert list(tmp_path.iterdir()) == [locked]


@pytest.mark.slow
def test_second_run_on_the_same_output_is_refused_even_without_hdf5_locking(
    many_photos, uninterrupted, tmp_path
):
    out = tmp_path / "feats.h5"
    command = [sys.executable, "-m", "featx", "extract", str(many_photos), "-o", str(out)]
    command += SETTINGS
    # The first run stops before its 5th image (the first of its second shard) until the second
    # run has been refused: it has published a shard and holds the lock all along. HDF5's own
    # locking is off for both.
    unlocked = {"HDF5_USE_FILE_LOCKING": "FALSE"}
    pause = pause_at(tmp_path, "featx.data.decode.decode_bytes", 5, unlocked)
    first = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=pause.env
    )
    try:
        pause.wait(first)
        wait_for_shards(out, 1, first)
        second = subprocess.run(
            command, capture_output=True, text=True, timeout=300, env={**os.environ, **unlocked}
        )
        assert first.poll() is None, "the first run was still writing"
    finally:
        pause.release()
    assert second.returncode == 1
    assert second.stderr.startswith(f"featx: error: output {out} is being written by featx pid")
    assert len(second.stderr.strip().splitlines()) == 1
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert_same_file(out, uninterrupted)


@pytest.mark.slow
def test_stdout_closed_early_is_quiet_and_the_output_is_intact(
    many_photos, uninterrupted, tmp_path
):
    """`featx ... | head -1`, where head has already gone when featx prints."""
    out = tmp_path / "feats.h5"
    process = featx_process(many_photos, out, "--json")
    process.stdout.close()  # the reader is gone: the summary's write gets EPIPE
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 141
    assert stderr == ""
    assert_same_file(out, uninterrupted)

    piped = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {sys.executable} -m featx info --json {out} | head -1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert piped.stdout == "{\n" and piped.stderr == ""
    assert piped.returncode in (0, 141)


def test_max_failures_exits_3_when_exceeded(good, tmp_path, cli):
    folder = among_good(good, tmp_path)  # 6 good photos ...
    for name in ("a", "b", "c"):  # ... and 3 bad files: 33%
        (folder / "thing" / f"{name}.jpg").write_bytes(b"")
    # The limits on either side of 3 of 9; the CLI runs one of each kind, the rule all of them.
    cases = {"2": 3, "3": 0, "30%": 3, "34%": 0, "50%": 0}
    for limit, code in cases.items():
        assert too_many_failures(limit, 3, 9) == bool(code), limit
    for limit, code in {"2": 3, "34%": 0, None: 0}.items():
        out = tmp_path / f"{limit}.h5"
        flags = ["--max-failures", limit] if limit else []
        result = cli("extract", folder, "-o", out, *ARGS, *flags)
        assert result.exit_code == code, (limit, result.output)
        assert out.exists(), "the file is written either way"
        if code:
            assert f"3 of 9 images failed (more than --max-failures {limit})" in result.stderr
    everything_bad = tmp_path / "bad"
    (everything_bad / "x").mkdir(parents=True)
    for name in ("a", "b"):
        (everything_bad / "x" / f"{name}.jpg").write_bytes(b"")
    shutil.copy(good / "thing" / "coffee.jpg", everything_bad / "x")
    assert cli("extract", everything_bad, "-o", tmp_path / "bad.h5", *ARGS).exit_code == 3
    assert "[default: 50%]" in cli("extract", "--help").output


# --- security ----------------------------------------------------------------------------------


class WritesAMarker:
    """Unpickling this calls open(marker, "w"): what a malicious weight file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_weight_file_that_runs_code_is_refused_and_runs_nothing(photos, tmp_path, cli, how):
    import torch

    marker = tmp_path / "pwned"
    weights = tmp_path / "evil.pth"
    payload = {"conv1.weight": WritesAMarker(marker)}
    if how == "torch.save":
        torch.save(payload, weights)
    else:
        with open(weights, "wb") as handle:
            pickle.dump(payload, handle)
    assert not marker.exists()
    result = cli("extract", photos, "-o", tmp_path / "f.h5", *ARGS, "--weights", weights)
    assert result.exit_code == 2
    assert f"--weights {weights}: refused: not a plain state dict" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()
