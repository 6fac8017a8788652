"""Where the model runs and in which precision."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from featx import defaults
from featx.errors import FeatxError, UsageError

TORCHVISION_IO_NOTICE = "The image decoding and encoding capabilities of TorchVision"


def pick_device(spec: str) -> torch.device:
    """'auto' → CUDA when present, else MPS, else CPU; explicit names are checked."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device {spec!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise UsageError(f"--device {spec}: MPS is not available on this machine")
    return device


def pick_precision(spec: str, device: torch.device) -> str:
    """'auto' → fp16 on CUDA, fp32 elsewhere (CPU bf16 autocast measured 6x slower here)."""
    return spec if spec != "auto" else defaults.precision_for(device.type)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


# --- feeding the device: batch size, workers, prefetch --------------------------------------


@dataclass(frozen=True)
class Feed:
    """How the DataLoader feeds the model: images per batch, worker processes, batches each
    worker decodes ahead. :func:`feed` is the documented rule (README "Throughput")."""

    batch_size: int
    workers: int
    prefetch: int


def feed(
    batch_size: int | None, workers: int | None, device: torch.device, cores: int, ranks: int = 1
) -> Feed:
    """The rule, each part overridable (``--batch-size``, ``--workers``):

    * batch: ``defaults.batch_size_for`` (256 on CUDA, 32 elsewhere);
    * workers: ``defaults.workers_for``, this process's share of the cores;
    * prefetch: enough batches in flight to hide a slow one, about 256 images per worker and at
      least 2 batches (4 at batch 32, 2 at 256).

    Example: ``feed(None, None, torch.device("cuda"), cores=64, ranks=8) == Feed(256, 7, 2)``
    """
    batch = batch_size or defaults.batch_size_for(device.type)
    if workers is None:
        workers = defaults.workers_for(device.type, cores, ranks)
    return Feed(batch, workers, max(2, min(4, 256 // batch)))


# --- exact fp32, device binding -------------------------------------------------------------


@contextlib.contextmanager
def exact_fp32(precision: str, device: torch.device) -> Iterator[None]:
    """``--precision fp32`` on CUDA computes in fp32: cuDNN's default runs convolutions in TF32
    (10-bit mantissa), which the file would not record. Restored afterwards."""
    if precision != "fp32" or device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def bound_device(device: torch.device, local_rank: int | None, device_count: int) -> torch.device:
    """The CUDA device this process uses: ``LOCAL_RANK`` under torchrun, else the one named
    (``cuda`` alone: the current one, 0). Refuses an ordinal the machine lacks in one line."""
    if device.type != "cuda":
        return device
    index = local_rank if local_rank is not None else (device.index or 0)
    if index >= device_count:
        where = f"LOCAL_RANK {local_rank}" if local_rank is not None else f"--device {device}"
        raise UsageError(
            f"{where}: this machine has {device_count} CUDA device(s) (0 to {device_count - 1}); "
            "start at most that many processes per node (torchrun --nproc-per-node)"
        )
    return torch.device("cuda", index)


# --- device → host without a host synchronisation per batch ---------------------------------


@dataclass(frozen=True)
class Pending:
    """Tensors on their way to the host. On CUDA the copies are non-blocking into page-locked
    buffers and ``wait`` (called on the writer thread) blocks on their event, so the loop never
    waits for a batch's results; elsewhere there is nothing to wait for (the event is None).
    ``finite`` says, per output, whether every value is finite: computed on the device with the
    batch, so a non-finite row is refused without a host synchronisation in the loop."""

    tensors: dict[str, torch.Tensor]
    event: Any = None
    finite: torch.Tensor | None = None  # bool [outputs], in the order of ``tensors``
    precision: str = "fp32"  # what made them, for the advice when they are not finite

    def wait(self) -> dict[str, np.ndarray]:
        if self.event is not None:
            self.event.synchronize()
        if self.finite is not None and not bool(self.finite.all()):
            flags = self.finite.tolist()
            bad = [name for name, ok in zip(self.tensors, flags, strict=True) if not ok]
            raise FeatxError(non_finite_message(bad, self.precision))
        return {name: tensor.numpy() for name, tensor in self.tensors.items()}


def non_finite_message(layers: list[str], precision: str) -> str:
    """Why a batch's features were refused, and what to run instead."""
    where = f"non-finite features (inf or NaN) in {', '.join(layers)} at --precision {precision}"
    if precision == "fp16":
        advice = (
            "fp16 overflows above 65,504: run again with --precision bf16 or fp32 and "
            "--overwrite (precision is part of the run's fingerprint)"
        )
    else:
        advice = "the model itself gives them (check its weights); nothing of them was written"
    return f"{where}: {advice}; finished shards are kept"


def to_host(outputs: dict[str, torch.Tensor], count: int, precision: str = "fp32") -> Pending:
    """The first ``count`` rows of each output as float32 on the host, copying asynchronously
    on CUDA (see :class:`Pending`), with whether each output is finite: a batch with inf or NaN
    is refused on the writer thread, never written."""
    first = next(iter(outputs.values()), None)
    if first is None:
        return Pending({})
    rows = {name: value[:count].float() for name, value in outputs.items()}
    finite = torch.stack([torch.isfinite(value).all() for value in rows.values()])
    if first.device.type != "cuda":
        return Pending({n: v.cpu() for n, v in rows.items()}, None, finite, precision)
    host = {}
    for name, value in rows.items():
        buffer = torch.empty(value.shape, dtype=torch.float32, pin_memory=True)
        host[name] = buffer.copy_(value, non_blocking=True)
    flags = torch.empty(finite.shape, dtype=torch.bool, pin_memory=True)
    flags.copy_(finite, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return Pending(host, event, flags, precision)


@contextlib.contextmanager
def out_of_memory_hint(batch_size: int, kept: str) -> Iterator[None]:
    """CUDA out of memory as one line that names ``--batch-size`` (exit 1). The finished shards
    stay: batch size is not part of the fingerprint, so a smaller one resumes the run."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise FeatxError(
            f"the device ran out of memory at --batch-size {batch_size}: finished shards are kept "
            f"in {kept}; run the same command with a smaller --batch-size to resume"
        ) from None
