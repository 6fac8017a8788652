"""``extract()``: images → uint8 batches → cut model → pooled vectors → shards → one file.

Read this file top to bottom to know what a run does, in three steps: ``plan`` (everything that
can fail before an image is read: ``plan.py``), ``run`` (the loop over this process's shards),
``finish`` (assemble the file, the summary: ``report.py``). The stages live in their own
modules: the work list and decoding in ``data/``, the model in ``models/``, shards and the file
in ``store/``, device, torchrun, signals and progress in ``runtime/``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from featx.config import ExtractConfig, too_many_failures
from featx.data.archives import ArchiveList
from featx.data.batch import Batch
from featx.data.gpu_decode import DecodeStream, on_device
from featx.data.loader import SampleDataset, decoded_batches
from featx.data.work import ShardPiece
from featx.data.worklist import ImageList
from featx.errors import FeatxError, Interrupted, TooManyFailures
from featx.models import CutModel
from featx.plan import Plan, decode_policy, file_attributes, make_plan
from featx.report import (
    STOPPING,
    ExtractResult,
    Ran,
    Timings,
    broken_message,
    interrupted_message,
    output_shards,
    sum_up,
    units_kept,
)
from featx.runtime import device as devices
from featx.runtime.background import BackgroundWriter
from featx.runtime.progress import Progress, note, progress_bar, show_progress
from featx.runtime.signals import StopSignals
from featx.sources import ShardWork
from featx.store.assemble import assemble, count_rows
from featx.store.durable import refuse_existing
from featx.store.shards import ShardRows
from featx.store.workdir import WorkDir, open_work_dir

__all__ = ["ExtractResult", "Plan", "Ran", "Timings", "decode_policy", "extract", "make_plan"]


def extract(
    source: str | os.PathLike[str] | ImageList | ArchiveList,
    out: str | os.PathLike[str],
    config: ExtractConfig = ExtractConfig(),
    *,
    label: str | None = None,
) -> ExtractResult:
    """Extract features of every image in ``source`` into the HDF5 file ``out``.

    Re-running the same call after a kill resumes from the finished shards. ``label`` names the
    run on the progress bar [the output's file name].

    Example: ``extract("photos/", "feats.h5", ExtractConfig(model="resnet18", layers=("layer3",)))``
    """
    started = time.perf_counter()
    plan = make_plan(source, Path(out), config, label)
    with plan.job.session(plan.device), plan.job.output_lock(plan.target):
        if plan.job.leader:
            refuse_existing(plan.target, config.overwrite)  # another run may have finished it
        work = plan.job.leader_first(
            lambda overwrite: open_work_dir(
                plan.target,
                plan.fingerprint,
                plan.shard_size,
                len(plan.source.images),
                overwrite,
                shard_size_given=config.shard_size is not None,  # else a resume keeps its own
            ),
            config.overwrite,
        )
        ran = run(plan, work)
        return finish(plan, work, ran, started)


def run(plan: Plan, work: WorkDir) -> Ran:
    """The loop over this process's unfinished shards: loader → device → model → writer,
    one published shard at a time."""
    mine = plan.job.my_shards(work.shard_count)
    todo = _unfinished(plan, work, mine)
    model = cut_model(plan)
    shards = plan.source.feed(
        work, todo, plan.feed.batch_size, plan.policy, plan.config, plan.job.rank
    )
    progress = progress_bar(
        *plan.source.progress(work, mine, todo), show_progress(plan.config.progress), plan.label
    )
    timings, stream = Timings(), DecodeStream(plan.device)
    with _running(plan, work, shards, progress) as (batches, writer, signals):
        for batch in batches:
            writer.put(compute(batch, model, plan, stream))
            timings.batch_done(batch.samples)
            progress.update(batch.samples)
            if signals.received is not None:
                break
        writer.close()  # batches already computed still reach their shards
        if signals.received is not None:
            message = interrupted_message(plan, work, signals.received)
            raise Interrupted(message, signals.received)
    timings.stop()
    sink = shards.sink
    return Ran(mine, len(mine) - len(todo), timings, sink.busy_s, writer.cpu_s, sink.broken)


def _unfinished(plan: Plan, work: WorkDir, mine: range) -> list[int]:
    """This process's shards still to compute; finished ones checked (archives unchanged)."""
    todo = [shard for shard in mine if not work.is_done(shard)]
    plan.source.check_resume(work, [shard for shard in mine if shard not in todo])
    if plan.job.leader and len(todo) < len(mine):
        done, of = units_kept(plan, work)
        note(
            f"resuming: {done:,} of {of:,} {plan.source.unit} already done ({work.path})",
            plan.config.quiet,
        )
    return todo


def cut_model(plan: Plan) -> torch.nn.Module:
    """The cut model on the run's device, compiled with ``--compile``."""
    model: torch.nn.Module = CutModel(plan.backbone, plan.layers, plan.config.pool)
    model = model.to(plan.device).eval()
    if plan.config.compile:
        model = torch.compile(model, dynamic=False)  # type: ignore[assignment]
    return model


@contextlib.contextmanager
def _running(
    plan: Plan, work: WorkDir, shards: ShardWork, progress: Progress
) -> Iterator[tuple[Iterator[Batch], BackgroundWriter, StopSignals]]:
    """Everything the loop runs inside: the decode workers, the writer thread (it waits for
    each batch's device→host copy, so the loop never does), Ctrl-C handling, inference mode.
    On any error the batches already computed are written or dropped whole: no shard is
    published half-written."""
    config = plan.config
    writer = BackgroundWriter(
        lambda pending: shards.sink.write(pending.rows(), pending.piece),
        depth=4 if config.write_behind else 0,
        finish=shards.sink.close,  # the writer process has published every shard sent
    )
    batches = decoded_batches(
        SampleDataset(plan.policy),
        shards.batches,
        plan.feed.workers,
        pin_memory=plan.device.type == "cuda",
        prefetch=plan.feed.prefetch,
    )
    signals = StopSignals("" if config.quiet else STOPPING)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(signals)
            stack.enter_context(torch.inference_mode())
            stack.enter_context(contextlib.closing(batches))
            stack.enter_context(contextlib.closing(shards))
            stack.enter_context(devices.exact_fp32(plan.precision, plan.device))
            stack.enter_context(devices.out_of_memory_hint(plan.feed.batch_size, str(work.path)))
            yield batches, writer, signals
    except BaseException:
        writer_error = writer.close_quietly()
        shards.sink.discard()
        if writer_error is not None:
            raise writer_error from None
        raise
    finally:
        progress.close()


def compute(
    batch: Batch, model: torch.nn.Module, plan: Plan, stream: DecodeStream | None = None
) -> PendingRows:
    """One batch through the cut model, without waiting for it: the features come back to the
    host asynchronously (``PendingRows.rows()`` waits, on the writer thread), rows in the
    batch's index order. ``--decode gpu``: nvJPEG decodes on ``stream``, and the model's stream
    waits for it on the device. With ``--compile`` a short batch is padded to the batch size:
    one shape, no recompiles."""
    stream = stream or DecodeStream(plan.device)
    batch = on_device(batch, plan.policy, plan.device, stream=stream)
    if batch.images is None:
        return PendingRows(batch.indices, devices.Pending({}), batch.failures, batch.piece)
    x = batch.images
    count = len(x)
    pad_to = plan.feed.batch_size * batch.views if plan.config.compile else 0
    if count < pad_to:
        x = torch.cat([x, x.new_zeros(pad_to - count, *x.shape[1:])])
    with devices.autocast(plan.precision, plan.device):
        outputs = model(x)
    features = devices.to_host(outputs, count, plan.precision)
    return PendingRows(batch.indices, features, batch.failures, batch.piece, batch.views)


@dataclass(frozen=True)
class PendingRows:
    """A batch's rows whose features may still be copying to the host."""

    indices: list[int]
    features: devices.Pending
    failures: list[tuple[int, str]]
    piece: ShardPiece
    views: int = 1  # crops per row: with --augment K, row i's clean view, then its K views

    def rows(self) -> ShardRows:
        features = self.features.wait()
        if self.views == 1:
            return ShardRows(self.indices, features, self.failures)
        grouped = {layer: f.reshape(-1, self.views, *f.shape[1:]) for layer, f in features.items()}
        clean = {layer: f[:, 0] for layer, f in grouped.items()}
        return ShardRows(
            self.indices, clean, self.failures, {k: f[:, 1:] for k, f in grouped.items()}
        )


def finish(plan: Plan, work: WorkDir, ran: Ran, started: float) -> ExtractResult:
    """Assemble the file (the leader, once every rank's shards exist) and sum the run up."""
    rows, failed = assemble_output(plan, work, ran)
    summary = sum_up(plan, ran, rows, failed, time.perf_counter() - started)
    if plan.job.leader and too_many_failures(plan.config.max_failures, failed, rows + failed):
        raise TooManyFailures(
            f"{failed} of {rows + failed} images failed (more than --max-failures "
            f"{plan.config.max_failures}); the output {plan.target} was written: see its failed/ "
            "group",
            result=summary,
        )
    return summary


def assemble_output(plan: Plan, work: WorkDir, ran: Ran) -> tuple[int, int]:
    """(rows, failed samples) of the output the leader assembles (once every rank's shards
    exist), or of this rank's own shards; refused when a shard could not be written."""
    job = plan.job
    # Counted before the barrier: rank 0 removes the shard folder once it has assembled.
    counts = (0, 0)
    if not job.leader and all(work.is_done(shard) for shard in ran.mine):
        counts = count_rows(work, ran.mine)
    job.barrier()  # torchrun: every rank's shards exist before rank 0 assembles
    shards = output_shards(plan, work)  # this part's (--shard K/N), or the whole job's
    scope = shards if job.leader else ran.mine
    unwritten = [shard for shard in scope if not work.is_done(shard)]
    if unwritten:
        raise FeatxError(broken_message(plan, work, scope, unwritten, ran.broken))
    if not job.leader:
        return counts
    attrs = file_attributes(plan)
    if job.writes_part:
        attrs["part"] = f"{job.part}/{job.parts}"
    # An empty part (more parts than shards) still sits at its place in the work list.
    first = min(shards.start * work.shard_size, work.total)
    row_range = (first, work.shard_range(shards[-1])[1]) if shards else (first, first)
    try:
        row_table = plan.source.rows(work, shards, attrs)
        written = assemble(work, shards, row_table, attrs, plan.target, row_range)
    except OSError as error:
        raise work.write_error(error) from None
    work.remove()
    return written.rows, written.failed
