"""What an extraction can refuse before torch is imported: the work list, the output path, a
device this machine cannot have. The CLI calls :func:`preflight` before it imports
``featx.pipeline`` (usage errors in well under a second); ``pipeline.make_plan`` calls it too, so
the library refuses the same things in the same words.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from pathlib import Path

from featx.config import ExtractConfig
from featx.data.archives import ArchiveList, is_archive_source, list_archives
from featx.data.parquet_samples import check_parquet_shards
from featx.data.worklist import IMAGE_SUFFIXES, ImageList, scan_folder
from featx.errors import UsageError
from featx.inputs import read_class_names
from featx.store import schema
from featx.store.durable import check_output, refuse_existing


def preflight(
    source: str | os.PathLike[str] | ImageList | ArchiveList, out: Path, config: ExtractConfig
) -> ImageList | ArchiveList:
    """The work list of ``source`` (labelled by ``config.labels_csv``), once the output path and
    the named device have passed every check that needs no model. Archives (tars, parquet
    shards) are listed, not read.

    Example: ``preflight("photos/", Path("feats.h5"), ExtractConfig()).describe()``
    """
    check_output(out, overwrite=True)  # folder exists and is writable; an existing file: below
    if config.shard is not None:
        out = schema.part_path(out, *config.shard)
    refuse_existing(out, config.overwrite)
    check_device_exists(config.device)
    if isinstance(source, ArchiveList):
        return _named(source, config)
    if not isinstance(source, ImageList) and is_archive_source(os.fspath(source)):
        if config.labels_csv:
            raise UsageError(
                "--labels CSV applies to image folders and lists; archives take labels from "
                ".cls members or --label-from json:FIELD"
            )
        archives = list_archives(os.fspath(source), config.label_from)
        check_parquet_shards(archives)
        return _named(archives, config)
    if config.class_names_file:
        raise UsageError(
            "--class-names names the .cls numbers of archives; image folders take class names "
            "from their subfolders, lists from --labels"
        )
    images = source if isinstance(source, ImageList) else scan_folder(source)
    if config.labels_csv and images.labels_from != config.labels_csv:
        images = images.relabelled(config.labels_csv)
    if not len(images):
        raise UsageError(
            f"source {images.root}: no image files found "
            f"(looked for {', '.join(s[1:] for s in IMAGE_SUFFIXES)})"
        )
    return images


def _named(archives: ArchiveList, config: ExtractConfig) -> ArchiveList:
    """``archives`` with the class names ``--class-names`` reads, when it is given."""
    if not config.class_names_file or archives.class_names:
        return archives
    names = read_class_names(config.class_names_file)
    return dataclasses.replace(archives, class_names=names)


def check_device_exists(spec: str) -> None:
    """Refuse ``cuda`` / ``mps`` where the machine certainly has none, without importing torch.

    Only certain absences are refused: CUDA on Linux with no NVIDIA driver
    (``/proc/driver/nvidia``, ``nvidia-smi``), no ROCm (``/dev/kfd``) and no WSL GPU
    (``/dev/dxg``); CUDA on macOS; MPS anywhere but macOS. Everything else is left to
    ``runtime.device.pick_device``.
    """
    kind = spec.split(":")[0]
    if kind == "cuda" and not _may_have_cuda():
        raise UsageError(
            f"--device {spec}: CUDA is not available on this machine (no GPU driver found); "
            "use --device cpu or auto"
        )
    if kind == "mps" and sys.platform != "darwin":
        raise UsageError(
            f"--device {spec}: MPS is only on Apple silicon Macs; use --device cpu or auto"
        )


def _may_have_cuda() -> bool:
    if sys.platform == "darwin":
        return False
    if not sys.platform.startswith("linux"):
        return True  # Windows and others: torch decides
    markers = ("/proc/driver/nvidia", "/dev/kfd", "/dev/dxg", "/dev/nvidiactl")
    return any(os.path.exists(marker) for marker in markers) or bool(shutil.which("nvidia-smi"))
