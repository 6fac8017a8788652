"""What a run reports: its timings, what the loop did, the summary ``featx extract --json``
prints, and the messages for an interrupted run or archives that could not be used."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from featx.plan import Plan
from featx.runtime.signals import signal_name
from featx.store.workdir import WorkDir


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
    writer_s: float  # time spent writing shards (by the writer process, overlapped with compute)
    loop_s: float  # the decode → model → write loop alone (no model loading, no assembly)
    complete: bool = True  # False on torchrun ranks other than 0: rank 0 writes the file
    # CPU time the main process spent handing rows to the writer (pickling them into its pipe)
    writer_main_s: float = 0.0
    startup_s: float = 0.0  # from the call until the first batch was computed (model, workers)
    steady_images_per_second: float = 0.0  # after the first batch: what the progress bar shows

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    writer_main_s: float = 0.0  # CPU time this process spent handing rows to the sink
    broken: dict[int, str] = field(default_factory=dict)  # shards that could not be read


STOPPING = "featx: stopping after this batch… (press Ctrl-C again to stop at once)\n"


def output_shards(plan: Plan, work: WorkDir) -> range:
    """The shards the output covers: this part's (--shard K/N) or the whole job's."""
    mine = plan.job.my_shards(work.shard_count)
    return mine if plan.job.writes_part else range(work.shard_count)


def units_kept(plan: Plan, work: WorkDir) -> tuple[int, int]:
    """(units in finished shards, units in all) of the output's shards: images, or archives."""
    shards = output_shards(plan, work)
    count = plan.source.count
    return count(work, [s for s in shards if work.is_done(s)]), count(work, shards)


def interrupted_message(plan: Plan, work: WorkDir, signum: int) -> str:
    """What an interrupted run keeps, in images, and what running it again does."""
    kept, total = units_kept(plan, work)
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
        writer_main_s=round(ran.writer_main_s, 3),
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
