"""The package's shape: no import cycles, a light CLI, every torchvision classifier cut right."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from featx.models import load_backbone
from featx.store import schema

PACKAGE = Path(__file__).resolve().parents[1] / "featx"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """featx module → the featx modules it imports anywhere (in functions too: an import hidden
    in a function is still a cycle)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                # `from featx.store import schema` imports the module featx.store.schema
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def test_featx_has_no_import_cycle():
    graph = import_graph()
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append([*trail[trail.index(target) :], target])
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
    assert len(graph) > 30  # the walk saw the whole package


def test_the_cli_imports_neither_torch_nor_h5py():
    """`featx --help` and every usage error answer at once: heavy imports live in commands."""
    heavy = "('torch', 'h5py', 'numpy')"
    code = f"import sys, featx.cli; print([m for m in {heavy} if m in sys.modules])"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "[]"


def test_a_run_fingerprint_holds_exactly_the_schema_keys(photos, tmp_path):
    from featx import ExtractConfig, extract

    out = tmp_path / "f.h5"
    extract(photos, out, ExtractConfig(model="resnet18", weights="none", image_size=32, workers=0))
    from featx import FeatureFile

    with FeatureFile(out) as f:
        assert set(schema.FINGERPRINT_KEYS) - {"augment"} <= set(f.attrs)
        assert "augment" not in f.attrs  # only with --augment K > 0
        assert f.attrs["weights"] == {
            "source": "torchvision",
            "name": "resnet18",
            "weights": "none",
            "file": None,
            "sha256": None,
        }


def _classifier_input(model: nn.Module) -> int:
    """What the model's final classifier takes: the last Linear, or SqueezeNet's last conv."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1].in_features
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1].in_channels


CLASSIFIERS = sorted(torchvision.models.list_models(module=torchvision.models))
# One small model of most families runs in the fast lane (`-m "not slow"`); the whole zoo in CI.
FAST_LANE = {"alexnet", "convnext_tiny", "efficientnet_b0", "googlenet", "inception_v3"}
FAST_LANE |= {"mnasnet0_5", "mobilenet_v3_small", "regnet_x_400mf", "resnet18", "resnext50_32x4d"}
FAST_LANE |= {"shufflenet_v2_x0_5", "squeezenet1_0", "swin_t", "vgg11", "vit_b_16"}


@pytest.mark.parametrize(
    "name",
    [
        name if name in FAST_LANE else pytest.param(name, marks=pytest.mark.slow)
        for name in CLASSIFIERS
    ],
)
def test_every_torchvision_classifier_lists_layers_and_defaults_to_its_classifier_input(name, cli):
    """The model zoo sweep, cheap: `featx layers` builds the model on the meta device (shapes,
    no arithmetic). The default layer's pooled dim is what the classifier of torchvision's own
    build of the model consumes."""
    result = cli("layers", name, "--json")
    assert result.exit_code == 0, result.stderr
    listing = json.loads(result.stdout)
    dims = {layer["name"]: layer["dim"] for layer in listing["layers"]}
    assert dims[listing["default"]] == _classifier_input(torchvision_build(name))


def torchvision_build(name: str) -> nn.Module:
    """torchvision's own build of ``name`` on the meta device; where a constructor reads tensor
    values (RegNet), the one featx makes for `featx layers` (weights on meta, built on the CPU)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # googlenet's, inception's init notice
        try:
            with torch.device("meta"):
                return torchvision.models.get_model(name)
        except NotImplementedError:
            return load_backbone(name, "none", shapes_only=True).model


def test_shapes_only_backbones_have_no_weights():
    backbone = load_backbone("resnet18", "none", shapes_only=True)
    assert next(backbone.model.parameters()).device == torch.device("meta")
