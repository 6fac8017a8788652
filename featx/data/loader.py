"""The loading stage: batches of decoded uint8 images, in order, surviving decoder crashes.

DataLoader workers decode (decode.py) files of the work list (worklist.py); this module hands
their batches to the loop in pipeline.py as :class:`Batch` objects.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
from collections.abc import Generator, Iterable, Iterator
from dataclasses import replace

import torch

from featx.data import _workers
from featx.data.batch import Batch, Encoded
from featx.data.batch_slots import SPARE_SLOTS, BatchSlots, Slot, shared_uint8
from featx.data.decode import (
    DecodePolicy,
    DecoderCrashed,
    decode_bytes,
    describe_error,
    resize_crop,
)
from featx.data.gpu_decode import prepare_bytes
from featx.data.reading import read_payload
from featx.data.views import ViewPolicy, augmented_views, view_key
from featx.data.work import FileRange, WorkBatch, WorkItem
from featx.data.worklist import ImageList
from featx.errors import FeatxError

PREFETCH = 4  # batches each DataLoader worker decodes ahead (runtime.device.feed picks it)
# A batch takes well under a minute even from a slow network disk; 10 minutes without one
# means a worker is stuck (in a hung read, or unable to send its batch).
LOADER_TIMEOUT_S = 600.0
Item = tuple[int, torch.Tensor | None, str]  # (row, image or encoded JPEG or None, error)


class SampleDataset(torch.utils.data.Dataset[Item]):
    """``(row, payload)`` → ``(row, uint8 image or None, error text)`` for every source alike;
    never raises for a bad sample."""

    def __init__(self, policy: DecodePolicy) -> None:
        self.policy = policy

    def __getitem__(self, item: WorkItem) -> Item:
        """The image as uint8 ``[3, crop, crop]``, with ``--augment K`` its clean view and K
        augmented ones as ``[1 + K, 3, crop, crop]``, or, for ``--decode gpu``, a baseline
        JPEG's bytes as uint8 ``[n]`` for the device to decode."""
        row, payload, key = item
        policy = self.policy
        try:
            data = read_payload(payload, policy.max_file_bytes)
            if policy.mode == "gpu":
                return row, prepare_bytes(data, policy), ""
            image = decode_bytes(data, policy)
            clean = resize_crop(image, policy.transform)
            if policy.views is None:
                return row, clean, ""
            views = augmented_views(image, key, policy.views.views, policy.transform)
            return row, torch.stack([clean, *views]), ""
        except Exception as error:  # every decoder failure is data about that file, not a crash
            return row, None, describe_error(error)


def file_items(
    images: ImageList, rows: Iterable[int], views: ViewPolicy | None = None
) -> list[WorkItem]:
    """The work items of rows of a file list: each a whole file; with ``views``, keyed by the
    file's name in the work list (the output's ``paths``)."""
    if views is None:
        return [WorkItem(row, FileRange(images.absolute(row))) for row in rows]
    return [
        WorkItem(row, FileRange(images.absolute(row)), view_key(views.seed, images.paths[row]))
        for row in rows
    ]


def collate(items: list[Item], slots: BatchSlots | None = None) -> Batch:
    """Stack the decoded images channels-last (their memory order since decoding: no
    transpose), inside a worker straight into shared memory (a slot of ``slots`` when one is
    free: no copy on the way to the main process, no fresh pages); pack encoded JPEGs
    (``--decode gpu``) into one tensor; keep failures aside. A batch leaves a worker as at most
    two tensors (two file descriptors)."""
    good = [(index, image) for index, image, _ in items if image is not None and image.ndim > 1]
    images, slot = (None, None)
    if good:  # an image's views ([1 + K, 3, h, w]) stay together, in view order
        crops = [crop for _, image in good for crop in (image if image.ndim == 4 else [image])]
        images, slot = stack_channels_last(crops, slots)
    return Batch(
        indices=[index for index, _ in good],
        images=images,
        views=good[0][1].shape[0] if good and good[0][1].ndim == 4 else 1,
        failures=[(index, error) for index, image, error in items if image is None],
        encoded=Encoded.pack(
            [(i, data) for i, data, _ in items if data is not None and data.ndim == 1]
        ),
        slot=slot,
    )


def stack_channels_last(
    images: list[torch.Tensor], slots: BatchSlots | None = None
) -> tuple[torch.Tensor, Slot | None]:
    """``[3, h, w]`` images → one ``[n, 3, h, w]`` tensor in channels-last memory, and the slot
    it lives in; in a DataLoader worker it is allocated in shared memory, as ``default_collate``
    does."""
    channels, height, width = images[0].shape
    shape = (len(images), height, width, channels)
    slot = None
    if torch.utils.data.get_worker_info() is not None:
        strides = (height * width * channels, width * channels, channels, 1)
        out, slot = shared_uint8(shape, strides, slots)
    else:
        out = torch.empty(shape, dtype=torch.uint8)
    torch.stack([image.permute(1, 2, 0) for image in images], out=out)
    return out.permute(0, 3, 1, 2), slot


def decoded_batches(
    dataset: SampleDataset,
    batches: Iterable[WorkBatch],
    workers: int,
    pin_memory: bool,
    prefetch: int = PREFETCH,
    timeout: float = LOADER_TIMEOUT_S,
) -> Generator[Batch, None, None]:
    """The batches, decoded, in order. A decoder that kills its worker process (a segfault in a
    C library, the OOM killer) must not end the run: the batches that worker may have held are
    decoded again one image per child process, so the culprit is found and recorded in failed/,
    and a fresh DataLoader takes the rest. A worker that neither answers nor dies (stuck in a
    read, or unable to send: out of file descriptors) ends the run after ``timeout`` seconds
    without a batch, with one line, instead of hanging it."""
    done = 0
    # The DataLoader's own timeout, short: it also paces its check for dead workers (which a
    # long timeout would delay); a stuck worker is counted here across these polls.
    poll = min(timeout, _workers.STATUS_CHECK_S)
    replay = Replay(batches)
    while replay.has(done):
        slots = BatchSlots(workers, prefetch + SPARE_SLOTS)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=(work.items for work in replay.starting_at(done)),
            collate_fn=functools.partial(collate, slots=slots),
            num_workers=workers,
            pin_memory=pin_memory,
            worker_init_fn=_workers.worker_init,
            prefetch_factor=prefetch if workers else None,
            timeout=poll if workers else 0,
        )
        try:
            with _workers.loader_iterator(loader) as iterator:
                waited = 0.0
                while True:
                    slots.release_dropped()
                    try:
                        batch = next(iterator)
                    except StopIteration:
                        return
                    except RuntimeError as error:
                        if not _workers.is_loader_timeout(error):
                            raise
                        waited += poll
                        if waited < timeout:
                            continue
                        _workers.kill_workers(iterator)
                        raise FeatxError(
                            f"no batch from the decode workers in {timeout:g} s (a worker is "
                            "stuck or cannot send); finished shards are kept: run the same "
                            "command to resume"
                        ) from None
                    waited = 0.0
                    slots.hold(batch.slot, batch.images)
                    yield replace(batch, piece=replay.get(done).piece)
                    done += 1
                    replay.forget_before(done)
        except RuntimeError as error:
            if not _workers.is_worker_death(error):
                raise
        for work in replay.window(done, workers * prefetch):
            batch = collate([_decode_alone(dataset, item) for item in work.items])
            yield replace(batch, piece=work.piece)
            done += 1
            replay.forget_before(done)


class Replay:
    """The batches of a work list as the DataLoader takes them, kept from the first one not yet
    delivered: after a worker died, a new DataLoader starts again there. Folder batches are a
    list; an archive's are read as they go, so only the batches in flight are held."""

    def __init__(self, batches: Iterable[WorkBatch]) -> None:
        self.source: Iterator[WorkBatch] = iter(batches)
        self.held: collections.deque[WorkBatch] = collections.deque()
        self.first = 0  # position of held[0]

    def has(self, position: int) -> bool:
        return self._fill(position)

    def get(self, position: int) -> WorkBatch:
        self._fill(position)
        return self.held[position - self.first]

    def starting_at(self, position: int) -> Iterator[WorkBatch]:
        while self._fill(position):
            yield self.held[position - self.first]
            position += 1

    def window(self, position: int, count: int) -> list[WorkBatch]:
        return [self.get(p) for p in range(position, position + count) if self.has(p)]

    def forget_before(self, position: int) -> None:
        while self.first < position and self.held:
            done = self.held.popleft()
            self.first += 1
            if done.piece.scratch:  # a fetched copy: every batch that reads it is decoded
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(done.piece.scratch)

    def _fill(self, position: int) -> bool:
        while position - self.first >= len(self.held):
            try:
                self.held.append(next(self.source))
            except StopIteration:
                return False
        return True


def _decode_alone(dataset: SampleDataset, item: WorkItem) -> Item:
    """One image decoded in a process of its own: if that process dies, the image is the culprit."""
    row = item[0]
    try:
        result: Item = _workers.call_in_child(dataset.__getitem__, item)
        return result
    except _workers.ProcessDied as died:
        return row, None, describe_error(DecoderCrashed(f"the process decoding this file {died}"))
