"""Decode one image file robustly to an upright RGB uint8 tensor, or raise.

libjpeg-turbo (torchvision) decodes JPEGs, Pillow the other formats; alpha, EXIF orientation,
animation, high bit depths and huge images are handled by one recorded policy
(:class:`DecodePolicy`), so features can be reproduced. The loading stage (loader.py) turns every
exception raised here into a recorded failure.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from featx.data.reading import (
    DEFAULT_MAX_FILE_BYTES,
    PILLOW_FORMATS,
    PNG_SIGNATURE,
    UNIDENTIFIED,
    read_file,
)
from featx.data.resize import resize_to
from featx.data.views import ViewPolicy
from featx.safe_text import public_text

# Pillow may only use the decoders for the formats featx claims.
ALPHA_POLICY = "composite onto background {background}; hidden colours under alpha=0 are dropped"
# Above this many pixels an image is first shrunk by an integer factor (JPEG: DCT scaling while
# decoding, so the full-size image never exists; other formats: a box filter), which keeps a
# decode and its float resize within about 0.5 GB. Smaller images, every camera up to 32 MP,
# decode exactly as torchvision does, so their features match the weights' own transforms.
REDUCE_ABOVE_PIXELS = 1 << 25


# --- decoding -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodePolicy:
    """How pixels are made: recorded in the output file so features can be reproduced."""

    transform: dict[str, Any]
    background: tuple[int, int, int] = (255, 255, 255)
    max_image_pixels: int | None = None
    mode: str = "cpu"  # cpu: full decode; fast: JPEG DCT scaling when ≥2x; gpu: nvJPEG
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES  # larger files fail unread (--max-file-bytes)
    views: ViewPolicy | None = None  # --augment K: K augmented views of each image (views.py)

    def describe(self) -> dict[str, Any]:
        from PIL import Image

        return {
            "alpha": ALPHA_POLICY.format(background=list(self.background)),
            "exif_orientation": EXIF[self.mode == "gpu"],
            "animated": "first frame",
            "high_bit_depth": "scaled to 8 bits (65535 → 255)",
            "max_image_pixels": self.max_image_pixels or Image.MAX_IMAGE_PIXELS,
            "max_file_bytes": self.max_file_bytes,
            "identified_by": "the first bytes (signature); a file over 8 MiB before it is read "
            "whole",
            "jpeg": JPEG_DECODE[self.mode],
            "resize": RESIZE_ON_DEVICE if self.mode == "gpu" else RESIZE,
            "huge_images": f"above {REDUCE_ABOVE_PIXELS} pixels: first shrunk by an integer "
            "factor (JPEG DCT scaling, else a box filter) to bound memory",
        }


JPEG_DECODE = {
    "cpu": "full-size decode (libjpeg-turbo), then resize",
    "fast": "reduced-size DCT decode (Pillow draft) when at least 2x the resize, then resize",
    "gpu": "nvJPEG on the device, batched; on the CPU: progressive, CMYK, EXIF-oriented, "
    "huge and unterminated (possibly truncated) JPEGs, other formats, and a file nvJPEG "
    "refuses on its own; then resize",
}
EXIF = {
    False: "applied (features describe the upright image)",
    True: "applied (features describe the upright image): JPEGs with an EXIF orientation are "
    "decoded on the CPU, as nvJPEG on CUDA ignores it",
}


def load_image(path: str, policy: DecodePolicy) -> torch.Tensor:
    """Decode one file to an upright RGB uint8 tensor ``[3, crop, crop]``, or raise.

    Example: ``load_image("cat.jpg", DecodePolicy(transform)).shape == (3, 224, 224)``
    """
    image = decode_bytes(read_file(path, policy.max_file_bytes), policy)
    return resize_crop(image, policy.transform)


def decode_bytes(data: bytes | bytearray, policy: DecodePolicy) -> torch.Tensor:
    """Bytes → full-size RGB uint8 ``[3, H, W]``: libjpeg-turbo for JPEGs, Pillow for the rest."""
    size = jpeg_frame_size(data) if policy.mode != "fast" else None
    if size is not None and _shrink_factor(size, policy.transform) == 1:
        with _pixel_limit(policy) as Image:
            Image._decompression_bomb_check(size)  # Pillow's own check and messages
        return _decode_jpeg(data)
    header = open_checked(data, policy)  # lazy: reads the header, enforces the pixel limit
    if policy.mode == "fast" and header.format == "JPEG" and header.mode in ("RGB", "L"):
        # DCT scaling decodes 1/2, 1/4 or 1/8 of each side directly: 1.5-2.5x faster on big
        # photos. Pillow keeps the scaled size >= the request, so the resize still downsamples.
        scale = policy.transform["resize"] / min(header.size)
        if scale <= 0.5:
            header.draft(
                "RGB", (math.ceil(header.size[0] * scale), math.ceil(header.size[1] * scale))
            )
            return _pillow_rgb(header, policy)
    huge = _shrink_factor(header.size, policy.transform) > 1  # Pillow can decode those smaller
    if header.format == "JPEG" and header.mode in ("RGB", "L", "CMYK") and not huge:
        return _decode_jpeg(data)
    return _pillow_rgb(header, policy)


def _decode_jpeg(data: bytes | bytearray) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29's deprecation notice for io
        buffer = data if isinstance(data, bytearray) else bytearray(data)  # writable
        tensor = torch.frombuffer(buffer, dtype=torch.uint8)
        return decode_jpeg(tensor, mode=ImageReadMode.RGB, apply_exif_orientation=True)


_HUFFMAN_FRAMES = (0xC0, 0xC1, 0xC2)  # baseline, extended, progressive: what libjpeg decodes
_FRAMES = (*_HUFFMAN_FRAMES, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)


def jpeg_frame_size(data: bytes | bytearray) -> tuple[int, int] | None:
    """(width, height) of an 8-bit Huffman JPEG of 1, 3 or 4 components, from its markers up
    to the first scan, each segment's length checked against the data; None for anything
    else, which Pillow's header reader then sees as before. A photo's header in ~5 µs, where
    Pillow's lazy open takes ~45 µs, 3% of a worker's job (scripts/bench_datapath.py)."""
    if not data.startswith(b"\xff\xd8"):
        return None
    size, position, end = None, 2, len(data)
    while position + 4 <= end and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF:  # a fill byte
            position += 1
            continue
        length = (data[position + 2] << 8) | data[position + 3]
        if length < 2 or position + 2 + length > end:
            return None
        if marker == 0xDA:  # the first scan: the header is over
            return size
        if marker in _FRAMES:
            if size is not None:
                return None  # two frame headers
            size = _frame_size(data[position + 2 : position + 2 + length], marker)
            if size is None:
                return None
        position += 2 + length
    return None


def _frame_size(segment: bytes | bytearray, marker: int) -> tuple[int, int] | None:
    if marker not in _HUFFMAN_FRAMES or len(segment) < 8:
        return None
    precision, components = segment[2], segment[7]
    height, width = (segment[3] << 8) | segment[4], (segment[5] << 8) | segment[6]
    if precision != 8 or components not in (1, 3, 4) or not height or not width:
        return None
    return width, height


@contextlib.contextmanager
def _pixel_limit(policy: DecodePolicy) -> Iterator[Any]:
    """Pillow (the module) with the policy's decompression-bomb limit, and its warning above
    1x the limit raised: featx treats that as a failure too."""
    from PIL import Image

    limit_before = Image.MAX_IMAGE_PIXELS
    if policy.max_image_pixels is not None:
        Image.MAX_IMAGE_PIXELS = policy.max_image_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield Image
    finally:
        Image.MAX_IMAGE_PIXELS = limit_before


def open_checked(data: bytes | bytearray, policy: DecodePolicy) -> Any:
    """Pillow's lazy open (the header only), limited to the formats featx claims and to the
    decompression-bomb limit; a PNG's chunk checksums are verified first."""
    from PIL import UnidentifiedImageError

    if data.startswith(PNG_SIGNATURE):
        _check_png_crcs(data)
    with _pixel_limit(policy) as Image:
        try:
            return Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)
        except UnidentifiedImageError:
            raise UnidentifiedImageError(UNIDENTIFIED) from None


def _check_png_crcs(data: bytes | bytearray) -> None:
    """Pillow skips the checksums of image data chunks, so a flipped bit there could silently
    change pixels: check every chunk's CRC (fast next to inflating the data)."""
    view = memoryview(data)
    start = len(PNG_SIGNATURE)
    while start + 12 <= len(data):
        end = start + 12 + int.from_bytes(view[start : start + 4], "big")
        if end > len(data):
            return  # truncated: Pillow's own error says so
        kind = bytes(view[start + 4 : start + 8])
        if zlib.crc32(view[start + 4 : end - 4]) != int.from_bytes(view[end - 4 : end], "big"):
            name = kind.decode("latin-1")
            raise OSError(f"broken PNG file: bad CRC in the {name!r} chunk at byte {start}")
        if kind == b"IEND":
            return
        start = end


def _pillow_rgb(image: Any, policy: DecodePolicy) -> torch.Tensor:
    """Pillow's decode → RGB uint8 ``[3, H, W]``: first frame, upright, high bit depths scaled,
    alpha composited onto the background, huge images shrunk first (REDUCE_ABOVE_PIXELS)."""
    import numpy as np
    from PIL import Image, ImageOps

    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    factor = _shrink_factor(image.size, policy.transform)
    if factor > 1 and image.format == "JPEG":  # DCT scaling: the full-size image never exists
        image.draft(image.mode, (image.width // factor, image.height // factor))
    image.load()
    ImageOps.exif_transpose(image, in_place=True)
    if image.mode.startswith("I") or image.mode == "F":
        image = Image.fromarray(_eight_bit_gray(image), "L")
    image = _shrunk(image, _shrink_factor(image.size, policy.transform))
    if _has_alpha(image):
        backdrop = Image.new("RGBA", image.size, (*policy.background, 255))
        image = Image.alpha_composite(backdrop, image.convert("RGBA"))
    rgb = np.array(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def _eight_bit_gray(image: Any) -> Any:
    """16- and 32-bit gray scaled (not clipped) to 0..255, so 1000 and 65535 stay apart."""
    import numpy as np

    array = np.asarray(image)
    if image.mode == "F":
        return np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
    top = 65535 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255
    gray = np.empty(array.shape, np.uint8)
    for row in range(0, len(array), 1024):  # blocks of rows keep the int64 temporaries small
        block = array[row : row + 1024].astype(np.int64).clip(0, top)
        gray[row : row + 1024] = (block * 255 + top // 2) // top  # rounded, as np.rint
    return gray


def _has_alpha(image: Any) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info


def _shrink_factor(size: tuple[int, int], transform: dict[str, Any]) -> int:
    """1 up to REDUCE_ABOVE_PIXELS; above, the smallest integer factor that brings the image
    under it, but never below the resize (so the resize still only shrinks)."""
    width, height = size
    if width * height <= REDUCE_ABOVE_PIXELS:
        return 1
    needed = math.ceil(math.sqrt(width * height / REDUCE_ABOVE_PIXELS))
    return max(1, min(needed, min(width, height) // transform["resize"]))


def _shrunk(image: Any, factor: int) -> Any:
    """A 1/factor box-filtered copy. Alpha is averaged premultiplied, so a colour under alpha=0
    cannot bleed into its semi-transparent neighbours."""
    if factor == 1:
        return image
    if _has_alpha(image):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        return rgba.convert("RGBa").reduce(factor).convert("RGBA")
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    return image.reduce(factor)


# The resize, recorded in the decode policy (part of the fingerprint): a resume across a change
# of arithmetic is refused rather than mixed. uint8 in, uint8 out with fixed-point weights (the
# AVX2 kernel torchvision.transforms.v2 uses on uint8): ~2.5x faster than the float resize of
# transforms v1, and at most one grey level from it (its float result rounded).
RESIZE = "uint8 antialiased (torch interpolate on uint8, fixed-point weights), then centre crop"
RESIZE_ON_DEVICE = "float32 antialiased on the device, rounded to uint8, then centre crop"


def resize_crop(image: torch.Tensor, transform: dict[str, Any]) -> torch.Tensor:
    """Resize the shorter side, then centre-crop, uint8 ``[3, H, W]`` → ``[3, crop, crop]``; a
    batch ``[n, 3, H, W]`` of images of one size in one call, each image's pixels identical to
    its own call's.

    On the CPU the resize runs on uint8 (:data:`RESIZE`); elsewhere, and for interpolations
    without a uint8 kernel, it is torchvision v2's float resize rounded back to uint8.

    Example: ``resize_crop(image, {"resize": 256, "crop": 224, "interpolation": "bilinear"})``
    """
    from torchvision.transforms.v2 import functional as F

    height, width = image.shape[-2:]
    size = transform["resize"]
    # torchvision's rule for the long side: truncated, not rounded
    new = (
        (size, int(size * width / height))
        if height <= width
        else (int(size * height / width), size)
    )
    resized = image if (height, width) == new else resize_to(image, new, transform)
    crop = transform["crop"]
    height, width = resized.shape[-2:]
    if crop > min(height, width):
        return F.center_crop(resized, [crop])  # pads, as torchvision does
    top, left = int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))
    return resized[..., top : top + crop, left : left + crop]  # torchvision's centre, no copy


def describe_error(error: BaseException) -> str:
    """``ClassName: message`` on one line, for ``failed/errors``; the same on every run."""
    # An OSError's strerror leaves out the absolute path: the record already names the file.
    text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    message = " ".join(public_text(str(text)).split()) or "(no message)"
    message = _OBJECT_ADDRESS.sub("", message).strip()  # Pillow names a BytesIO at an address
    message = _SOURCE_LOCATION.sub("", message)  # torchvision names its C++ file and line
    return f"{type(error).__name__}: {message[:500]}"


_OBJECT_ADDRESS = re.compile(r"\s*<[^<>]* object at 0x[0-9a-fA-F]+>")
_SOURCE_LOCATION = re.compile(r"\S+\.(?:cpp|cc|c|h):\d+,?\s*")


class DecoderCrashed(Exception):
    """Decoding a file killed the process doing it: a crash in a C decoder, or the OOM killer.

    Recorded in ``failed/`` like any other decode error; the run goes on.
    """
