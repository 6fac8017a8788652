"""The reader users import: a featx HDF5 file as arrays, labels, provenance and failures.

Plain h5py reads the file too (README: "The output file"); this is the convenient way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from featx.errors import UsageError
from featx.store import schema
from featx.store.assemble import text


def read_attrs(f: h5py.File) -> dict[str, Any]:
    return {key: schema.decode_attr(value) for key, value in f.attrs.items()}


# --- the reader -----------------------------------------------------------------------------


class FeatureFile:
    """Read a featx HDF5 file without loading it whole.

    Example::

        with FeatureFile("feats.h5") as f:
            x = f.features()[:100]        # an h5py dataset: slice what you need
            y, names = f.labels, f.class_names
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise UsageError(
                f"{self.path} is a folder, not a features file "
                f"(`featx extract {self.path} -o feats.h5` makes one)"
            )
        try:
            self.file = h5py.File(self.path, "r")
        except FileNotFoundError:
            raise UsageError(f"{self.path}: no such file") from None
        except PermissionError:
            raise UsageError(f"{self.path}: permission denied") from None
        except OSError:  # HDF5's own message is several lines of internals
            raise UsageError(f"{self.path}: not an HDF5 file (or a damaged one)") from None
        if schema.FEATURES not in self.file or schema.PATHS not in self.file:
            self.file.close()
            raise UsageError(f"{self.path}: not a featx features file (no features/ or paths)")
        self.attrs = read_attrs(self.file)

    def __enter__(self) -> FeatureFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()

    @property
    def layers(self) -> list[str]:
        return list(self.attrs.get("layers") or self.file[schema.FEATURES].keys())

    def layer(self, name: str | None = None) -> str:
        """The one layer asked for, or the only one; an error lists them when ambiguous."""
        layers = self.layers
        if name is None:
            if len(layers) == 1:
                return layers[0]
            raise UsageError(
                f"{self.path} has several layers ({', '.join(layers)}); pick one with --layer"
            )
        if name not in layers:
            raise UsageError(f"{self.path} has no layer {name!r} (it has {', '.join(layers)})")
        return name

    def features(self, layer: str | None = None) -> h5py.Dataset:
        """Each image's features, clean view (the weights' own preprocessing)."""
        return self.file[schema.FEATURES][self.layer(layer)]

    @property
    def augmented_views(self) -> int:
        """K of ``featx extract --augment K``: augmented views per image besides the clean one."""
        augment = self.attrs.get("augment")
        return int(augment["views"]) if isinstance(augment, dict) else 0

    def views(self, layer: str | None = None) -> h5py.Dataset | None:
        """``[n, K, ...]``: row i's K augmented views, or None in a file without them."""
        name = self.layer(layer)
        if not self.augmented_views or name not in self.file.get(schema.VIEWS, {}):
            return None
        return self.file[schema.VIEWS][name]

    def __len__(self) -> int:
        return int(self.file[schema.PATHS].shape[0])

    @property
    def paths(self) -> list[str]:
        return [text(p) for p in self.file[schema.PATHS][:]]

    def paths_between(self, start: int, stop: int) -> list[str]:
        """The paths of rows ``start`` to ``stop`` (one read, not the whole list)."""
        return [text(p) for p in self.file[schema.PATHS][start:stop]]

    @property
    def labels(self) -> np.ndarray:
        return self.file[schema.LABELS][:]

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs.get("class_names") or [])

    @property
    def failed(self) -> list[tuple[str, str]]:
        if "failed" not in self.file:
            return []
        paths = [text(p) for p in self.file[schema.FAILED_PATHS][:]]
        errors = [text(e) for e in self.file[schema.FAILED_ERRORS][:]]
        return list(zip(paths, errors, strict=True))

    def extraction(self, layer: str) -> dict[str, Any]:
        """What made ``layer``'s features (``schema.EXTRACTION_KEYS``): a head trained on them
        must see the same again."""
        return {
            key: layer if key == "layer" else self.attrs.get(key) for key in schema.EXTRACTION_KEYS
        }

    def summary(self) -> dict[str, Any]:
        layers = {name: list(self.file[schema.FEATURES][name].shape[1:]) for name in self.layers}
        labels = self.labels
        counts = {}
        for i, name in enumerate(self.class_names):
            counts[name] = int((labels == i).sum())
        return {
            **self.attrs,
            "path": str(self.path),
            "images": len(self),
            "views_per_image": 1 + self.augmented_views,
            "failed": len(self.failed),
            "layers": self.layers,
            "feature_shapes": layers,
            "dtype": str(self.features(self.layers[0]).dtype) if self.layers else None,
            "class_counts": counts,
            "unlabelled": int((labels == -1).sum()),
        }
