"""``--decode gpu``: baseline JPEGs travel encoded to the device and nvJPEG decodes them there.

The orchestration is device-independent and runs in CPU tests with an injected batch decoder
(torchvision's CPU ``decode_jpeg(list)`` stands in for nvJPEG):

* a worker (:func:`prepare`) sends a file encoded only when nvJPEG gives the CPU path's pixels
  from it: a baseline RGB or gray JPEG, upright (no EXIF orientation: nvJPEG on CUDA ignores
  it), complete (ends with its EOI marker: whether nvJPEG accepts a truncated stream is
  unknown, the CPU path fails it) and not huge (the CPU path decodes those reduced). Every other
  file is decoded and cropped on the CPU right there (:func:`cpu_reason` says why);
* a batch's encoded files travel packed in one tensor (:class:`~featx.data.batch.Encoded`);
* the main process (:func:`decode_on_device`) decodes them in one batched call. When that call
  fails, the batch is split in halves and retried with the same decoder, so a bad file never
  changes how its neighbours are decoded (libjpeg and nvJPEG upsample chroma differently); only
  a file the decoder refuses on its own goes to the CPU decoder, and fails there like anywhere;
* device errors (out of memory, CUDA errors) are never an image's fault: they propagate.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from featx.data.batch import Batch, Encoded
from featx.data.decode import (
    REDUCE_ABOVE_PIXELS,
    DecodePolicy,
    decode_bytes,
    describe_error,
    open_checked,
    resize_crop,
)
from featx.data.reading import read_file

# files, device → one uint8 [3, H, W] image per file, or raise for the whole call
BatchDecoder = Callable[[list[torch.Tensor], torch.device], Sequence[torch.Tensor]]
EXIF_ORIENTATION = 0x0112
JPEG_END = b"\xff\xd9"
_DEVICE_MESSAGE = re.compile(
    r"CUDA error|CUDA out of memory|out of memory|cudaError|CUBLAS_STATUS|CUDNN_STATUS|"
    r"device-side assert|NVJPEG_STATUS_(?:ALLOCATOR_FAILURE|EXECUTION_FAILED|INTERNAL_ERROR)"
)


def nvjpeg(files: list[torch.Tensor], device: torch.device) -> Sequence[torch.Tensor]:
    """torchvision's batched nvJPEG decode (it applies no EXIF orientation on CUDA)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29's deprecation notice for io
        return decode_jpeg(files, mode=ImageReadMode.RGB, device=device)


def cpu_reason(data: bytes | bytearray, header: Any) -> str | None:
    """Why this file must be decoded on the CPU, or None when nvJPEG may take it."""
    if header.format != "JPEG" or header.mode not in ("RGB", "L"):
        return "not a baseline RGB or gray JPEG"
    if header.info.get("progressive") or header.info.get("progression"):
        return "progressive JPEG"
    if header.getexif().get(EXIF_ORIENTATION, 1) not in (0, 1):
        return "EXIF orientation (nvJPEG on CUDA ignores it)"
    if not data.rstrip(b"\0").endswith(JPEG_END):
        return "no end-of-image marker (possibly truncated)"
    if header.size[0] * header.size[1] > REDUCE_ABOVE_PIXELS:
        return "huge image (decoded reduced on the CPU)"
    return None


def prepare(path: str, policy: DecodePolicy) -> torch.Tensor:
    """A worker's share of ``--decode gpu``: the file's bytes (uint8 ``[n]``) when nvJPEG may
    decode it, else the CPU-decoded crop (uint8 ``[3, crop, crop]``); raises for a bad file."""
    return prepare_bytes(read_file(path, policy.max_file_bytes), policy)


def prepare_bytes(data: bytes | bytearray, policy: DecodePolicy) -> torch.Tensor:
    """:func:`prepare` for bytes already read (an archive's member)."""
    if cpu_reason(data, open_checked(data, policy)) is None:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return resize_crop(decode_bytes(data, policy), policy.transform)


def gpu_decodable(path: str, policy: DecodePolicy) -> torch.Tensor | None:
    """The file's bytes when nvJPEG may decode it, else None (the CPU path decodes it)."""
    return _routed(path, policy)[1]


def _routed(path: str, policy: DecodePolicy) -> tuple[bytes | bytearray, torch.Tensor | None]:
    data = read_file(path, policy.max_file_bytes)
    if cpu_reason(data, open_checked(data, policy)) is not None:
        return data, None
    return data, torch.frombuffer(bytearray(data), dtype=torch.uint8)


def is_device_error(error: BaseException) -> bool:
    """Out of memory or a CUDA error: the device's fault, never an image's."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    return isinstance(error, RuntimeError) and bool(_DEVICE_MESSAGE.search(str(error)))


def decode_each_alike(
    files: list[torch.Tensor], device: torch.device, decoder: BatchDecoder = nvjpeg
) -> list[torch.Tensor | Exception]:
    """Every file through ``decoder``: the batch in one call; if that fails, each half again,
    down to single files, so a file is decoded by the same decoder whatever shares its batch.
    A file the decoder refuses on its own gets its exception; device errors propagate."""
    if not files:
        return []
    try:
        images = list(decoder(files, device))
    except Exception as error:
        if is_device_error(error):
            raise
        if len(files) == 1:
            return [error]
        half = len(files) // 2
        return decode_each_alike(files[:half], device, decoder) + decode_each_alike(
            files[half:], device, decoder
        )
    if len(images) != len(files):
        raise RuntimeError(f"the batch decoder returned {len(images)} images for {len(files)}")
    return list(images)


def decode_on_device(
    encoded: Encoded, policy: DecodePolicy, device: torch.device, decoder: BatchDecoder = nvjpeg
) -> tuple[list[int], list[torch.Tensor], list[tuple[int, str]], list[torch.Tensor]]:
    """Batched decode + resize/crop on the device: (rows, their crops, failures, the decoded
    images the crops were made from). A file the decoder refuses on its own is decoded on the
    CPU, and reported only if that fails too. Images of one size are resized in one call."""
    files = encoded.files()
    decoded: dict[int, torch.Tensor] = {}
    failures = []
    for index, data, image in zip(
        encoded.indices, files, decode_each_alike(files, device, decoder), strict=True
    ):
        try:
            if isinstance(image, Exception):
                image = decode_bytes(data.numpy().tobytes(), policy).to(device)
            decoded[index] = image
        except Exception as error:
            if is_device_error(error):
                raise
            failures.append((index, describe_error(error)))
    crops = grouped_resize_crop(decoded, policy.transform)
    indices = sorted(crops)
    return indices, [crops[i] for i in indices], failures, list(decoded.values())


def grouped_resize_crop(
    images: dict[int, torch.Tensor], transform: dict[str, Any]
) -> dict[int, torch.Tensor]:
    """``resize_crop`` of each image, one call per image size (a batch of photos from one
    camera is one call instead of one per image): the same pixels as one call each."""
    by_size: dict[tuple[int, ...], list[int]] = {}
    for index, image in images.items():
        by_size.setdefault(tuple(image.shape), []).append(index)
    crops: dict[int, torch.Tensor] = {}
    for indices in by_size.values():
        group = torch.stack([images[i] for i in indices])
        crops.update(zip(indices, resize_crop(group, transform), strict=True))
    return crops


class DecodeStream:
    """Where device decoding runs, and the ordering of its consumers after it.

    On CUDA the decode and resize run on a stream of their own (torchvision's nvJPEG writes
    from its own stream too, pytorch/vision#9606); the model's stream waits for one event per
    batch on the device (no host synchronisation) and the caching allocator is told the batch
    is used there. The decoded full-size images are held until the resize that read them has
    finished (a host wait before the next decode, on work long done by then): freed earlier,
    their memory could be handed to the next batch's nvJPEG, whose hardware decoder does not
    follow stream order (torchcodec PR 1634), while the resize kernels still read it. Elsewhere
    all of this is a no-op, so CPU tests run this same code.
    """

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._held: tuple[list[torch.Tensor], Any] | None = None

    def running(self) -> contextlib.AbstractContextManager[Any]:
        return (
            torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        )

    def release_previous(self) -> None:
        """Before a decode: the previous batch's decoded images may be reused now."""
        if self._held is not None:
            self._held[1].synchronize()
            self._held = None

    def hold(self, decoded: list[torch.Tensor]) -> None:
        """Keep ``decoded`` until the work queued on the decode stream so far has run."""
        if self.stream is not None and decoded:
            event = torch.cuda.Event()
            event.record(self.stream)
            self._held = (decoded, event)

    def consumed(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``, safe to use on the current stream: one wait per batch."""
        if self.stream is None or tensor.device.type != "cuda":
            return tensor
        current = torch.cuda.current_stream(tensor.device)
        current.wait_stream(self.stream)
        tensor.record_stream(current)
        return tensor


def on_device(
    batch: Batch,
    policy: DecodePolicy,
    device: torch.device,
    decoder: BatchDecoder = nvjpeg,
    stream: DecodeStream | None = None,
) -> Batch:
    """The batch with every image on ``device`` in index order: the CPU-decoded ones plus the
    JPEGs decoded now (their failures join the batch's). A batch without encoded files only
    moves (non-blocking: from pinned memory the copy overlaps)."""
    if batch.encoded is None:
        if batch.images is None:
            return batch
        return replace(batch, images=batch.images.to(device, non_blocking=True))
    stream = stream or DecodeStream(device)
    stream.release_previous()
    with stream.running():
        indices, crops, failures, decoded = decode_on_device(batch.encoded, policy, device, decoder)
        rows = list(batch.images.to(device, non_blocking=True)) if batch.images is not None else []
        by_index = dict(zip(batch.indices + indices, rows + crops, strict=True))
        order = sorted(by_index)
        images = torch.stack([by_index[i] for i in order]) if order else None
        stream.hold(decoded)
    return replace(
        batch,
        indices=order,
        images=stream.consumed(images) if images is not None else None,
        failures=sorted(batch.failures + failures),
        encoded=None,
    )
