"""State dicts from files: loaded safely, checked against the architecture, with provenance.

Loading never executes code: ``torch.load(..., weights_only=True)`` with no fallback, or
safetensors. Every model source handles ``--weights none`` and ``--weights FILE`` through
:func:`local_weights`, so the two behave alike for torchvision, timm and packaged models.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from featx.errors import UsageError
from featx.models._backbone import Provenance, provenance
from featx.safe_text import stored_name

STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module")
_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


RANDOM_SEED = 0  # --weights none is seeded, so a resumed random-init run computes the same features


def local_weights(
    spec: str,
    build: Callable[[dict[str, torch.Tensor] | None], torch.nn.Module],
    source: str,
    name: str,
) -> tuple[torch.nn.Module, Provenance] | None:
    """The two specs every model source handles alike: ``none`` (seeded random init) and a
    weight file (strict load). Returns (model, provenance) or None for other specs.

    ``build(state)`` makes the architecture; ``state`` lets it size itself (class count).
    """
    if spec.lower() == "none":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            return build(None), provenance(source, name, "none")
    if looks_like_file(spec):
        state = load_state_dict(spec)
        model = build(state)
        load_into(model, state, f"--weights {spec}")
        return model, provenance(source, name, "file", stored_name(spec), file_digest(spec))
    return None


def looks_like_file(spec: str) -> bool:
    """A --weights value that names a file rather than an enum name or 'none': it has a
    folder in it or a state-dict suffix (so ``DEFAULT`` never means a file called DEFAULT)."""
    return os.sep in spec or spec.endswith(STATE_DICT_SUFFIXES)


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, streamed: weight files are hundreds of MB."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a ``torch.save``d state dict, never unpickling code.

    Example: ``model.load_state_dict(load_state_dict("finetuned.pth"))``
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--weights {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as error:  # safetensors raises several unrelated types
            raise UsageError(
                f"--weights {path}: not a readable safetensors file ({error})"
            ) from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle.UnpicklingError, RuntimeError, EOFError, ...
        # torch's own message advises retrying with weights_only=False, i.e. running the
        # file's code: never pass that on. Name only what the file asked for.
        found = _UNSUPPORTED.search(str(error))
        detail = f"it needs {found.group(1)[:120]}" if found else type(error).__name__
        raise UsageError(
            f"--weights {path}: refused: not a plain state dict of tensors ({detail}); featx "
            "never runs code from a weights file: save model.state_dict() (or use safetensors)"
        ) from None
    for key in _NESTED_KEYS:  # training checkpoints often wrap the state dict
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise UsageError(f"--weights {path}: expected a state dict (name → tensor)")
    # DistributedDataParallel checkpoints prefix every key with "module."
    if loaded and all(key.startswith("module.") for key in loaded):
        loaded = {key[len("module.") :]: value for key, value in loaded.items()}
    return loaded


def load_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with a message that names what did not fit."""
    missing, unexpected = _key_mismatch(model, state_dict)
    if missing or unexpected:
        raise UsageError(
            f"{source} does not fit this architecture: {len(missing)} missing key(s) "
            f"(e.g. {', '.join(missing[:3]) or '-'}), {len(unexpected)} unexpected "
            f"(e.g. {', '.join(unexpected[:3]) or '-'})"
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise UsageError(f"{source} does not fit this architecture: {detail}") from None


def _key_mismatch(model: torch.nn.Module, state_dict: dict) -> tuple[list[str], list[str]]:
    expected = set(model.state_dict())
    given = set(state_dict)
    return sorted(expected - given), sorted(given - expected)
