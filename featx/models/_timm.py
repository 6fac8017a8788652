"""timm as a model source: ``--model timm:NAME`` (optional extra: ``featx[timm]``), with timm's
own preprocessing (``resolve_data_config``) and FX functions (which know timm's leaf modules)."""

from __future__ import annotations

import difflib
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from featx.errors import OfflineError, UsageError
from featx.models._backbone import Backbone, Tracer, provenance
from featx.models._hub_cache import (
    cached_hub_file,
    download_to_hub,
    ensure_reachable,
    hf_hub_dir,
    hub_checkpoint_path,
)
from featx.models._state_dict import local_weights

NAME = "timm"
PREFIX = "timm:"
OFFLINE_READY: tuple[str, ...] = ()


def require_timm() -> Any:
    try:
        import timm
    except ImportError:
        raise UsageError("timm models need timm: pip install 'featx[timm]'") from None
    return timm


TRACER = Tracer("timm.models")


def owns(name: str) -> bool:
    return name.startswith(PREFIX)


def list_models() -> list[str]:
    return [f"{PREFIX}{name}" for name in require_timm().list_models()]


def load(name: str, spec: str) -> Backbone:
    """A timm model (``timm:ARCH`` or ``timm:ARCH.TAG``) with its weights and preprocessing."""
    timm = require_timm()
    bare = name.removeprefix(PREFIX)
    architecture = bare.split(".")[0]
    known = timm.list_models()
    if architecture not in known:
        close = difflib.get_close_matches(architecture, known, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(PREFIX + c for c in close)}?" if close else ""
        raise UsageError(f"unknown timm model {bare!r}{hint} (`featx models --timm` lists them)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        local = local_weights(spec, lambda _: timm.create_model(bare, pretrained=False), NAME, name)
        if local is not None:
            model, weights = local
        else:
            full = _full_name(bare, spec)
            _ensure_pretrained_available(timm, full, name, spec)
            model = timm.create_model(full, pretrained=True)
            weights = provenance(NAME, name, str(model.pretrained_cfg.get("tag") or "DEFAULT"))
    return Backbone(
        name,
        model,
        weights,
        transform_of(model),
        TRACER,
        prefix_tokens=int(getattr(model, "num_prefix_tokens", 0) or 0),
    )


def fetch(name: str, spec: str) -> Path:
    """Download the weights into timm's cache (the Hugging Face hub, or torch hub for URLs)."""
    timm = require_timm()
    full = _full_name(name.removeprefix(PREFIX), spec)
    cfg = pretrained_cfg(timm, full)
    command = f"featx weights fetch {name} --weights {spec}"
    if cfg.hf_hub_id:
        if cached_hub_file(cfg.hf_hub_id) is None:
            ensure_reachable("https://huggingface.co", name, hf_hub_dir(), command)
            timm.create_model(full, pretrained=True)
        found = cached_hub_file(cfg.hf_hub_id)
        if found is None:
            raise OfflineError(f"{PREFIX}{full}: the download left no file in the cache")
        return Path(found)
    return download_to_hub(cfg.url, name, command)


def _full_name(bare: str, spec: str) -> str:
    return bare if spec.upper() == "DEFAULT" else f"{bare.split('.')[0]}.{spec}"


def transform_of(model: torch.nn.Module) -> dict[str, Any]:
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


def _ensure_pretrained_available(timm: Any, full: str, name: str, spec: str) -> None:
    """Cached on disk, or the hub reachable within seconds; else the OfflineError remedies."""
    cfg = pretrained_cfg(timm, full)
    command = f"featx weights fetch {name} --weights {spec}"
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        if cached_hub_file(hub_id) is None:
            ensure_reachable("https://huggingface.co", f"{PREFIX}{full}", hf_hub_dir(), command)
    elif getattr(cfg, "url", None):
        if not hub_checkpoint_path(cfg.url).is_file():
            ensure_reachable(
                cfg.url, f"{PREFIX}{full}", hub_checkpoint_path(cfg.url).parent, command
            )
