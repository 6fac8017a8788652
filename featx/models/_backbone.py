"""What every model source hands back: a :class:`Backbone`, and what can be done with one.

A backbone is a full classification model plus its preprocessing (a plain dict, stored in
every output file), its weights provenance (a dict, stored as JSON) and the two FX functions
of its source (node names, feature extractor). Cut points are FX node names, as
``get_graph_node_names`` reports them for the eval graph, plus module names.
"""

from __future__ import annotations

import difflib
import importlib
import warnings
from dataclasses import dataclass, field
from typing import Any, TypedDict

import torch
from torch import nn

from featx.errors import UsageError


class Provenance(TypedDict):
    """Where a model's weights came from; enough to load the same weights again.

    ``weights`` is what ``--weights`` takes (``IMAGENET1K_V2``, a timm tag, ``none``) or
    ``file`` for a user's state dict, whose path and sha256 are then given.
    """

    source: str  # torchvision | timm | packaged
    name: str  # the model name as --model takes it
    weights: str
    file: str | None
    sha256: str | None


def provenance(
    source: str, name: str, weights: str, file: str | None = None, sha256: str | None = None
) -> Provenance:
    return Provenance(source=source, name=name, weights=weights, file=file, sha256=sha256)


@dataclass(frozen=True)
class Tracer:
    """A source's FX functions: torchvision's, or timm's (which knows timm's leaf modules).

    ``module`` offers ``get_graph_node_names`` and ``create_feature_extractor`` with
    torchvision's signatures; it is imported on first use.
    """

    module: str

    def node_names(self, model: nn.Module) -> list[str]:
        """Every node of the eval graph, in execution order."""
        return list(importlib.import_module(self.module).get_graph_node_names(model)[1])

    def feature_extractor(self, model: nn.Module, nodes: list[str]) -> nn.Module:
        extractor = importlib.import_module(self.module).create_feature_extractor
        return extractor(model, return_nodes={node: node for node in nodes})


@dataclass
class Backbone:
    """A full classification model plus everything needed to cut and feed it."""

    name: str
    model: nn.Module
    weights: Provenance
    transform: dict[str, Any]  # resize, crop, mean, std, interpolation, antialias
    tracer: Tracer
    prefix_tokens: int = 0  # class/register tokens in front of ViT token sequences
    _nodes: list[str] | None = field(default=None, repr=False)

    def node_names(self) -> list[str]:
        """Every node of the eval graph, in execution order."""
        if self._nodes is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._nodes = self.tracer.node_names(self.model)
        return self._nodes

    def cut_points(self) -> list[str]:
        """Every name ``--layer`` accepts: graph nodes, plus each module (``layer3``,
        ``features.16``) right after its last node, whose output it names."""
        nodes = self.node_names()
        known = set(nodes)
        ends: dict[str, list[str]] = {}
        for module_name, _ in self.model.named_modules():
            if module_name and module_name not in known:
                node = _last_node_with_prefix(nodes, module_name)
                if node is not None:
                    ends.setdefault(node, []).append(module_name)
        names: list[str] = []
        for node in nodes:
            names.append(node)
            names.extend(sorted(ends.get(node, []), key=lambda m: (m.count("."), m)))
        return names

    def node_of(self, layer: str) -> str:
        """The graph node whose output ``layer`` names."""
        nodes = self.node_names()
        if layer in nodes:
            return layer
        node = _last_node_with_prefix(nodes, layer)
        if node is None:
            raise UsageError(f"no layer {layer!r} in {self.name}")
        return node

    def default_layer(self) -> str:
        """The node that feeds the classifier: the penultimate, pre-logits features."""
        return default_layer(self.model, self.node_names())

    def check_layers(self, layers: tuple[str, ...] | list[str]) -> list[str]:
        """The layers to cut at, defaulted and validated before any image is read."""
        names = self.cut_points()
        chosen = list(layers) or [self.default_layer()]
        for layer in chosen:
            if layer not in names:
                close = difflib.get_close_matches(layer, names, n=3, cutoff=0.5)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise UsageError(
                    f"no layer {layer!r} in {self.name}{hint} `featx layers {self.name}` lists them"
                )
        if len(set(chosen)) != len(chosen):
            raise UsageError(f"--layer given twice: {', '.join(chosen)}")
        return chosen

    def cut(self, layers: list[str]) -> nn.Module:
        """A module returning ``{layer: tensor}`` from one forward pass."""
        return _Cut(self.model, self.tracer, {layer: self.node_of(layer) for layer in layers})

    def resized(self, crop: int | None) -> Backbone:
        """The same backbone fed at another crop size (``--image-size``)."""
        if crop is not None:
            self.transform = resized_transform(self.transform, crop)
        return self


class _Cut(nn.Module):
    """A feature extractor that may name one graph node by several layer names."""

    def __init__(self, model: nn.Module, tracer: Tracer, nodes: dict[str, str]) -> None:
        super().__init__()
        self.nodes = nodes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.graph = tracer.feature_extractor(model, sorted(set(nodes.values())))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.graph(x)
        return {layer: out[node] for layer, node in self.nodes.items()}


def _last_node_with_prefix(nodes: list[str], prefix: str) -> str | None:
    inside = [node for node in nodes if node.startswith(prefix + ".")]
    return inside[-1] if inside else None


def resized_transform(transform: dict[str, Any], crop: int) -> dict[str, Any]:
    """The same preprocessing at another crop size, keeping the resize/crop ratio."""
    scale = transform["resize"] / transform["crop"]
    return {**transform, "crop": int(crop), "resize": int(round(crop * scale))}


# --- cut points -----------------------------------------------------------------------------


def default_layer(model: nn.Module, nodes: list[str]) -> str:
    """The input of the final classifier, skipping dropout/identity nodes in between.

    The final classifier is the last Linear node; models without one (SqueezeNet) end in a
    1×1 convolution instead.
    """
    modules = dict(model.named_modules())
    kinds = [type(modules.get(node)) for node in nodes]
    final = None
    for wanted in (nn.Linear, nn.Conv2d):
        candidates = [
            i for i, kind in enumerate(kinds) if kind is not None and issubclass(kind, wanted)
        ]
        if candidates:
            final = candidates[-1]
            break
    if final is None or final == 0:
        return nodes[-1]
    index = final - 1
    while index > 0 and isinstance(modules.get(nodes[index]), nn.Dropout):
        index -= 1
    return nodes[index]


@dataclass(frozen=True)
class LayerInfo:
    """One cut point: its node name, per-image output shape and stored size."""

    name: str
    shape: tuple[int, ...]  # per image, batch dimension dropped
    dim: int  # vector length after --pool
    mb_per_1000: float  # float32 storage for 1,000 images

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dim": self.dim,
            "mb_per_1000": round(self.mb_per_1000, 3),
        }


def describe_layers(
    backbone: Backbone, pool: str = "avg", layers: list[str] | None = None
) -> list[LayerInfo]:
    """Every cut point with its output shape, found by one forward pass of a blank batch.

    Example: ``[l.name for l in describe_layers(load_backbone("resnet18", "none"))]``
    """
    from featx.models.pooling import pooled_shape

    names = layers if layers is not None else backbone.cut_points()
    crop = backbone.transform["crop"]
    batch = 2  # parameters (get_attr nodes) have no batch dimension: filter them out
    device = next(backbone.model.parameters()).device  # "meta": shapes without arithmetic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extractor = backbone.cut(list(names))
        with torch.inference_mode():
            outputs = extractor(torch.zeros(batch, 3, crop, crop, device=device))
    infos = []
    for name in names:
        value = outputs.get(name)
        if not isinstance(value, torch.Tensor) or value.ndim < 2 or value.shape[0] != batch:
            continue
        shape = tuple(int(v) for v in value.shape[1:])
        pooled = pooled_shape(shape, pool, strict=False)
        dim = 1
        for size in pooled:
            dim *= size
        infos.append(LayerInfo(name, shape, dim, dim * 4 * 1000 / 1e6))
    return infos
