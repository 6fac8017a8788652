"""The machine-facing plumbing of a run: device, precision, threads, signals, progress, writer.

Kept out of pipeline.py so the extraction loop there reads top to bottom.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from featx.errors import UsageError

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
    if spec != "auto":
        return spec
    return "fp16" if device.type == "cuda" else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def worker_init(_: int) -> None:
    """DataLoader workers decode; the main process owns Ctrl-C and SIGTERM and cleans up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=TORCHVISION_IO_NOTICE)


class StopSignals:
    """Turn SIGINT/SIGTERM into a flag the loop checks between batches."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received is not None:  # a second Ctrl-C: stop waiting for the batch in flight
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def show_progress(requested: bool | None) -> bool:
    if requested is not None:
        return requested
    return sys.stderr.isatty()


def progress_bar(total: int, initial: int, enabled: bool, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        unit="img",
        desc=desc,
        file=sys.stderr,
        dynamic_ncols=True,
        smoothing=0.05,
        colour=None if os.environ.get("NO_COLOR") else "green",
    )


class BackgroundWriter:
    """Runs ``handle(item)`` on a thread behind a bounded queue, so writing overlaps compute.

    An error on the writer thread is re-raised in the caller at the next ``put`` or ``close``.
    """

    def __init__(self, handle: Callable[[Any], None], depth: int = 4) -> None:
        """``depth`` 0 writes synchronously in the caller (no thread): the plain path."""
        self._handle = handle
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(depth, 1))
        self._error: BaseException | None = None
        self._thread = None
        if depth > 0:
            self._thread = threading.Thread(target=self._run, name="featx-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self._handle(item)
                except BaseException as error:  # handed to the main thread, not swallowed
                    self._error = error

    def put(self, item: Any) -> None:
        self._raise()
        if self._thread is None:
            self._handle(item)
            return
        self._queue.put(item)

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error


# --- decode workers that die ------------------------------------------------------------------


@contextlib.contextmanager
def loader_iterator(loader: torch.utils.data.DataLoader) -> Iterator[Any]:
    """``iter(loader)``, with a dead worker reported by the iterator's ``next()``.

    torch's SIGCHLD handler raises a worker's death asynchronously, wherever the main thread is
    (inside the model, inside the writer), where the batch in hand cannot be accounted for. With
    the default handler the DataLoader notices the death itself, within its 5 s status check
    (MP_STATUS_CHECK_INTERVAL), and raises from ``next()``, where pipeline.py recovers. torch's
    handler is put back once the workers are shut down.
    """
    iterator = iter(loader)  # a first multi-worker iter() installs torch's SIGCHLD handler
    if not loader.num_workers or threading.current_thread() is not threading.main_thread():
        yield iterator
        return
    torch_handler = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        yield iterator
    finally:
        iterator._shutdown_workers()  # now, not at garbage collection: before the handler is back
        signal.signal(signal.SIGCHLD, torch_handler)


def is_worker_death(error: BaseException) -> bool:
    """The DataLoader's error for a worker process that died (killed, segfault, exit)."""
    return isinstance(error, RuntimeError) and str(error).startswith("DataLoader worker (pid")


class ProcessDied(Exception):
    """The child process of :func:`call_in_child` died before it answered."""

    def __init__(self, exitcode: int | None) -> None:
        if exitcode is not None and exitcode < 0:
            how = f"was killed by {signal.Signals(-exitcode).name}"
        else:
            how = f"exited with code {exitcode} before answering"
        super().__init__(how)
        self.exitcode = exitcode


def call_in_child(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` in a child process of its own, so that a crash there (a segfault in
    a C decoder, the OOM killer) costs only the child: it raises :class:`ProcessDied` here.

    Example: ``call_in_child(dataset.__getitem__, 7)``
    """
    import multiprocessing
    import pickle

    context = multiprocessing.get_context()  # the DataLoader's default too
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_answer, args=(sender, function, args), daemon=True)
    child.start()
    sender.close()
    try:
        answer = receiver.recv_bytes()
    except EOFError:  # the child is gone without a word
        answer = None
    finally:
        receiver.close()
    child.join()
    if answer is None:
        raise ProcessDied(child.exitcode)
    return pickle.loads(answer)


def _answer(sender: Any, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
    import pickle

    worker_init(0)
    # Plain pickle: tensors go by value (torch's sharing pickler would need this child alive).
    sender.send_bytes(pickle.dumps(function(*args)))
    sender.close()
