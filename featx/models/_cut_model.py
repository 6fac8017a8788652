"""The model a run executes: uint8 images → normalised → cut backbone → pooled vectors."""

from __future__ import annotations

import torch
from torch import nn

from featx.models._backbone import Backbone
from featx.models.pooling import pool


class CutModel(nn.Module):
    """uint8 images on the device → normalised → cut backbone → ``{layer: pooled vectors}``.

    Example: ``CutModel(load_backbone("resnet18", "none"), ["layer3"], "avg")(images)``
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, backbone: Backbone, layers: list[str], how: str) -> None:
        super().__init__()
        # channels_last weights and inputs: oneDNN / cuDNN's fast convolution layout.
        self.extractor = backbone.cut(layers).to(memory_format=torch.channels_last)
        self.layers = layers
        self.how = how
        self.prefix_tokens = backbone.prefix_tokens
        self.register_buffer("mean", torch.tensor(backbone.transform["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(backbone.transform["std"]).view(1, 3, 1, 1))
        self.memory_format = torch.channels_last

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        # Same arithmetic as the weights' transforms(): to float in [0, 1], then normalise.
        x = images.to(torch.float32).div(255).sub(self.mean).div(self.std)
        try:
            out = self.extractor(x.contiguous(memory_format=self.memory_format))
        except RuntimeError as error:
            if self.memory_format != torch.channels_last or VIEW_ERROR not in str(error):
                raise
            # A model that view()s its 4-D activations cannot run channels_last: it runs in
            # the default layout from its first batch on (so every batch of a run alike).
            self.memory_format = torch.contiguous_format
            self.extractor.to(memory_format=torch.contiguous_format)
            out = self.extractor(x.contiguous())
        return {layer: pool(out[layer], self.how, self.prefix_tokens) for layer in self.layers}


VIEW_ERROR = "view size is not compatible with input tensor's size and stride"
