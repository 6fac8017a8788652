"""torchvision as a model source: any classification name in ``torchvision.models.list_models()``,
weights from its weights enums (URL, ``transforms()`` and meta travel together there)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from featx.errors import UsageError
from featx.models._backbone import Backbone, Tracer, provenance, resized_transform
from featx.models._hub_cache import download_to_hub, ensure_reachable, hub_checkpoint_path
from featx.models._state_dict import local_weights

NAME = "torchvision"
OFFLINE_READY: tuple[str, ...] = ()  # every torchvision weight is a download


TRACER = Tracer("torchvision.models.feature_extraction")


def owns(name: str) -> bool:
    return name in list_models()


def list_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def load(name: str, spec: str) -> Backbone:
    """The named torchvision classifier with the weights ``spec`` names, and their transforms."""
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    with warnings.catch_warnings():
        # inception/googlenet warn about their init scheme when built without weights
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        local = local_weights(
            spec,
            lambda state: torchvision.models.get_model(
                name, weights=None, **(_num_classes(state, name) if state else {})
            ),
            NAME,
            name,
        )
        if local is not None:  # preprocessing still from the default entry: comparable features
            model, weights = local
            transform = transform_of(enum.DEFAULT)
            # ... at the size the architecture takes: vit_h_14 without its weights is 224 px,
            # its default (SWAG) weights 518 px.
            size = getattr(model, "image_size", None)
            if isinstance(size, int) and size != transform["crop"]:
                transform = resized_transform(transform, size)
            return Backbone(name, model, weights, transform, TRACER)
        entry = weights_entry(name, spec)
        if not hub_checkpoint_path(entry.url).is_file():
            ensure_reachable(
                entry.url,
                f"{name} {entry.name}",
                hub_checkpoint_path(entry.url).parent,
                f"featx weights fetch {name} --weights {entry.name}",
            )
        model = torchvision.models.get_model(name, weights=entry)
    return Backbone(name, model, provenance(NAME, name, entry.name), transform_of(entry), TRACER)


def fetch(name: str, spec: str) -> Path:
    """Download the weights into torch hub's cache (or find them there)."""
    entry = weights_entry(name, spec)
    return download_to_hub(
        entry.url, f"{name} {entry.name}", f"featx weights fetch {name} --weights {entry.name}"
    )


def weights_entry(name: str, spec: str) -> Any:
    """The member of ``name``'s weights enum that ``spec`` names (``DEFAULT`` resolved)."""
    import torchvision

    if name not in list_models():
        raise UsageError(f"unknown model {name!r} (`featx models` lists them)")
    enum = torchvision.models.get_model_weights(name)
    if spec.upper() == "DEFAULT":
        return enum.DEFAULT
    member = spec.split(".")[-1]  # accept 'ResNet50_Weights.IMAGENET1K_V2' too
    if member in enum.__members__:
        return enum[member]
    names = ["DEFAULT", *(m for m in enum.__members__ if m != "DEFAULT"), "none"]
    raise UsageError(
        f"--weights {spec!r}: {name} has weights {', '.join(names)}, or pass a file path"
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


def transform_of(entry: Any) -> dict[str, Any]:
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
