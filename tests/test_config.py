"""Options are declared once: flags and TOML files fill the same dataclass, checked the same way."""

from __future__ import annotations

import pytest

from featx.config import ExtractConfig, HeadConfig, settings, too_many_failures
from featx.errors import UsageError


def toml(tmp_path, text: str, section: str = "extract"):
    path = tmp_path / "run.toml"
    path.write_text(f"[{section}]\n{text}\n")
    return path


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("shard = 3", "shard = 3: expected K/N or a list of two ints"),
        ("shard = [0, 1, 2]", "shard = [0, 1, 2]: expected K/N or a list of two ints"),
        ('shard = "5/3"', "--shard '5/3': expected K/N with 0 <= K < N"),
        ("background = 255", "background = 255: expected a list of 3 ints"),
        ('background = [1000, -5, "x"]', "expected a list of 3 ints"),
        ("background = [1000, -5, 0]", "background [1000, -5, 0]: expected three values"),
        ("layers = [1, 2]", "layers = [1, 2]: expected a list of strings"),
        ("max-image-pixels = -1", "--max-image-pixels must be at least 1"),
        ('batch-size = "32"', "batch-size = '32': expected an int"),
        ("batch-size = 0", "--batch-size must be at least 1"),
        ("compile = 1", "compile = 1: expected true or false"),
        ('poool = "avg"', "unknown option 'poool'"),
    ],
)
def test_a_bad_config_value_is_one_line_and_exit_2(tmp_path, cli, line, message):
    config = toml(tmp_path, line)
    result = cli("extract", tmp_path, "-o", tmp_path / "f.h5", "--config", config)
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--shard", "3"], "--shard '3': expected K/N"),
        (["--max-image-pixels", "-1"], "--max-image-pixels must be at least 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--pool", "bogus"], "--pool 'bogus': expected one of"),
    ],
)
def test_the_same_bad_value_as_a_flag_gets_the_same_kind_of_line(tmp_path, cli, flags, message):
    result = cli("extract", tmp_path, "-o", tmp_path / "f.h5", *flags)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_config_values_of_every_type_are_accepted(tmp_path):
    config = toml(
        tmp_path,
        'layers = ["layer2", "layer3"]\nshard = [1, 4]\nbackground = [0, 128, 255]\n'
        'max-failures = 10\nmax-image-pixels = 1000000\ncompile = true\nlayer = "layer4"',
    )
    options = settings(ExtractConfig, {}, config, "extract")
    assert options.layers == ("layer4",)  # the flag's name is a key too; the later one wins
    assert options.shard == (1, 4) and options.background == (0, 128, 255)
    assert options.max_failures == 10 and too_many_failures(options.max_failures, 11, 100)
    assert not too_many_failures(options.max_failures, 10, 100)
    assert options.max_image_pixels == 1_000_000 and options.compile is True


def test_flags_override_the_config_file_and_only_given_flags_count(tmp_path):
    config = toml(tmp_path, 'model = "resnet18"\nbatch-size = 8\npool = "max"')
    options = settings(
        ExtractConfig, {"batch_size": 4, "pool": None, "as_json": True}, config, "extract"
    )
    assert (options.model, options.batch_size, options.pool) == ("resnet18", 4, "max")


def test_a_string_layer_and_a_shard_string_are_read_as_users_mean_them(tmp_path):
    options = settings(ExtractConfig, {"layer": ["layer3"], "shard": "2/3"})
    assert options.layers == ("layer3",) and options.shard == (2, 3)
    config = toml(tmp_path, 'layers = "layer1"')
    assert settings(ExtractConfig, {}, config, "extract").layers == ("layer1",)


def test_head_options_come_from_their_own_table(tmp_path):
    config = toml(tmp_path, 'head = "mlp"\nhidden = 64\ndropout = 0', section="train-head")
    options = settings(HeadConfig, {"seed": 3}, config, "train-head")
    assert (options.head, options.hidden, options.dropout, options.seed) == ("mlp", 64, 0.0, 3)
    with pytest.raises(UsageError, match="hidden = 1.5: expected an int"):
        settings(HeadConfig, {}, toml(tmp_path, "hidden = 1.5", "train-head"), "train-head")
