"""featx: cut a pretrained backbone at any layer and extract features of image folders to HDF5.

The library is the product; the CLI (``featx``) is one client of it::

    from featx import ExtractConfig, FeatureFile, extract
    extract("photos/", "feats.h5", ExtractConfig(model="resnet18", layers=("layer3",)))
    with FeatureFile("feats.h5") as f:
        x, y = f.features()[:], f.labels
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Heavy modules (torch, h5py) load on first use, so `featx --help` stays instant.
_LAZY = {
    "extract": "featx.pipeline",
    "ExtractResult": "featx.pipeline",
    "FeatureFile": "featx.store.reader",
    "load_backbone": "featx.models",
    "describe_layers": "featx.models",
    "list_models": "featx.models",
    "fetch_weights": "featx.models",
    "train_head": "featx.heads.train",
    "load_head": "featx.heads.model",
    "predict": "featx.heads.apply",
    "evaluate": "featx.heads.apply",
    "probe": "featx.heads.probe",
    "export": "featx.store.export",
}
from featx.config import ExtractConfig, HeadConfig, PredictConfig, ProbeConfig  # noqa: E402
from featx.errors import FeatxError  # noqa: E402

__all__ = [
    "ExtractConfig",
    "FeatxError",
    "HeadConfig",
    "PredictConfig",
    "ProbeConfig",
    "__version__",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'featx' has no attribute {name!r}")
