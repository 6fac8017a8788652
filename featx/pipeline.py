"""``extract()``: image files → uint8 batches → cut model → pooled vectors → shards → one file.

Read this file top to bottom to know what a run does, in three steps: ``plan`` (everything that
can fail before an image is read), ``run`` (the loop over this process's shards), ``finish``
(assemble the file, the summary). The stages live in their own modules: the work list and
decoding in ``data/``, the model in ``models/``, shards and the file in ``store/``, device,
torchrun, signals and progress in ``runtime/``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from featx import __version__, defaults
from featx.config import ExtractConfig, available_cores, parse_bytes, too_many_failures
from featx.data.archives import ArchiveList
from featx.data.batch import Batch
from featx.data.decode import DecodePolicy
from featx.data.gpu_decode import DecodeStream, on_device
from featx.data.loader import SampleDataset, decoded_batches
from featx.data.work import ShardPiece
from featx.data.worklist import ImageList, printable
from featx.errors import FeatxError, Interrupted, TooManyFailures, UsageError
from featx.models import Backbone, CutModel, describe_layers, load_backbone
from featx.models.pooling import pooled_shape
from featx.preflight import preflight
from featx.runtime import device as devices
from featx.runtime.background import BackgroundWriter
from featx.runtime.distributed import Job, job_for
from featx.runtime.progress import note, progress_bar, show_progress
from featx.runtime.signals import StopSignals, signal_name
from featx.sources import ShardWork, WorkSource, source_of
from featx.store import schema
from featx.store.assemble import assemble, count_rows
from featx.store.durable import refuse_existing
from featx.store.shards import ShardRows
from featx.store.workdir import WorkDir, open_work_dir


@dataclass(frozen=True)
class ExtractResult:
    """What a run did; ``featx extract --json`` prints this."""

    output: str
    images: int  # rows written (good images)
    failed: int
    total: int  # files in the work list (for this part)
    shards_done_before: int  # shards found finished from an earlier, interrupted run
    elapsed_s: float
    images_per_second: float  # images computed by this run (not resumed ones) per second
    writer_s: float  # time spent writing shards (overlapped with compute by the writer thread)
    loop_s: float  # the decode → model → write loop alone (no model loading, no assembly)
    complete: bool = True  # False on torchrun ranks other than 0: rank 0 writes the file
    startup_s: float = 0.0  # from the call until the first batch was computed (model, workers)
    steady_images_per_second: float = 0.0  # after the first batch: what the progress bar shows

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    """A run, decided and checked before any image is read."""

    config: ExtractConfig
    source: WorkSource  # files (shards of --shard-size) or archives (one shard each)
    target: Path  # the output, or this part's file with --shard K/N
    job: Job
    backbone: Backbone
    layers: list[str]
    device: torch.device
    precision: str
    policy: DecodePolicy
    fingerprint: dict[str, Any]
    feed: devices.Feed  # batch size, workers, prefetch (not fingerprinted: free between runs)
    shard_size: int  # files per shard (--shard-size, or the device's rule); archives: 1
    label: str = ""  # the progress bar's label


@dataclass
class Timings:
    """When the loop started, how long its first batch took (start-up: model warm-up, the
    workers' first decode) and how many samples it computed, then and in all."""

    started: float = field(default_factory=time.perf_counter)
    first_batch_s: float = 0.0
    first_batch_files: int = 0
    computed: int = 0  # samples decoded (or failed) and computed by this run
    loop_s: float = 0.0

    def batch_done(self, samples: int) -> None:
        if not self.computed:
            self.first_batch_s = time.perf_counter() - self.started
            self.first_batch_files = samples
        self.computed += samples

    def stop(self) -> None:
        self.loop_s = time.perf_counter() - self.started

    def steady_rate(self) -> float:
        """Images per second after the first batch (start-up excluded), as the progress bar
        sees it; a run of one batch has no steady state: its loop's rate."""
        after = self.loop_s - self.first_batch_s
        if self.computed > self.first_batch_files and after > 0:
            return (self.computed - self.first_batch_files) / after
        return self.computed / self.loop_s if self.loop_s > 0 else 0.0


@dataclass(frozen=True)
class Ran:
    """What the loop did in this process."""

    mine: range  # this process's shards
    done_before: int  # of them, finished by an earlier run
    timings: Timings
    writer_s: float = 0.0  # time the sink spent writing shards
    broken: dict[int, str] = field(default_factory=dict)  # shards that could not be read


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


def make_plan(
    source: str | os.PathLike[str] | ImageList | ArchiveList,
    out: Path,
    config: ExtractConfig,
    label: str | None = None,
) -> Plan:
    """Everything that can be wrong with the arguments fails here, before any image is read."""
    images = preflight(source, out, config)
    job = job_for(config.shard)
    target = schema.part_path(out, job.part, job.parts) if job.writes_part else out
    refuse_existing(target, config.overwrite)  # torchrun ranks: known only now
    if job.leader:
        note(images.layout_warning(), config.quiet, "warning: ")
        note(images.describe(), config.quiet)
    backbone = load_backbone(config.model, config.weights, config.image_size)
    layers = backbone.check_layers(config.layers)
    shapes = {info.name: info.shape for info in describe_layers(backbone, config.pool, layers)}
    for layer in layers:
        if layer not in shapes:
            raise UsageError(f"layer {layer!r} does not output a batched tensor; pick another")
    device = job.device(devices.pick_device(config.device))
    policy = decode_policy(backbone, config, device)
    precision = devices.pick_precision(config.precision, device)
    fingerprint = {
        "model": config.model,
        "weights": backbone.weights,
        "layers": layers,
        "pool": config.pool,
        "transform": backbone.transform,
        "dtype": config.dtype,
        "precision": precision,
        "decode": policy.describe(),
        "files": len(images),
        "files_sha256": images.digest(),
        "shapes": {layer: list(pooled_shape(shapes[layer], config.pool)) for layer in layers},
    }
    feed = devices.feed(
        config.batch_size, config.workers, device, available_cores(), job.ranks_per_node
    )
    work_source = source_of(images)
    shard_size = work_source.shard_size(config.shard_size or defaults.shard_size_for(device.type))
    return Plan(
        config,
        work_source,
        target,
        job,
        backbone,
        layers,
        device,
        precision,
        policy,
        fingerprint,
        feed,
        shard_size,
        label or target.name,
    )


def decode_policy(backbone: Backbone, config: ExtractConfig, device: torch.device) -> DecodePolicy:
    """How pixels are made for ``backbone`` on ``device`` (recorded in the fingerprint)."""
    if config.decode == "gpu" and device.type != "cuda":
        raise UsageError("--decode gpu needs a CUDA device (--device cuda)")
    return DecodePolicy(
        backbone.transform,
        config.background,
        config.max_image_pixels,
        config.decode,
        parse_bytes(config.max_file_bytes, "--max-file-bytes"),
    )


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
    return Ran(mine, len(mine) - len(todo), timings, shards.sink.busy_s, shards.sink.broken)


def _unfinished(plan: Plan, work: WorkDir, mine: range) -> list[int]:
    """This process's shards still to compute; finished ones checked (archives unchanged)."""
    todo = [shard for shard in mine if not work.is_done(shard)]
    plan.source.check_resume(work, [shard for shard in mine if shard not in todo])
    if plan.job.leader and len(todo) < len(mine):
        done, of = _kept(plan, work)
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
    plan: Plan, work: WorkDir, shards: ShardWork, progress: Any
) -> Iterator[tuple[Iterator[Batch], BackgroundWriter, StopSignals]]:
    """Everything the loop runs inside: the decode workers, the writer thread (it waits for
    each batch's device→host copy, so the loop never does), Ctrl-C handling, inference mode.
    On any error the batches already computed are written or dropped whole: no shard is
    published half-written."""
    config = plan.config
    writer = BackgroundWriter(
        lambda pending: shards.sink.write(pending.rows(), pending.piece),
        depth=4 if config.write_behind else 0,
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


STOPPING = "featx: stopping after this batch… (press Ctrl-C again to stop at once)\n"


def _scope(plan: Plan, work: WorkDir) -> range:
    """The shards the output covers: this part's (--shard K/N) or the whole job's."""
    mine = plan.job.my_shards(work.shard_count)
    return mine if plan.job.writes_part else range(work.shard_count)


def _kept(plan: Plan, work: WorkDir) -> tuple[int, int]:
    """(units in finished shards, units in all) of the output's shards: images, or archives."""
    shards = _scope(plan, work)
    count = plan.source.count
    return count(work, [s for s in shards if work.is_done(s)]), count(work, shards)


def interrupted_message(plan: Plan, work: WorkDir, signum: int) -> str:
    """What an interrupted run keeps, in images, and what running it again does."""
    kept, total = _kept(plan, work)
    if not kept:
        return (
            f"interrupted by {signal_name(signum)} before the first shard of "
            f"{plan.source.shard_words(work)} was finished: nothing is kept, and the same "
            f"command starts again from the beginning ({plan.source.resume_unit})"
        )
    return (
        f"interrupted by {signal_name(signum)}: {kept:,} of {total:,} {plan.source.unit} are kept "
        f"in {work.path} (finished shards); run the same command again to resume"
    )


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
    pad_to = plan.feed.batch_size if plan.config.compile else 0
    if count < pad_to:
        x = torch.cat([x, x.new_zeros(pad_to - count, *x.shape[1:])])
    with devices.autocast(plan.precision, plan.device):
        outputs = model(x)
    return PendingRows(batch.indices, devices.to_host(outputs, count), batch.failures, batch.piece)


@dataclass(frozen=True)
class PendingRows:
    """A batch's rows whose features may still be copying to the host."""

    indices: list[int]
    features: devices.Pending
    failures: list[tuple[int, str]]
    piece: ShardPiece

    def rows(self) -> ShardRows:
        return ShardRows(self.indices, self.features.wait(), self.failures)


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
    shards = _scope(plan, work)  # this part's (--shard K/N), or the whole job's
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


def sum_up(plan: Plan, ran: Ran, rows: int, failed: int, elapsed: float) -> ExtractResult:
    """The run's summary (``featx extract --json``)."""
    timings = ran.timings
    startup = timings.started + timings.first_batch_s - (time.perf_counter() - elapsed)
    return ExtractResult(
        output=str(plan.target),
        images=rows,
        failed=failed,
        total=rows + failed,  # every file (archive sample) is a row or a failure
        shards_done_before=ran.done_before,
        elapsed_s=round(elapsed, 3),
        images_per_second=round(timings.computed / elapsed, 2),
        writer_s=round(ran.writer_s, 3),
        loop_s=round(timings.loop_s, 3),
        complete=plan.job.leader,
        startup_s=round(startup, 3) if timings.computed else 0,
        steady_images_per_second=round(timings.steady_rate(), 2),
    )


def broken_message(
    plan: Plan, work: WorkDir, scope: range, unwritten: list[int], broken: dict[int, str]
) -> str:
    """Which archives could not be used (their shards are not written), and what to do."""
    reasons = [
        f"{plan.source.shard_name(s)}: "
        + broken.get(s, "not written (see the error of the process that read it)")
        for s in unwritten
    ]
    shown = "; ".join(reasons[:3]) + (f"; and {len(reasons) - 3} more" if len(reasons) > 3 else "")
    done = len(scope) - len(unwritten)
    return (
        f"{len(unwritten)} archive(s) could not be used, so their shards were not written "
        f"({shown}); the {done} finished shard(s) are kept in {work.path}: fix, replace or "
        "re-fetch those archives and run the same command to resume"
    )


def file_attributes(plan: Plan) -> dict[str, Any]:
    """The root attributes: the run's fingerprint plus labels, source and versions."""
    import torchvision

    attrs: dict[str, Any] = {
        "featx_schema": schema.SCHEMA_VERSION,
        **plan.source.attributes(),  # inputs, class_names (archives': decided at assembly)
        **plan.fingerprint,
        "compression": plan.config.compression,
        "source": _source(plan.source.images),
        "featx_version": __version__,
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
    }
    if plan.backbone.weights["source"] != "torchvision":
        import timm

        attrs["timm_version"] = timm.__version__
    return attrs


def _source(images: ImageList | ArchiveList) -> str:
    """The root the rows are relative to: a folder (absolute) or a URL."""
    from featx.data.remote import is_url

    root = images.root
    return printable(root if is_url(root) else os.path.abspath(root))
