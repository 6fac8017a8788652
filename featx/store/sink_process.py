"""The shard sink in a process of its own: HDF5 writes, fsyncs and renames off the main process.

h5py holds the GIL for every call, so a shard written on a thread of the main process stalls the
thread that drives the GPU (a shard took 85 ms instead of 28 ms while the loop was busy). Here
the main process only sends each batch's rows down a pipe (a pickle of its arrays; the send
itself releases the GIL) and a child process owns the shard files.

What a kill does: the child ignores SIGINT and SIGTERM (the main process decides when to stop,
and its writer flushes what was computed), and when the main process dies (even SIGKILL) the
child reads end-of-file, discards the shards it holds open and exits: a shard is published only
after its last batch arrived, so kill -9 still loses at most the shards in flight.
"""

from __future__ import annotations

import multiprocessing
import signal
import warnings
from multiprocessing.connection import Connection
from typing import Any

from featx.data.work import ShardPiece
from featx.errors import FeatxError
from featx.store.shards import ShardRows, ShardSink, Sink

JOIN_TIMEOUT_S = 60.0
STOPS = {signal.SIGINT, signal.SIGTERM}  # a discard ends at once; only a stuck disk takes longer


def apart(sink: ShardSink, in_own_process: bool) -> Sink:
    """``sink`` in a process of its own (``--write-behind``, the default), or as it is."""
    return SinkProcess(sink) if in_own_process else sink


class SinkProcess:
    """``sink`` run in a child process, with the same ``write``/``discard``/``close``; its
    ``busy_s`` and ``broken`` are the child's, known after ``close``."""

    def __init__(self, sink: ShardSink) -> None:
        context = multiprocessing.get_context("fork")  # no re-import: starts in milliseconds
        inbox, self._outbox = context.Pipe(duplex=False)
        self._results, results_in = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_serve,
            args=(sink, inbox, results_in, self._outbox),
            name="featx-writer",
            daemon=True,
        )
        # Ctrl-C and SIGTERM held back until the child ignores them (they reach the whole
        # process group; the main process decides when to stop, and then flushes the writer).
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
        try:
            with warnings.catch_warnings():
                # Python 3.12+ warns on fork in a process with threads: the child uses none of
                # the locks those threads may hold (only pickle, numpy and h5py, which no thread
                # of the main process is inside: the writer thread starts after this fork).
                warnings.simplefilter("ignore", DeprecationWarning)
                self._process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        inbox.close()  # the child's ends: the parent keeps only its own
        results_in.close()
        self.busy_s = 0.0
        self.broken: dict[int, str] = {}
        self._done = False

    def write(self, rows: ShardRows, piece: ShardPiece) -> None:
        try:
            self._outbox.send(("write", rows, piece))
        except OSError:  # the child is gone: its own error says why
            self._raise_from_child()

    def close(self) -> None:
        """Wait until every batch sent is in its shard (or the shard discarded); the child's
        error, if it had one, is raised here."""
        if self._done:
            return
        try:
            self._outbox.send(("close",))
        except OSError:
            pass
        self._raise_from_child()

    def discard(self) -> None:
        """Drop the shards not yet published (after an error or an interrupt)."""
        if self._done:
            return
        self._done = True
        try:
            self._outbox.send(("discard",))
        except OSError:
            pass
        self._outbox.close()
        self._process.join(JOIN_TIMEOUT_S)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    def _raise_from_child(self) -> None:
        self._done = True
        try:
            answer = self._results.recv()
        except (EOFError, OSError):
            answer = ("error", FeatxError(_died(self._process)))
        self._outbox.close()
        self._process.join(JOIN_TIMEOUT_S)
        if answer[0] == "error":
            raise answer[1]
        self.busy_s, self.broken = answer[1], answer[2]


def _serve(sink: ShardSink, inbox: Connection, results: Connection, parents: Connection) -> None:
    """The child: write what arrives until told to close or discard, or until the main process
    is gone (end of file: discard)."""
    for signum in STOPS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)
    parents.close()  # else this process would hold its own inbox open and never see EOF
    try:
        _loop(sink, inbox, results)
    except BaseException as error:
        sink.discard()
        results.send(("error", _sendable(error)))


def _loop(sink: ShardSink, inbox: Connection, results: Connection) -> None:
    while True:
        try:
            message: tuple[Any, ...] = inbox.recv()
        except EOFError:  # the main process died
            sink.discard()
            return
        if message[0] == "write":
            sink.write(message[1], message[2])
        elif message[0] == "close":
            sink.discard()  # nothing is open after a whole run; defensive
            results.send(("done", sink.busy_s, sink.broken))
            return
        else:
            sink.discard()
            return


def _sendable(error: BaseException) -> BaseException:
    """The error itself when it survives pickling (FeatxError keeps its exit code), else its
    text as a FeatxError."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except (pickle.PicklingError, TypeError, AttributeError, ValueError):  # what pickle raises
        return FeatxError(f"the shard writer failed: {type(error).__name__}: {error}")


def _died(process: multiprocessing.process.BaseProcess) -> str:
    process.join(1)
    code = process.exitcode
    how = f"was killed by signal {-code}" if code is not None and code < 0 else "stopped"
    return (
        f"the shard writer process {how} before it finished; finished shards are kept: run "
        "the same command to resume"
    )
