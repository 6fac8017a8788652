"""The loading stage: batches of decoded uint8 images, in order, surviving decoder crashes.

DataLoader workers decode (decode.py) files of the work list (worklist.py); this module hands
their batches to the loop in pipeline.py as :class:`Batch` objects.
"""

from __future__ import annotations

import collections
from collections.abc import Generator, Iterable, Iterator
from dataclasses import replace
from typing import Any

import torch

from featx.data import _workers
from featx.data.batch import Batch, Encoded
from featx.data.decode import DecodePolicy, DecoderCrashed, describe_error, load_image
from featx.data.gpu_decode import prepare
from featx.data.worklist import ImageList
from featx.errors import FeatxError

PREFETCH = 4  # batches each DataLoader worker decodes ahead (runtime.device.feed picks it)
# A batch takes well under a minute even from a slow network disk; 10 minutes without one
# means a worker is stuck (in a hung read, or unable to send its batch).
LOADER_TIMEOUT_S = 600.0
Item = tuple[int, torch.Tensor | None, str]  # (row, image or encoded JPEG or None, error)


class ImageDataset(torch.utils.data.Dataset[Item]):
    """Index → ``(index, uint8 image or None, error text)``; never raises for a bad file."""

    def __init__(self, images: ImageList, policy: DecodePolicy) -> None:
        self.images = images
        self.policy = policy

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Item:
        """The image as uint8 ``[3, crop, crop]`` or, for ``--decode gpu``, a baseline JPEG's
        bytes as uint8 ``[n]`` for the device to decode."""
        path = self.images.absolute(index)
        try:
            if self.policy.mode == "gpu":
                return index, prepare(path, self.policy), ""
            return index, load_image(path, self.policy), ""
        except Exception as error:  # every decoder failure is data about that file, not a crash
            return index, None, describe_error(error)


def collate(items: list[Item]) -> Batch:
    """Stack the decoded images; pack encoded JPEGs (``--decode gpu``) into one tensor; keep
    failures aside. A batch leaves a worker as at most two tensors (two file descriptors)."""
    good = [(index, image) for index, image, _ in items if image is not None and image.ndim == 3]
    return Batch(
        indices=[index for index, _ in good],
        images=torch.stack([image for _, image in good]) if good else None,
        failures=[(index, error) for index, image, error in items if image is None],
        encoded=Encoded.pack(
            [(i, data) for i, data, _ in items if data is not None and data.ndim == 1]
        ),
    )


def decoded_batches(
    dataset: ImageDataset | torch.utils.data.Dataset[Item],
    batches: Iterable[list[Any]],
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
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=replay.starting_at(done),
            collate_fn=collate,
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
                    yield _tagged(batch, replay.get(done))
                    done += 1
                    replay.forget_before(done)
        except RuntimeError as error:
            if not _workers.is_worker_death(error):
                raise
        for items in replay.window(done, workers * prefetch):
            batch = collate([_decode_alone(dataset, item) for item in items])
            yield _tagged(batch, items)
            done += 1
            replay.forget_before(done)


def _tagged(batch: Batch, items: list[Any]) -> Batch:
    tag = getattr(items, "tag", None)
    return batch if tag is None else replace(batch, tag=tag)


class Replay:
    """The batches of a work list as the DataLoader takes them, kept from the first one not yet
    delivered: after a worker died, a new DataLoader starts again there. Folder batches are a
    list; an archive's are read as they go, so only the batches in flight are held."""

    def __init__(self, batches: Iterable[list[Any]]) -> None:
        self.source: Iterator[list[Any]] = iter(batches)
        self.held: collections.deque[list[Any]] = collections.deque()
        self.first = 0  # position of held[0]

    def has(self, position: int) -> bool:
        return self._fill(position)

    def get(self, position: int) -> list[Any]:
        self._fill(position)
        return self.held[position - self.first]

    def starting_at(self, position: int) -> Iterator[list[Any]]:
        while self._fill(position):
            yield self.held[position - self.first]
            position += 1

    def window(self, position: int, count: int) -> list[list[Any]]:
        return [self.get(p) for p in range(position, position + count) if self.has(p)]

    def forget_before(self, position: int) -> None:
        while self.first < position and self.held:
            self.held.popleft()
            self.first += 1

    def _fill(self, position: int) -> bool:
        while position - self.first >= len(self.held):
            try:
                self.held.append(next(self.source))
            except StopIteration:
                return False
        return True


def _decode_alone(dataset: Any, item: Any) -> Item:
    """One image decoded in a process of its own: if that process dies, the image is the culprit."""
    row = dataset.row_of(item) if hasattr(dataset, "row_of") else item
    try:
        result: Item = _workers.call_in_child(dataset.__getitem__, item)
        return result
    except _workers.ProcessDied as died:
        return row, None, describe_error(DecoderCrashed(f"the process decoding this file {died}"))
