"""timm as a second model source: ``--model timm:NAME`` (optional extra: ``featx[timm]``)."""

from __future__ import annotations

import difflib
import math
import warnings
from typing import Any

import torch

from featx import weights as weightfiles
from featx.backbone import Backbone
from featx.errors import UsageError


def require_timm() -> Any:
    try:
        import timm
    except ImportError:
        raise UsageError("timm models need timm: pip install 'featx[timm]'") from None
    return timm


def load(name: str, spec: str) -> Backbone:
    """A timm model with its weights and timm's own preprocessing."""
    timm = require_timm()
    architecture = name.split(".")[0]
    known = timm.list_models()
    if architecture not in known:
        close = difflib.get_close_matches(architecture, known, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise UsageError(f"unknown timm model {name!r}{hint} (`featx models --timm` lists them)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        local = weightfiles.local_weights(spec, lambda _: timm.create_model(name, pretrained=False))
        if local is not None:
            model, label = local
        else:
            full = name if spec.upper() == "DEFAULT" else f"{architecture}.{spec}"
            _ensure_pretrained_available(timm, full)
            model = timm.create_model(full, pretrained=True)
            label = (
                f"timm:{model.pretrained_cfg.get('architecture')}.{model.pretrained_cfg.get('tag')}"
            )
    return Backbone(
        f"timm:{name}",
        model,
        label,
        timm_transform(model),
        "timm",
        prefix_tokens=int(getattr(model, "num_prefix_tokens", 0) or 0),
    )


def timm_transform(model: torch.nn.Module) -> dict[str, Any]:
    """timm's eval preprocessing (resolve_data_config), in featx's transform dict."""
    from timm.data import resolve_data_config

    config = resolve_data_config(model=model)
    crop = int(config["input_size"][-1])
    if (
        config.get("crop_mode", "center") != "center"
        or config["input_size"][-1] != config["input_size"][-2]
    ):
        # featx resizes the shorter side and centre-crops a square; anything else would not be
        # the preprocessing timm's weights expect.
        raise UsageError(
            f"timm model preprocessing {config.get('crop_mode')!r} crop to "
            f"{config['input_size'][1:]} is not supported by featx (center only)"
        )
    return {
        "resize": int(math.floor(crop / config["crop_pct"])),
        "crop": crop,
        "mean": [float(v) for v in config["mean"]],
        "std": [float(v) for v in config["std"]],
        "interpolation": config["interpolation"],
        "antialias": True,
        "crop_mode": config.get("crop_mode", "center"),
        "from": "timm.data.resolve_data_config",
    }


def pretrained_cfg(timm: Any, name: str) -> Any:
    """timm's pretrained config for ``arch.tag``, or a one-line error."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # timm raises several types for an unknown tag
        cfg = None
    if cfg is None:
        raise UsageError(f"timm model {name!r} has no such pretrained tag")
    return cfg


def cached_hub_file(hub_id: str) -> str | None:
    """The weights of a Hugging Face hub repo in the local cache, if they are there."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            return found
    return None


def _ensure_pretrained_available(timm: Any, name: str) -> None:
    """Cached on disk, or the hub reachable within seconds; else the OfflineError remedies."""
    cfg = pretrained_cfg(timm, name)
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        if cached_hub_file(hub_id) is None:
            weightfiles.ensure_reachable("https://huggingface.co", f"timm:{name}")
    elif getattr(cfg, "url", None):
        if not weightfiles.hub_checkpoint_path(cfg.url).is_file():
            weightfiles.ensure_reachable(cfg.url, f"timm:{name}")
