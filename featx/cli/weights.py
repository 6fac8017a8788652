"""``featx weights fetch`` and ``featx weights list``: the download caches, for offline nodes."""

from __future__ import annotations

from typing import Annotated

import typer

from featx.cli._app import app, emit, reports_errors, say, show
from featx.cli._options import Json, ModelName

weights_app = typer.Typer(
    help="Fetch pretrained weights for offline use; list the cache.\n\n"
    "Example: featx weights fetch resnet50 --weights IMAGENET1K_V2",
    no_args_is_help=True,
)
app.add_typer(weights_app, name="weights")


@weights_app.command("fetch")
@reports_errors
def weights_fetch(
    model: ModelName,
    weights: Annotated[str, typer.Option(help="DEFAULT or an enum name / timm tag.")] = "DEFAULT",
) -> None:
    """Download weights into the standard torch/timm cache and print where the file went.

    Example: featx weights fetch resnet50 --weights IMAGENET1K_V2
    """
    from featx.models import fetch_weights

    show(str(fetch_weights(model, weights)))


@weights_app.command("list")
@reports_errors
def weights_list(
    as_json: Json = False,
) -> None:
    """List cached weight files with their sizes.

    Example: featx weights list
    """
    from featx.models._hub_cache import cached_files

    files = cached_files()
    if as_json:
        emit([{"path": str(path), "bytes": size} for path, size in files])
        return
    for path, size in files:
        show(f"{size / 1e6:10.1f} MB  {path}")
    if not files:
        say("no cached weights (featx weights fetch MODEL downloads some)")
