"""Each option is declared once, on its config field: the CLI's flag, help and shown default come
from there, "auto" defaults are named rules the help describes and the code applies, and a TOML
file fills the same dataclass as the flags."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import click
import pytest
import torch
import typer.main

from featx import defaults
from featx.cli import app
from featx.config import ExtractConfig, HeadConfig, PredictConfig, ProbeConfig, settings
from featx.heads.model import load_head
from featx.options import declared, options_of
from featx.runtime.device import Feed, feed
from tests.test_head import blobs, write_features

COMMANDS = {
    "extract": ExtractConfig,
    "bench": ExtractConfig,
    "layers": ExtractConfig,
    "train-head": HeadConfig,
    "predict": PredictConfig,
    "evaluate": PredictConfig,
    "probe": ProbeConfig,
}


def click_options(command: str) -> dict[str, Any]:
    """The options of ``command`` by their first flag, as Typer builds them."""
    group = typer.main.get_command(app)
    found = group.get_command(click.Context(group), command)
    return {p.opts[0]: p for p in found.params if p.param_type_name == "option"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_that_fills_a_field_shows_that_fields_help_and_default(command):
    config = COMMANDS[command]
    fields = {spec.flag: spec for spec in options_of(config).values()}
    shown = click_options(command)
    assert set(fields) & set(shown)
    for flag, option in shown.items():
        spec = fields.get(flag)
        if spec is None:
            continue  # --output, --config, --json: not options of the config
        assert option.help == spec.help, (command, flag)
        # Unset is None (so a config file's value stands) or the dataclass default itself.
        assert option.default in (None, spec.default), (command, flag)


def test_train_head_takes_every_head_option_like_other_commands_take_theirs():
    shown = click_options("train-head")
    assert {spec.flag for spec in options_of(HeadConfig).values()} <= set(shown)
    extract = click_options("extract")
    assert {spec.flag for spec in options_of(ExtractConfig).values()} <= set(extract)


def test_a_shown_default_is_the_dataclass_default():
    spec = declared(ExtractConfig, "max_file_bytes")
    assert spec.flag == "--max-file-bytes" and spec.help.endswith("[default: 1GB]")
    assert ExtractConfig().max_file_bytes == "1GB"
    assert declared(HeadConfig, "hidden").help.endswith(f"[default: {HeadConfig().hidden}]")
    assert declared(ProbeConfig, "c_grid").help.endswith("[default: 0.01, 0.1, 1, 10]")


AUTO_RULES = [
    (ExtractConfig, "batch_size", defaults.batch_size_for, {"cuda": "256", "cpu": "32"}),
    (ExtractConfig, "precision", defaults.precision_for, {"cuda": "fp16", "cpu": "fp32"}),
    (HeadConfig, "optimizer", defaults.solver_for, {"linear": "lbfgs", "mlp": "adamw"}),
    (HeadConfig, "lr", defaults.learning_rate_for, {"lbfgs": "1.0", "adamw": "1e-3"}),
]


@pytest.mark.parametrize(("config", "name", "rule", "cases"), AUTO_RULES)
def test_an_auto_default_is_a_rule_the_help_describes_and_never_restates(config, name, rule, cases):
    spec = declared(config, name)
    assert defaults.describe(rule) in spec.help
    for given, said in cases.items():
        result = rule(given)
        assert said in defaults.describe(rule)  # the description tells the truth
        if isinstance(result, (int, float)):
            assert result == float(said)
            assert said not in spec.text  # and only the rule's docstring says it
        else:
            assert result == said


def test_the_device_feed_applies_the_rules_the_help_describes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert feed(None, None, cpu, cores=8).batch_size == defaults.batch_size_for("cpu") == 32
    assert feed(None, None, cuda, cores=64, ranks=8) == Feed(256, 7, 2)
    assert feed(None, None, cpu, cores=8).workers == defaults.workers_for("cpu", 8) == 4
    assert HeadConfig(head="mlp").learning_rate == defaults.learning_rate_for("adamw")
    assert HeadConfig().decay(50) == defaults.weight_decay_for(50) == 0.02


def write_toml(tmp_path, section: str, text: str):
    path = tmp_path / f"{section}.toml"
    path.write_text(f"[{section}]\n{text}\n")
    return path


def test_a_toml_file_with_the_cli_option_names_gives_the_same_config_as_the_flags(tmp_path):
    config = write_toml(
        tmp_path,
        "extract",
        'model = "resnet18"\nlayer = ["layer3", "flatten"]\npool = "max"\nimage-size = 64\n'
        'labels = "labels.csv"\nmax-file-bytes = "2MB"\nbatch-size = 4\nworkers = 0\n'
        'shard = "1/4"\nmax-failures = "5%"\ncompile = true\nprogress = false\nquiet = true',
    )
    flags = {
        "model": "resnet18",
        "layers": ["layer3", "flatten"],
        "pool": "max",
        "image_size": 64,
        "labels_csv": tmp_path / "labels.csv",
        "max_file_bytes": "2MB",
        "batch_size": 4,
        "workers": 0,
        "shard": "1/4",
        "max_failures": "5%",
        "compile": True,
        "progress": False,
        "quiet": True,
    }
    from_file = settings(ExtractConfig, {}, config, "extract")
    from_flags = settings(ExtractConfig, flags)
    assert dataclasses.replace(from_file, labels_csv=None) == dataclasses.replace(
        from_flags, labels_csv=None
    )
    assert from_file.layers == ("layer3", "flatten") and from_file.shard == (1, 4)
    assert from_file.max_file_bytes == "2MB" and from_file.compile is True


def test_a_toml_file_keeps_the_field_names_too(tmp_path):
    config = write_toml(
        tmp_path, "extract", 'layers = ["layer2"]\nlabels_csv = "l.csv"\nmax_file_bytes = 2048'
    )
    options = settings(ExtractConfig, {}, config, "extract")
    assert (options.layers, options.labels_csv, options.max_file_bytes) == (
        ("layer2",),
        "l.csv",
        2048,
    )


def test_train_head_options_from_toml_are_the_flags_options(tmp_path):
    text = (
        'head = "mlp"\nhidden = 16\ndropout = 0.1\nval-split = 0.25\noptimizer = "adamw"\n'
        "epochs = 3\nlr = 0.01\nweight-decay = 0\nbatch-size = 64\npatience = 2\n"
        'class-weight = "balanced"\nseed = 7\ndevice = "cpu"\nmemory-budget = "64MB"'
    )
    from_file = settings(HeadConfig, {}, write_toml(tmp_path, "train-head", text), "train-head")
    from_flags = settings(
        HeadConfig,
        {
            "head": "mlp",
            "hidden": 16,
            "dropout": 0.1,
            "val_split": 0.25,
            "optimizer": "adamw",
            "epochs": 3,
            "lr": 0.01,
            "weight_decay": 0.0,
            "batch_size": 64,
            "patience": 2,
            "class_weight": "balanced",
            "seed": 7,
            "device": "cpu",
            "memory_budget": "64MB",
        },
    )
    assert from_file == from_flags and from_file.weight_decay == 0.0


def test_train_head_reads_its_options_from_toml_and_flags_override_them(tmp_path, cli):
    x, y = blobs(120, 8, 3, spread=1.0)
    features = write_features(tmp_path / "blobs.h5", x, y, list("abc"))
    config = write_toml(
        tmp_path, "train-head", 'optimizer = "adamw"\nlr = 0.05\nepochs = 2\nseed = 3\nhead = "mlp"'
    )
    out = tmp_path / "t.head"
    result = cli("train-head", features, "-o", out, "--config", config, "--seed", 4, "--json")
    assert result.exit_code == 0, result.stderr
    trained = load_head(out).header["training"]["config"]
    assert (trained["optimizer"], trained["lr"], trained["epochs"]) == ("adamw", 0.05, 2)
    assert trained["seed"] == 4 and json.loads(result.stdout)["epochs_run"] <= 2


def test_a_bad_train_head_value_in_toml_is_one_line_before_any_training(tmp_path, cli):
    config = write_toml(tmp_path, "train-head", 'lr = "fast"')
    result = cli("train-head", tmp_path / "none.h5", "-o", tmp_path / "t.head", "--config", config)
    assert result.exit_code == 2
    assert "lr = 'fast': expected a number" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
