"""``featx probe -o``: accuracy by layer depth as a PNG, one line per file (kNN dashed), drawn
with matplotlib (the ``plot`` extra), error bars the folds' standard deviation clipped to [0, 1];
with ``--per-class``, the learning curve of each file's best layer beside it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from featx.heads.learning_curve import VIEWS_PROTOCOL, curve_protocols
from featx.heads.probe import LayerProbe, ProbeResult


def probe_picture(
    result: ProbeResult, out: str | os.PathLike[str], overwrite: bool = False
) -> Path:
    """Accuracy by layer depth, one line per file and protocol, error bars: the folds' standard
    deviation inside [0, 1]; the learning curve in a second panel when there is one.

    Example: ``probe_picture(probe(["a.h5", "b.h5"]), "probe.png")``
    """
    from featx.plot import pyplot, wrapped
    from featx.store.durable import atomic_output

    plt = pyplot("featx probe -o")
    curve = bool(result.config.per_class)
    figure, panels = plt.subplots(1, 2 if curve else 1, figsize=(14 if curve else 8, 5), dpi=100)
    axes = panels[0] if curve else panels
    _by_layer(axes, result)
    axes.set_title(wrapped("probe accuracy by layer (knn dashed)", 60 if curve else 70))
    if curve:
        _learning_curve(panels[1], result)
    figure.tight_layout()
    with atomic_output(out, overwrite) as temporary:
        figure.savefig(temporary, format="png")
    plt.close(figure)
    return Path(out)


def error_bars(means: list[float], stds: list[float]) -> list[list[float]]:
    """(below, above) error bars of ``mean ± std`` clipped to [0, 1], as matplotlib takes them."""
    below = [min(s, m) for m, s in zip(means, stds, strict=True)]
    above = [min(s, 1.0 - m) for m, s in zip(means, stds, strict=True)]
    return [below, above]


def _by_layer(axes: Any, result: ProbeResult) -> None:
    by_file: dict[str, list[LayerProbe]] = {}
    for p in result.probes:
        by_file.setdefault(p.file, []).append(p)
    known_depth = all(p.depth is not None for p in result.probes)
    named: set[str] = set()
    for file, probes in by_file.items():
        if known_depth:
            probes.sort(key=lambda p: p.depth or 0.0)
        x = [p.depth if known_depth else i for i, p in enumerate(probes)]
        label = f"{Path(file).name} ({probes[0].model}, {probes[0].weights})"
        colour = None
        for protocol, style in (("linear", "-"), ("knn", "--")):
            if protocol not in result.config.protocol:
                continue
            means, stds = _scores(probes, protocol)
            line = axes.errorbar(
                x,
                means,
                yerr=error_bars(means, stds),
                marker="o",
                capsize=3,
                linestyle=style,
                color=colour,
                label=label if protocol == "knn" and colour else f"{label} {protocol}",
            )
            colour = line.lines[0].get_color()  # kNN in its file's colour
        for xi, p in zip(x, probes, strict=True):
            if p.layer not in named:  # each layer name once: backbones often share them
                named.add(p.layer)
                axes.annotate(
                    p.layer, (xi, p.score), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
    axes.set_xlabel(
        "layer depth (position among the model's cut points, 0 to 1)"
        if known_depth
        else "layer (in the file's order)"
    )
    axes.set_ylabel(f"accuracy ({result.config.folds}-fold cross-validation)")
    axes.legend(loc="best", fontsize="small")


def _scores(probes: list[LayerProbe], protocol: str) -> tuple[list[float], list[float]]:
    if protocol == "linear":
        return [p.accuracy or 0.0 for p in probes], [p.accuracy_std or 0.0 for p in probes]
    return [p.knn_accuracy or 0.0 for p in probes], [p.knn_accuracy_std or 0.0 for p in probes]


def _learning_curve(axes: Any, result: ProbeResult) -> None:
    """Accuracy against labelled rows per class (log scale) for each file's best layer."""
    from featx.plot import wrapped

    best: dict[str, LayerProbe] = {}
    for p in result.probes:  # best first: the first row of each file is its best layer
        best.setdefault(p.file, p)
    for p in best.values():
        for protocol in curve_protocols(p.learning_curve):
            points = [q for q in p.learning_curve if q.protocol == protocol]
            means = [q.accuracy for q in points]
            axes.errorbar(
                [q.per_class for q in points],
                means,
                yerr=error_bars(means, [q.accuracy_std for q in points]),
                marker="o",
                capsize=3,
                linestyle={"linear": "-", VIEWS_PROTOCOL: ":"}.get(protocol, "--"),
                label=f"{Path(p.file).name} {p.layer} {protocol}",
            )
    axes.set_xscale("log")
    axes.set_xlabel("labelled images per class (seeded draws; scored on the rest)")
    axes.set_ylabel("accuracy (mean ± std over draws)")
    axes.set_title(wrapped("learning curve of each file's best layer", 60))
    axes.legend(loc="best", fontsize="small")
