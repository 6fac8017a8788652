"""The standard download caches (torch hub for torchvision, the Hugging Face hub for timm), and
failing in seconds, with the ways out, when weights are neither cached nor reachable.

Downloads go to the standard caches, so a file fetched on a login node with
``featx weights fetch`` is found later on an offline compute node sharing the cache.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from featx.errors import OfflineError
from featx.models._state_dict import STATE_DICT_SUFFIXES


def torch_hub_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_hub_dir() -> Path:
    return Path(
        os.environ.get("HF_HUB_CACHE")
        or os.path.join(
            os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
        )
    )


def hub_checkpoint_path(url: str) -> Path:
    """Where torchvision's ``load_state_dict_from_url`` keeps (or will keep) this URL's file."""
    return torch_hub_dir() / os.path.basename(urlparse(url).path)


def download_to_hub(url: str, what: str, fetch_command: str) -> Path:
    """The cached file of ``url``, downloaded first if it is not there yet."""
    path = hub_checkpoint_path(url)
    if not path.is_file():
        ensure_reachable(url, what, torch_hub_dir(), fetch_command)
        torch.hub.load_state_dict_from_url(
            url, progress=True, map_location="cpu", weights_only=True
        )
    return path


def cached_hub_file(hub_id: str) -> str | None:
    """The weights of a Hugging Face hub repo in the local cache, if they are there."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            return found
    return None


def ensure_reachable(
    url: str, what: str, cache: Path, fetch_command: str, timeout: float = 3.0
) -> None:
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
            f"Ways out: run `{fetch_command}` on a machine with internet and the same cache "
            f"({cache}); or pass --weights FILE (a local .pth/.safetensors); or use an "
            f"offline-ready model such as --model efficientnet_lite0 (`featx models --offline`)"
        )


def cached_files() -> list[tuple[Path, int]]:
    """Every weight file in the torch hub and Hugging Face caches, with its size in bytes."""
    found = []
    for root in (torch_hub_dir(), hf_hub_dir()):
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.suffix in STATE_DICT_SUFFIXES:
                found.append((path, path.stat().st_size))
    return found
