"""Augmented views (``featx extract --augment K``): K seeded random crops of each image besides
its clean view, for heads trained on views and judged on clean images.

A view's randomness depends only on (seed, image name, view number): the main process turns
(seed, name) into one integer per image (:func:`view_key`) and the decode worker draws view
``v``'s crop and flip from ``random.Random`` seeded with (key, v). So a resume, ``--shard K/N``
and torchrun make the same views as one process, whatever the batch, worker or rank.

The policy (``crop-flip``): torchvision's ``RandomResizedCrop`` rule (ten tries of an area
fraction and a log-uniform aspect ratio, else a centre crop) with the area from
:data:`SCALE`, resized to the weights' crop size with the clean view's resize, then a horizontal
flip with probability 1/2. The area floor is 0.25, not ImageNet training's 0.08: a frozen
network's features of a tiny corner say little about the image a head must label.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Any

import torch

from featx.data.resize import resize_to

POLICIES = ("crop-flip",)
SCALE = (0.25, 1.0)  # fraction of the image's area a view covers
RATIO = (3 / 4, 4 / 3)  # its aspect ratio, drawn log-uniformly
FLIP = 0.5  # chance of a horizontal flip


@dataclass(frozen=True)
class ViewPolicy:
    """``views`` augmented views of each image, drawn with ``seed`` (recorded in the file)."""

    views: int
    seed: int = 0
    policy: str = "crop-flip"

    def describe(self) -> dict[str, Any]:
        return {
            "views": self.views,
            "seed": self.seed,
            "policy": self.policy,
            "scale": list(SCALE),
            "ratio": [round(r, 6) for r in RATIO],
            "flip": FLIP,
            "rule": "torchvision RandomResizedCrop (10 tries, else centre) at the crop size, "
            "the clean view's resize; view v of an image from random.Random(sha256(seed, name), v)",
        }


def view_key(seed: int, name: str) -> int:
    """One image's key: its views are drawn from (key, view number) only."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def crop_box(height: int, width: int, draw: random.Random) -> tuple[int, int, int, int]:
    """(top, left, h, w) of one random resized crop: torchvision's ``RandomResizedCrop`` rule
    with its own random numbers."""
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * draw.uniform(*SCALE)
        aspect = math.exp(draw.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return draw.randint(0, height - h), draw.randint(0, width - w), h, w
    ratio = width / height  # ten misses: the largest centre crop within the ratio range
    if ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif ratio > RATIO[1]:
        h, w = height, int(round(height * RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augmented_views(
    image: torch.Tensor, key: int, views: int, transform: dict[str, Any]
) -> list[torch.Tensor]:
    """Views 1..``views`` of a full-size uint8 ``[3, H, W]`` image, each ``[3, crop, crop]``."""
    crop = transform["crop"]
    height, width = image.shape[-2:]
    made = []
    for view in range(1, views + 1):
        draw = random.Random(key * 1_000_003 + view)
        top, left, h, w = crop_box(height, width, draw)
        region = image[:, top : top + h, left : left + w]
        resized = resize_to(region, (crop, crop), transform)
        made.append(resized.flip(-1) if draw.random() < FLIP else resized)
    return made
