"""Decoding one file: every format featx claims gives the right pixels, every broken file raises.

The per-format rows of the [faults] issue, at the pixel level (tests/test_faults.py has the same
rows at the level of a whole extraction), and a property test that no input escapes the decode
step as anything but an image or a recorded failure.
"""

from __future__ import annotations

import io
import os
import signal
import struct
import tempfile
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from featx.data import decode as images
from featx.data.decode import DecodePolicy, decode_bytes, describe_error
from featx.data.loader import SampleDataset, file_items
from featx.data.worklist import ImageList

TRANSFORM = {"resize": 73, "crop": 64, "interpolation": "bilinear", "antialias": True}
POLICY = DecodePolicy(TRANSFORM)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def decoded(data: bytes, policy: DecodePolicy = POLICY) -> np.ndarray:
    """The full-size decode as ``H x W x 3`` uint8."""
    return decode_bytes(data, policy).permute(1, 2, 0).numpy()


def failure(data: bytes, policy: DecodePolicy = POLICY) -> str:
    """What ``failed/errors`` records for this file (the decode must raise)."""
    with pytest.raises(Exception) as caught:  # noqa: B017 - any class: the record names it
        decode_bytes(data, policy)
    return describe_error(caught.value)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_16_bit(array: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB): gray ``H x W`` or RGB."""
    height, width = array.shape[:2]
    color_type = 2 if array.ndim == 3 else 0
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in array)
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (
        images.PNG_SIGNATURE
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height``: how a decompression bomb starts."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.fixture(scope="module")
def photo(photo_arrays) -> np.ndarray:
    """A 48 x 64 crop of a real photo: small, but with real texture."""
    return np.ascontiguousarray(photo_arrays["chelsea"][100:148, 150:214])


# --- formats -----------------------------------------------------------------------------------


def test_cmyk_jpeg_decodes_to_its_rgb_colours_not_inverted(photo):
    cmyk = encode(Image.fromarray(photo).convert("CMYK"), "JPEG", quality=95)
    pixels = decoded(cmyk).astype(int)
    assert np.abs(pixels - photo).mean() < 4
    assert np.abs(pixels - (255 - photo)).mean() > 40


def test_16_bit_gray_png_is_scaled_not_saturated():
    data = png_16_bit(np.array([[1000, 65535], [0, 30000]], dtype=np.uint16))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    pixels = decoded(data)
    assert pixels[..., 0].tolist() == [[4, 255], [0, 117]]  # round(v * 255 / 65535)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_16_bit_rgb_png_is_scaled_not_saturated():
    data = png_16_bit(np.array([[[1000, 65535, 32768]]], dtype=np.uint16))
    red, green, blue = decoded(data)[0, 0].tolist()
    assert red <= 4 and green == 255 and 127 <= blue <= 128


HIDDEN = (255, 0, 0)  # the colour stored under alpha=0: it must never show


def transparent_files() -> dict[str, bytes]:
    """4 x 4 images whose left half is transparent (with a colour stored underneath) and whose
    right half is opaque gray 40, in every way a format can say "transparent"."""
    left = np.arange(4) < 2  # columns 0 and 1

    def columns(transparent, opaque) -> np.ndarray:
        """``transparent`` in the left half, ``opaque`` in the right (values or pixels)."""
        mask = np.broadcast_to(left, (4, 4))
        return np.where(mask[..., None] if np.ndim(opaque) else mask, transparent, opaque)

    rgba = columns((*HIDDEN, 0), (40, 40, 40, 255)).astype(np.uint8)
    la = np.stack([columns(200, 40), columns(0, 255)], axis=-1).astype(np.uint8)
    palette = Image.fromarray(columns(0, 1).astype(np.uint8), "P")
    palette.putpalette([*HIDDEN, 40, 40, 40])
    return {
        "RGBA PNG": encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "LA PNG": encode(Image.fromarray(la, "LA"), "PNG"),
        "palette PNG with tRNS": encode(palette, "PNG", transparency=0),
        "RGB PNG with a transparent colour": encode(
            Image.fromarray(columns(HIDDEN, (40, 40, 40)).astype(np.uint8)),
            "PNG",
            transparency=HIDDEN,
        ),
        "gray PNG with a transparent value": encode(
            Image.fromarray(columns(200, 40).astype(np.uint8)), "PNG", transparency=200
        ),
        "RGBA WebP": encode(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True),
        "GIF with transparency": encode(palette, "GIF", transparency=0),
    }


@pytest.mark.parametrize("kind", list(transparent_files()))
@pytest.mark.parametrize("background", [(255, 255, 255), (0, 128, 255)])
def test_transparency_is_composited_onto_the_background_and_hides_its_colour(kind, background):
    pixels = decoded(transparent_files()[kind], DecodePolicy(TRANSFORM, background=background))
    assert (pixels[:, :2] == background).all(), "transparent pixels show the background"
    assert (pixels[:, 2:] == 40).all(), "opaque pixels keep their colour"


def test_half_transparent_pixels_blend_with_the_background():
    rgba = np.full((2, 2, 4), (0, 0, 255, 128), np.uint8)
    pixels = decoded(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert pixels[0, 0].tolist() == [127, 127, 255]


def test_transparency_policy_is_described_for_the_file_attributes():
    described = DecodePolicy(TRANSFORM, background=(0, 0, 0)).describe()
    assert "[0, 0, 0]" in described["alpha"] and "hidden colours" in described["alpha"]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_grayscale_becomes_three_equal_channels(photo, fmt):
    gray = np.asarray(Image.fromarray(photo).convert("L"))
    pixels = decoded(
        encode(Image.fromarray(gray), fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    )
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    assert np.abs(pixels[..., 0].astype(int) - gray).mean() < (2 if fmt == "JPEG" else 1e-9)


# The transpose that stores an upright image so that EXIF orientation N shows it upright again.
STORED_AS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("orientation", sorted(STORED_AS))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_gives_the_upright_image(photo, orientation, fmt):
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = Image.fromarray(photo).transpose(STORED_AS[orientation])
    options = {"quality": 95} if fmt == "JPEG" else {}
    pixels = decoded(encode(stored, fmt, exif=exif.tobytes(), **options))
    assert pixels.shape == photo.shape  # 48 x 64: a missed rotation would give 64 x 48
    assert np.abs(pixels.astype(int) - photo).mean() < (6 if fmt == "JPEG" else 1e-9)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])  # PNG: APNG
def test_animated_image_gives_its_first_frame(fmt):
    frames = [Image.new("RGB", (8, 8), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    options = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **options)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert (decoded(data) == (255, 0, 0)).all()


# --- broken files ------------------------------------------------------------------------------


def test_pillow_is_not_told_to_load_truncated_images():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # a half file would become gray rows


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("keep", [0.002, 0.01, 0.25, 0.5, 0.75, 0.99, "all but EOI"])
def test_truncated_jpeg_raises(photo_arrays, progressive, keep):
    data = encode(Image.fromarray(photo_arrays["coffee"]), "JPEG", progressive=progressive)
    cut = len(data) - 2 if keep == "all but EOI" else max(2, int(len(data) * keep))
    record = failure(data[:cut])
    assert record.split(":")[0] in ("OSError", "RuntimeError", "UnidentifiedImageError")
    assert "\n" not in record and "0x" not in record and ".cpp" not in record


def test_truncated_png_raises(photo):
    data = encode(Image.fromarray(photo), "PNG")
    assert "truncated" in failure(data[: len(data) // 2])


@pytest.mark.parametrize("where", ["IHDR crc", "IDAT crc", "IDAT data"])
def test_png_with_a_broken_crc_raises(photo, where):
    data = bytearray(encode(Image.fromarray(photo), "PNG"))
    idat = data.index(b"IDAT") - 4
    length = int.from_bytes(data[idat : idat + 4], "big")
    position = {"IHDR crc": 29, "IDAT crc": idat + 8 + length, "IDAT data": idat + 8 + length // 2}
    data[position[where]] ^= 0x01
    kind = where.split()[0]
    assert failure(bytes(data)) == (
        f"OSError: broken PNG file: bad CRC in the '{kind}' chunk at byte "
        f"{8 if kind == 'IHDR' else idat}"
    )


def test_decompression_bomb_is_an_error_above_twice_the_limit():
    record = failure(png_claiming_size(20000, 20000))  # 400 MP claimed in 70 bytes
    assert record.startswith("DecompressionBombError: Image size (400000000 pixels) exceeds")


def test_decompression_bomb_warning_between_one_and_two_limits_is_an_error_too():
    assert failure(png_claiming_size(9500, 9500)).startswith("DecompressionBombWarning:")


def test_pixel_limit_is_settable():
    small = encode(Image.new("RGB", (70, 70)), "PNG")  # 4900 pixels
    assert failure(small, DecodePolicy(TRANSFORM, max_image_pixels=4000)).startswith(
        "DecompressionBombWarning: Image size (4900 pixels) exceeds limit of 4000 pixels"
    )
    assert decoded(small, DecodePolicy(TRANSFORM, max_image_pixels=5000)).shape == (70, 70, 3)
    assert DecodePolicy(TRANSFORM, max_image_pixels=4000).describe()["max_image_pixels"] == 4000


@pytest.mark.parametrize("fmt", ["PCX", "PPM", "ICO", "TGA", "SGI", "DDS", "QOI"])
def test_formats_featx_does_not_claim_are_refused(photo, fmt):
    data = encode(Image.fromarray(photo), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself would decode it
    assert failure(data).startswith("UnidentifiedImageError: cannot identify image file: not JPEG")


def test_postscript_is_never_handed_to_ghostscript():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto showpage\n"
    assert failure(eps).startswith("UnidentifiedImageError")


def test_a_claimed_format_under_another_extension_is_decoded(tmp_path, photo):
    path = tmp_path / "really-a.png.jpg"
    path.write_bytes(encode(Image.fromarray(photo), "PNG"))
    assert images.load_image(str(path), POLICY).shape == (3, 64, 64)


# --- huge images -------------------------------------------------------------------------------


@pytest.fixture
def small_reduce_limit(monkeypatch):
    """Make 'huge' mean above 64 x 64 pixels, so the shrink path runs on small images."""
    monkeypatch.setattr(images, "REDUCE_ABOVE_PIXELS", 64 * 64)


def test_huge_jpeg_is_decoded_at_a_reduced_dct_scale(small_reduce_limit, photo_arrays):
    data = encode(Image.fromarray(photo_arrays["coffee"]), "JPEG", quality=95)  # 600 x 400
    reference = Image.open(io.BytesIO(data))
    reference.draft("RGB", (150, 100))  # what libjpeg gives at 1/4 scale
    pixels = decoded(data)
    assert pixels.shape == (100, 150, 3)  # 1/4 brings 240,000 pixels under 64 x 64 x 4
    np.testing.assert_array_equal(pixels, np.asarray(reference.convert("RGB")))


def test_huge_image_never_shrinks_below_the_resize(small_reduce_limit):
    data = encode(Image.new("RGB", (4000, 80), (9, 9, 9)), "PNG")  # 73 is the resize
    assert decoded(data).shape == (80, 4000, 3)


def test_shrinking_a_huge_transparent_image_keeps_hidden_colours_hidden(small_reduce_limit):
    rgba = np.zeros((256, 256, 4), np.uint8)
    rgba[::2, ::2] = (0, 0, 255, 255)  # a fine grid of opaque blue on ...
    rgba[1::2] = (*HIDDEN, 0)  # ... hidden red rows
    pixels = decoded(encode(Image.fromarray(rgba, "RGBA"), "PNG")).astype(int)
    assert pixels.shape == (86, 86, 3)  # 1/3: 1/4 would go below the 73-pixel resize
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    assert (red == green).all(), "no red from under alpha=0 (white and blue only)"
    assert (blue == 255).all()


def test_huge_16_bit_image_keeps_its_range_when_shrunk(small_reduce_limit):
    data = png_16_bit(np.full((128, 256), 1000, np.uint16))
    assert (decoded(data) == 4).all()


# --- not image files ---------------------------------------------------------------------------


def test_a_fifo_named_like_an_image_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        images.read_file(str(fifo))  # a plain open() would block here forever


def test_a_directory_named_like_an_image_is_refused(tmp_path):
    (tmp_path / "album.jpg").mkdir()
    with pytest.raises(IsADirectoryError) as caught:
        images.read_file(str(tmp_path / "album.jpg"))
    assert describe_error(caught.value) == "IsADirectoryError: a directory, not an image file"


def test_a_file_is_read_in_one_read_call(tmp_path, photo, monkeypatch):
    import io as io_module

    from featx.data import reading

    calls: list[int] = []

    class Counting(io_module.FileIO):
        def readinto(self, buffer):
            calls.append(len(buffer))
            return super().readinto(buffer)

        def read(self, size=-1):
            calls.append(size)
            return super().read(size)

    def counting_open(fd, mode="rb", buffering=-1, closefd=True):
        return Counting(fd, mode.replace("b", ""), closefd=closefd)

    path = tmp_path / "photo.jpg"
    Image.fromarray(photo).save(path, quality=90)
    monkeypatch.setattr(reading, "open", counting_open, raising=False)
    assert images.read_file(str(path)) == path.read_bytes()
    assert calls == [path.stat().st_size]  # one call, asking for exactly the file


def test_os_errors_are_recorded_without_the_absolute_path(tmp_path):
    with pytest.raises(OSError) as caught:
        images.read_file(str(tmp_path / "gone.jpg"))
    assert describe_error(caught.value) == "FileNotFoundError: No such file or directory"


# --- property: nothing escapes the decode step -------------------------------------------------


class Hang(BaseException):
    """Not an Exception: the decode step's own handler must not swallow it."""


def valid_files() -> list[bytes]:
    rng = np.random.default_rng(0)
    pixels = (rng.random((24, 32, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    frames = [image, Image.fromarray(255 - pixels)]
    return [
        encode(image, "JPEG"),
        encode(image, "JPEG", progressive=True),
        encode(image.convert("CMYK"), "JPEG"),
        encode(image, "PNG"),
        encode(image.convert("RGBA"), "PNG"),
        png_16_bit(pixels[..., 0].astype(np.uint16) * 257),
        encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        encode(image, "WEBP"),
        encode(image, "BMP"),
        encode(image, "TIFF"),
    ]


VALID_FILES = valid_files()


def mangled(data: bytes, cut: int, flips: list[tuple[int, int]]) -> bytes:
    damaged = bytearray(data[: max(cut, 1)])
    for position, bit in flips:
        damaged[position % len(damaged)] ^= 1 << bit
    return bytes(damaged)


FILES = st.one_of(
    st.binary(max_size=2048),
    st.builds(
        mangled,
        st.sampled_from(VALID_FILES),
        st.integers(min_value=0, max_value=max(map(len, VALID_FILES))),
        st.just([]),
    ),
    st.builds(
        mangled,
        st.sampled_from(VALID_FILES),
        st.just(1 << 30),
        st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 7)), min_size=1, max_size=8),
    ),
)


@pytest.mark.slow
@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=FILES)
def test_decode_step_gives_an_image_or_a_one_line_failure_and_never_hangs(data):
    def hang(*_):
        raise Hang("the decode step took more than 20 s")

    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "file.jpg"), "wb") as handle:
            handle.write(data)
        (item,) = file_items(ImageList(folder, ["file.jpg"], [-1], []), [0])
        previous = signal.signal(signal.SIGALRM, hang)
        signal.alarm(20)
        try:
            index, image, error = SampleDataset(POLICY)[item]
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    assert index == 0
    if image is None:
        assert error and "\n" not in error and error.split(":")[0].isidentifier(), error
    else:
        assert error == "" and image.shape == (3, 64, 64) and image.dtype.is_floating_point is False


# --- a JPEG's frame header, read without Pillow -------------------------------------------------


def _sof_offset(data: bytes) -> int:
    """Where the frame header (SOF0/SOF2) marker sits, found by the format's own rule."""
    position = 2
    while data[position + 1] not in (0xC0, 0xC2):
        position += 2 + struct.unpack(">H", data[position + 2 : position + 4])[0]
    return position


JPEG_KINDS = {
    "baseline": ("RGB", {}),
    "progressive": ("RGB", {"progressive": True}),
    "gray": ("L", {}),
    "cmyk": ("CMYK", {}),
    "4:4:4 optimised": ("RGB", {"subsampling": 0, "optimize": True}),
    "restart markers": ("RGB", {"restart_marker_blocks": 1}),
}


@pytest.mark.parametrize("kind", JPEG_KINDS)
def test_a_jpeg_frame_size_is_the_one_pillow_reads_and_decodes_as_torchvision_does(photo, kind):
    from torchvision.io import ImageReadMode, decode_jpeg

    mode, options = JPEG_KINDS[kind]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the decode must apply it
    data = encode(Image.fromarray(photo).convert(mode), "JPEG", exif=exif.tobytes(), **options)
    assert images.jpeg_frame_size(data) == Image.open(io.BytesIO(data)).size == (64, 48)
    reference = decode_jpeg(
        torch.frombuffer(bytearray(data), dtype=torch.uint8),
        mode=ImageReadMode.RGB,
        apply_exif_orientation=True,
    )
    assert reference.shape == (3, 64, 48)
    assert np.array_equal(decoded(data), reference.permute(1, 2, 0).numpy())


def test_a_jpeg_header_the_fast_reader_does_not_take_goes_to_pillow_as_before(photo):
    data = encode(Image.fromarray(photo), "JPEG")
    sof = _sof_offset(data)
    twelve_bit = bytearray(data)
    twelve_bit[sof + 4] = 12
    arithmetic = bytearray(data)
    arithmetic[sof + 1] = 0xC9
    zero_height = bytearray(data)
    zero_height[sof + 5 : sof + 7] = b"\0\0"
    for other in (
        encode(Image.fromarray(photo), "PNG"),
        data[: sof + 6],  # cut inside the frame header
        bytes(twelve_bit),
        bytes(arithmetic),
        bytes(zero_height),
        data[: sof + 2] + b"\xff\xff" + data[sof + 4 :],  # a segment longer than the file
    ):
        assert images.jpeg_frame_size(other) is None
    assert failure(data[: sof + 6]).startswith(("OSError", "SyntaxError", "RuntimeError"))


def test_a_jpeg_over_the_pixel_limit_fails_with_pillows_own_words(photo):
    data = encode(Image.fromarray(photo), "JPEG")  # 64 x 48 = 3072 pixels
    assert images.jpeg_frame_size(data) is not None  # the fast header reader's case
    assert failure(data, DecodePolicy(TRANSFORM, max_image_pixels=2000)) == (
        "DecompressionBombWarning: Image size (3072 pixels) exceeds limit of 2000 pixels, "
        "could be decompression bomb DOS attack."
    )
    assert failure(data, DecodePolicy(TRANSFORM, max_image_pixels=1000)).startswith(
        "DecompressionBombError: Image size (3072 pixels) exceeds limit of 2000 pixels"
    )
    assert decoded(data, DecodePolicy(TRANSFORM, max_image_pixels=3072)).shape == (48, 64, 3)
