"""A classifier head and its file format (safetensors + JSON header).

A head file is a safetensors file holding the weights and the standardisation (tensors
``mean`` and ``std``, computed on the training rows only), with a JSON header in its metadata
(key ``featx_head``): class names, feature layer and dim, head config, training summary, and
the extraction (``schema.EXTRACTION_KEYS``: model, weights, layer, pool, transform) of the
features it was trained on. Nothing is pickled, so loading a head never runs code, and a head
refuses features of any other extraction (:meth:`Head.check`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from featx.errors import HeadMismatch, UsageError
from featx.limits import MAX_CLASSES
from featx.store import schema
from featx.store.durable import atomic_output
from featx.store.reader import FeatureFile

FORMAT = "featx-head"
FORMAT_VERSION = 2  # 2: the extraction's weights are a provenance dict
HEADER_KEY = "featx_head"


class HeadModule(nn.Module):
    """Raw feature vectors → standardised → logits; the standardisation travels with the head."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, dim: int, classes: int, kind: str, hidden: int, dropout: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        if kind == "linear":
            linear = nn.Linear(dim, classes)
            # sklearn's L-BFGS starts from zero too; any start reaches the same optimum.
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
            self.net = nn.Sequential(linear)
        else:
            self.net = nn.Sequential(
                nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, classes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


@dataclass
class Head:
    """A trained head: its module and its header. ``load_head`` makes one from a file.

    Example: ``probabilities = load_head("cats.head").probabilities(features)``
    """

    module: HeadModule
    header: dict[str, Any]
    path: Path | None = None

    @property
    def class_names(self) -> list[str]:
        return list(self.header["class_names"])

    @property
    def layer(self) -> str:
        return str(self.header["layer"])

    @property
    def dim(self) -> int:
        return int(self.header["dim"])

    @property
    def extraction(self) -> dict[str, Any]:
        return dict(self.header["extraction"])

    def check(self, features: FeatureFile) -> str:
        """The layer of ``features`` this head applies to, or HeadMismatch when those features
        come from another extraction (model, weights, layer, pool or transform)."""
        check_same_extraction(
            self.extraction,
            features,
            self.layer,
            made_for=f"head {self.path or ''}".strip(),
            remedy="extract with the head's settings (featx predict IMAGE_FOLDER --head does)",
        )
        row = features.features(self.layer).shape[1:]
        if int(np.prod(row, dtype=np.int64)) != self.dim:
            raise HeadMismatch(f"{features.path}: rows of {row} do not make {self.dim} features")
        return self.layer

    @torch.no_grad()
    def probabilities(self, x: np.ndarray | torch.Tensor, device: str = "cpu") -> np.ndarray:
        """Class probabilities ``[n, classes]`` (float32) for raw feature rows ``[n, dim]``."""
        module = self.module.to(device).eval()
        rows = torch.as_tensor(x, dtype=torch.float32).reshape(len(x), -1).to(device)
        return torch.softmax(module(rows), dim=1).cpu().numpy()

    def save(self, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write the head (temporary name, then rename). Example: ``head.save("cats.head")``"""
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        with atomic_output(path, overwrite) as temporary:
            save_file(tensors, str(temporary), metadata={HEADER_KEY: json.dumps(self.header)})
        return Path(path)


def load_head(path: str | os.PathLike[str]) -> Head:
    """Read a head file written by ``train_head``; never unpickles anything.

    The header is checked (fields, types, ranges) and the tensors' recorded shapes are matched
    against it before any tensor is read or allocated, so a malformed or hostile file is one
    UsageError, never a traceback or a huge allocation.

    Example: ``head = load_head("cats.head"); head.class_names``
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"head {path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = _header_of(f.metadata() or {}, path)
            shapes = expected_shapes(header)
            found = {key: _kind(f.get_slice(key)) for key in f.keys()}  # noqa: SIM118
            if found != {key: f"F32 {shape}" for key, shape in shapes.items()}:
                raise UsageError(
                    f"head {path}: its tensors do not fit its header (expected float32 "
                    f"{_shapes_text(shapes)}, found {_shapes_text(found)})"
                )
            tensors = {key: f.get_tensor(key) for key in shapes}
    except UsageError:
        raise
    except Exception as error:  # safetensors raises several unrelated types
        raise UsageError(f"head {path}: not a safetensors file ({error})") from None
    kind = header["head"]
    module = HeadModule(
        header["dim"], len(header["class_names"]), kind["kind"], kind.get("hidden") or 1, 0.0
    )
    module.load_state_dict(tensors)
    return Head(module.eval(), header, path)


# Far above any real head, far below what would exhaust memory: a hostile header is refused
# before anything is allocated from it.
MAX_DIM = 1 << 24
MAX_HIDDEN = 1 << 16
MAX_NAME = 1000


def _header_of(metadata: dict[str, str], path: Path) -> dict[str, Any]:
    """The checked header of a head file, or UsageError naming the first thing wrong."""
    try:
        header = json.loads(metadata[HEADER_KEY])
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise KeyError(HEADER_KEY)
    except (KeyError, TypeError, ValueError, RecursionError):
        raise UsageError(f"head {path}: a safetensors file, but not a featx head") from None
    if header.get("version") != FORMAT_VERSION or type(header.get("version")) is not int:
        raise UsageError(
            f"head {path}: head format {str(header.get('version'))[:20]!r}, this featx reads "
            f"format {FORMAT_VERSION}: train the head again with this featx"
        )
    problem = header_problem(header)
    if problem:
        raise UsageError(f"head {path}: malformed header: {problem}")
    return header


def header_problem(header: dict[str, Any]) -> str:
    """What is wrong with a head header (types and ranges), or ""."""
    for check in _HEADER_CHECKS:
        problem = check(header)
        if problem:
            return problem
    return ""


def _class_names_problem(header: dict[str, Any]) -> str:
    names = header.get("class_names")
    if not isinstance(names, list) or not 1 <= len(names) <= MAX_CLASSES:
        return f"class_names must be a list of 1 to {MAX_CLASSES} names"
    if not all(_is_name(name) for name in names):
        return f"class_names must be strings of at most {MAX_NAME} characters"
    return ""


def _dim_problem(header: dict[str, Any]) -> str:
    if _is_int(header.get("dim"), 1, MAX_DIM):
        return ""
    return f"dim must be an integer from 1 to {MAX_DIM}"


def _head_problem(header: dict[str, Any]) -> str:
    from featx.config import HEADS

    head = header.get("head")
    if not isinstance(head, dict) or head.get("kind") not in HEADS:
        return f"head.kind must be one of {', '.join(HEADS)}"
    if head["kind"] == "mlp" and not _is_int(head.get("hidden"), 1, MAX_HIDDEN):
        return f"head.hidden must be an integer from 1 to {MAX_HIDDEN}"
    return ""


def _extraction_problem(header: dict[str, Any]) -> str:
    extraction = header.get("extraction")
    if not isinstance(extraction, dict):
        return "extraction must be a table"
    missing = [key for key in ("model", "layer", "pool") if not _is_name(extraction.get(key))]
    return f"extraction.{missing[0]} must be a string" if missing else ""


def _layer_problem(header: dict[str, Any]) -> str:
    return "" if _is_name(header.get("layer")) else "layer must be a string"


def _weights_problem(header: dict[str, Any]) -> str:
    if isinstance(header["extraction"].get("weights"), dict):
        return ""
    return "extraction.weights must be a table"


def _transform_problem(header: dict[str, Any]) -> str:
    from featx.config import MAX_IMAGE_SIZE

    transform = header["extraction"].get("transform", {})
    if not isinstance(transform, dict):
        return "extraction.transform must be a table"
    for key in ("crop", "resize"):
        if key in transform and not _is_int(transform[key], 1, MAX_IMAGE_SIZE):
            return f"extraction.transform.{key} must be an integer from 1 to {MAX_IMAGE_SIZE}"
    return ""


# In order, the first problem found is the one named: a check may rely on those before it
# (the weights and transform checks on extraction being a table).
_HEADER_CHECKS = (
    _class_names_problem,
    _dim_problem,
    _head_problem,
    _extraction_problem,
    _layer_problem,
    _weights_problem,
    _transform_problem,
)


def expected_shapes(header: dict[str, Any]) -> dict[str, list[int]]:
    """The tensors a head with this (checked) header holds, and their shapes."""
    dim, classes = header["dim"], len(header["class_names"])
    shapes = {"mean": [dim], "std": [dim]}
    if header["head"]["kind"] == "linear":
        return {**shapes, "net.0.weight": [classes, dim], "net.0.bias": [classes]}
    hidden = header["head"]["hidden"]
    return {
        **shapes,
        "net.0.weight": [hidden, dim],
        "net.0.bias": [hidden],
        "net.3.weight": [classes, hidden],
        "net.3.bias": [classes],
    }


def _is_int(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= MAX_NAME


def _kind(tensor: Any) -> str:
    return f"{tensor.get_dtype()} {list(tensor.get_shape())}"


def _shapes_text(shapes: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in sorted(shapes.items())[:6])[:300] or "none"


# --- checks -----------------------------------------------------------------------------------


def require_labels(data: FeatureFile, labels: np.ndarray, command: str) -> None:
    """UsageError naming an example when any row is unlabelled (-1), or there are no rows."""
    unlabelled = np.flatnonzero(labels < 0)
    if len(unlabelled):
        first = int(unlabelled[0])
        (example,) = data.paths_between(first, first + 1)
        raise UsageError(
            f"{data.path}: {len(unlabelled)} of {len(labels)} rows are unlabelled (label -1, "
            f"e.g. {example}); {command} needs every image in a class folder"
        )
    if not len(labels):
        raise UsageError(f"{data.path}: no rows")


def label_map(data: FeatureFile, class_names: list[str]) -> np.ndarray:
    """Index array turning ``data``'s labels into indices of ``class_names``, matched by name
    (a test set may hold fewer classes, or list them in another order)."""
    own = data.class_names or [str(i) for i in range(int(data.labels.max(initial=-1)) + 1)]
    unknown = [name for name in own if name not in class_names]
    if unknown:
        raise UsageError(
            f"{data.path} has classes the head does not know: {', '.join(unknown[:5])} "
            f"(it knows {', '.join(class_names[:10])})"
        )
    return np.asarray([class_names.index(name) for name in own], dtype=np.int64)


def check_same_extraction(
    expected: dict[str, Any], features: FeatureFile, layer: str, made_for: str, remedy: str
) -> None:
    """HeadMismatch unless ``features`` holds ``layer`` made exactly as ``expected`` records;
    ``made_for`` names what expects it ("head cats.head"), ``remedy`` what to do instead."""
    if layer not in features.layers:
        raise HeadMismatch(
            f"{features.path} has no layer {layer!r} (it has {', '.join(features.layers)}); "
            f"{made_for} expects {_describe({**expected, 'layer': layer})}"
        )
    changes = schema.differences(expected, features.extraction(layer))
    if changes:
        raise HeadMismatch(
            f"{features.path} holds other features than {made_for} expects "
            f"({'; '.join(changes)}); {remedy}"
        )


def _describe(extraction: dict[str, Any]) -> str:
    weights = extraction.get("weights")
    if isinstance(weights, dict):
        weights = weights.get("file") or weights.get("weights")
    return (
        f"{extraction.get('model')} {extraction.get('layer')} features "
        f"(weights {weights}, pool {extraction.get('pool')})"
    )
