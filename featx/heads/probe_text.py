"""``featx probe``'s tables on stderr: every (file, layer), best first, and the learning curve.

Example: ``print(probe_table(result)); print(curve_table(result))``
"""

from __future__ import annotations

from pathlib import Path

from featx.heads.learning_curve import curve_protocols
from featx.heads.probe import LayerProbe, ProbeResult


def probe_table(result: ProbeResult) -> str:
    """The plain-text table, best first: one line per (file, layer). A ``*`` after C: some fold
    chose it at (or beyond) an edge of the grid; ``vs best``: tied (within one standard error
    of the paired fold differences) or worse."""
    names = [f"{Path(p.file).name} ({p.model}, {p.weights})" for p in result.probes]
    width = max(len("file (model, weights)"), *(len(n) for n in names))
    layer_width = max(len("layer"), *(len(p.layer) for p in result.probes))
    views = any(p.accuracy_with_views is not None for p in result.probes)
    lines = [
        f"{'file (model, weights)':<{width}}  {'layer':<{layer_width}}     dim  "
        "accuracy (mean ± std)  "
        + ("with views (mean ± std)  " if views else "")
        + "balanced acc        C  knn (mean ± std)  vs best  fit s"
    ]
    for index, (name, p) in enumerate(zip(names, result.probes, strict=True)):
        with_views = _spread(p.accuracy_with_views, p.accuracy_with_views_std)
        lines.append(
            f"{name:<{width}}  {p.layer:<{layer_width}}  {p.dim:6d}  "
            f"{_spread(p.accuracy, p.accuracy_std):>15}        "
            + (f"{with_views:>15}          " if views else "")
            + f"{_cell(p.balanced_accuracy):>12}  "
            f"{_c_cell(p):>7}  {_spread(p.knn_accuracy, p.knn_accuracy_std):>16}  "
            f"{_versus(index, p):>7}  {p.fit_seconds:5.1f}"
        )
    lines.append(_footer(result))
    if views:
        lines.append(
            "with views: the linear probe trained on every view (clean + augmented) of the "
            "training images, its C chosen again; both scored on held-out images' clean views"
        )
    return "\n".join(lines)


def curve_table(result: ProbeResult) -> str:
    """The learning curve: one line per (file, layer, protocol), accuracy mean ± std over the
    draws at each N labelled rows per class; empty without ``--per-class``."""
    config = result.config
    if not config.per_class:
        return ""
    names = [f"{Path(p.file).name} {p.layer}" for p in result.probes]
    width = max(len("file layer"), *(len(n) for n in names))
    header = "".join(f"  {f'{n} per class':>15}" for n in config.per_class)
    protocols = [curve_protocols(p.learning_curve) for p in result.probes]
    column = max(len("protocol"), *(len(name) for names in protocols for name in names))
    lines = [f"{'file layer':<{width}}  {'protocol':<{column}}{header}"]
    for name, p, held in zip(names, result.probes, protocols, strict=True):
        for protocol in held:
            points = {q.per_class: q for q in p.learning_curve if q.protocol == protocol}
            cells = "".join(
                f"  {_spread(points[n].accuracy, points[n].accuracy_std):>15}"
                for n in config.per_class
            )
            lines.append(f"{name:<{width}}  {protocol:<{column}}{cells}")
    lines.append(
        f"learning curve: {len(result.probes[0].learning_curve[0].draw_accuracy)} seeded, "
        "stratified draws of N rows per class at each N, each scored on every other row"
    )
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _spread(mean: float | None, std: float | None) -> str:
    return "-" if mean is None or std is None else f"{mean:.3f} ± {std:.3f}"


def _c_cell(p: LayerProbe) -> str:
    return "-" if p.c is None else f"{p.c:g}" + ("*" if p.c_at_grid_edge else " ")


def _versus(index: int, p: LayerProbe) -> str:
    return "best" if index == 0 else "tied" if p.tied_with_best else "worse"


def _footer(result: ProbeResult) -> str:
    config = result.config
    lines = [f"{config.folds}-fold stratified cross-validation (seed {config.seed})"]
    if "linear" in config.protocol:
        lines[0] += (
            f"; C from {', '.join(f'{c:g}' for c in config.c_grid)} by {config.inner_folds}-fold "
            "cross-validation inside each training fold (* at an edge: widened by a decade, "
            "at most 3 times, while the edge was best)"
        )
    if "knn" in config.protocol:
        lines.append(
            f"knn: L2-normalised rows, cosine similarity, the {config.knn_k} nearest training "
            f"rows vote with weight exp(similarity / {config.knn_temperature:g})"
        )
    lines.append(
        "vs best: tied when the mean paired fold difference to the best is within one "
        "standard error of those differences"
    )
    return "\n".join(lines)
