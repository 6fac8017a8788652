"""Decode worker processes: their start-up, their deaths, and decoding one file in a child.

A decoder that crashes (a segfault in a C library, the OOM killer) must cost only the file it
was decoding; these are the pieces loader.py builds that on.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

TORCHVISION_IO_NOTICE = "The image decoding and encoding capabilities of TorchVision"
STATUS_CHECK_S = 5.0  # torch's MP_STATUS_CHECK_INTERVAL: how often a dead worker is noticed


def worker_init(_: int) -> None:
    """DataLoader workers decode; the main process owns Ctrl-C and SIGTERM and cleans up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=TORCHVISION_IO_NOTICE)


@contextlib.contextmanager
def loader_iterator(loader: torch.utils.data.DataLoader) -> Iterator[Any]:
    """``iter(loader)``, with a dead worker reported by the iterator's ``next()``.

    torch's SIGCHLD handler raises a worker's death asynchronously, wherever the main thread is
    (inside the model, inside the writer), where the batch in hand cannot be accounted for. With
    the default handler the DataLoader notices the death itself, within its 5 s status check
    (MP_STATUS_CHECK_INTERVAL), and raises from ``next()``, where pipeline.py recovers. torch's
    handler is put back once the workers are shut down.
    """
    check_room_for_workers(loader.num_workers)
    with _thread_limit_is_an_error(loader.num_workers):
        iterator = iter(loader)  # a first multi-worker iter() installs torch's SIGCHLD handler
    if not loader.num_workers or threading.current_thread() is not threading.main_thread():
        yield iterator
        return
    torch_handler = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        with _thread_limit_is_an_error(loader.num_workers):
            yield iterator
    finally:
        # now, not at garbage collection: before the handler is back (a private torch method)
        with contextlib.suppress(RuntimeError):  # no thread left to tell the workers with
            iterator._shutdown_workers()  # type: ignore[attr-defined]
        signal.signal(signal.SIGCHLD, torch_handler)


# Address space the main process needs per DataLoader worker (a queue feeder thread: its stack
# and its malloc arena), and what a worker needs to decode one image, under ``ulimit -v``.
SPACE_PER_WORKER = 72 << 20
SPACE_TO_DECODE = 256 << 20


def check_room_for_workers(workers: int) -> None:
    """UsageError when an address-space limit (``ulimit -v``) leaves too little room for
    ``workers`` decode processes: torch alone maps gigabytes, so without this check the
    workers fail every image with MemoryError or the loader cannot start its threads."""
    import resource

    from featx.errors import UsageError

    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if not workers or limit == resource.RLIM_INFINITY:
        return
    free = limit - _address_space_used()
    needed = SPACE_TO_DECODE + workers * SPACE_PER_WORKER
    if free < needed:
        fits = max(0, (free - SPACE_TO_DECODE) // SPACE_PER_WORKER)
        raise UsageError(
            f"--workers {workers}: the address-space limit (ulimit -v, {limit >> 20} MB) leaves "
            f"{max(free, 0) >> 20} MB, and {workers} decode workers need about {needed >> 20} "
            f"MB; use --workers {fits} or raise the limit"
        )


def _address_space_used() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return 0


@contextlib.contextmanager
def _thread_limit_is_an_error(workers: int) -> Iterator[None]:
    """A loader that cannot start a thread (a memory or thread limit) becomes one FeatxError,
    and its workers, which ignore SIGTERM, are killed so that the exit does not wait on them."""
    try:
        yield
    except RuntimeError as error:
        if "can't start new thread" not in str(error):
            raise
        import multiprocessing

        from featx.errors import FeatxError

        for child in multiprocessing.active_children():
            if getattr(getattr(child, "_target", None), "__name__", "") == "_worker_loop":
                child.kill()
                child.join()
        raise FeatxError(
            f"cannot run {workers} decode workers: {error} (a memory or thread limit, such as "
            "ulimit -v or ulimit -u, is too tight); use fewer --workers or raise the limit"
        ) from None


def is_loader_timeout(error: BaseException) -> bool:
    """The DataLoader's error for no batch within its ``timeout``."""
    return isinstance(error, RuntimeError) and str(error).startswith("DataLoader timed out")


def kill_workers(iterator: Any) -> None:
    """SIGKILL a multi-worker iterator's workers: stuck ones (a hung read) ignore SIGTERM
    (worker_init) and the DataLoader's shutdown would wait for them forever."""
    for worker in getattr(iterator, "_workers", []):
        worker.kill()


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
