"""``featx probe -o``: accuracy by layer depth as a PNG, one line per file, drawn with
matplotlib (the ``plot`` extra), error bars the folds' standard deviation."""

from __future__ import annotations

import os
from pathlib import Path

from featx.heads.probe import LayerProbe, ProbeResult


def probe_picture(
    result: ProbeResult, out: str | os.PathLike[str], overwrite: bool = False
) -> Path:
    """Accuracy by layer depth, one line per file, error bars: the folds' standard deviation.

    Example: ``probe_picture(probe(["a.h5", "b.h5"]), "probe.png")``
    """
    from featx.plot import pyplot
    from featx.store.durable import atomic_output

    plt = pyplot("featx probe -o")
    by_file: dict[str, list[LayerProbe]] = {}
    for p in result.probes:
        by_file.setdefault(p.file, []).append(p)
    known_depth = all(p.depth is not None for p in result.probes)
    figure, axes = plt.subplots(figsize=(8, 5), dpi=100)
    named: set[str] = set()
    for file, probes in by_file.items():
        if known_depth:
            probes.sort(key=lambda p: p.depth or 0.0)
        x = [p.depth if known_depth else i for i, p in enumerate(probes)]
        label = f"{Path(file).name} ({probes[0].model}, {probes[0].weights})"
        axes.errorbar(
            x,
            [p.accuracy for p in probes],
            yerr=[p.accuracy_std for p in probes],
            marker="o",
            capsize=3,
            label=label,
        )
        for xi, p in zip(x, probes, strict=True):
            if p.layer not in named:  # each layer name once: backbones often share them
                named.add(p.layer)
                axes.annotate(
                    p.layer, (xi, p.accuracy), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
    axes.set_xlabel(
        "layer depth (position among the model's cut points, 0 to 1)"
        if known_depth
        else "layer (in the file's order)"
    )
    axes.set_ylabel(f"accuracy ({result.config.folds}-fold cross-validation)")
    axes.set_title("linear probe by layer")
    axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    with atomic_output(out, overwrite) as temporary:
        figure.savefig(temporary, format="png")
    plt.close(figure)
    return Path(out)
