"""Options: defaults from the tutorial, --help for each, one-line errors for bad values."""

import dataclasses

import pytest
from conftest import run_cli

from tl.config import Config, parse_args
from tl.errors import UserError


def test_defaults_are_the_tutorials():
    cfg = parse_args([])
    assert (cfg.mode, cfg.model, cfg.epochs, cfg.batch_size) == ("finetune", "resnet18", 25, 4)
    assert (cfg.lr, cfg.momentum, cfg.step_size, cfg.gamma) == (0.001, 0.9, 7, 0.1)
    assert cfg.data_dir == "data/hymenoptera_data" and cfg.weights == "DEFAULT"


def test_every_option_is_documented_in_help():
    proc = run_cli("train.py", "--help")
    assert proc.returncode == 0
    for name in Config.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in proc.stdout


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be positive"),
    (["--batch-size", "-4"], "--batch-size must be positive"),
    (["--lr", "0"], "--lr must be positive"),
    (["--mode", "fine"], "invalid choice: 'fine'"),
    (["--epochs", "two"], "invalid int value"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--resume"], "--resume needs --output-dir"),
    (["--resume", "--overwrite", "--output-dir", "x"], "contradict each other"),
    (["--feature-cache", "maybe"], "invalid choice: 'maybe'"),
    (["--train-size", "-1"], "--train-size must be positive, or 0"),
    (["--output-dir", ""], "--output-dir is empty"),
])
def test_bad_flags_are_user_errors(argv, message):
    with pytest.raises(UserError, match=message):
        parse_args(argv)


def test_bad_flag_from_the_command_line_is_one_line():
    proc = run_cli("train.py", "--mode", "fine")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: argument --mode")


def test_help_shows_each_default_once():
    out = run_cli("train.py", "--help").stdout
    blocks = {}
    for line in out.split("options:")[1].splitlines():
        if line.startswith("  -"):
            name = line.split()[0].rstrip(",")
            blocks[name] = ""
        if blocks:
            blocks[name] += " " + line.strip()
    for f in dataclasses.fields(Config):
        text = blocks["--" + f.name.replace("_", "-")]
        assert text.count("default") == (0 if f.default in (None, False) and "default" not in f.metadata["help"]
                                         else 1), text


def test_every_option_says_what_a_resume_does_with_it():
    """A new option must be classified: part of the run's identity or recipe (checked on --resume), or free."""
    from tl.config import IDENTITY, RECIPE, RESUME_FREE

    names = [f.name for f in dataclasses.fields(Config)]
    classified = [*IDENTITY, *RECIPE, *RESUME_FREE]
    assert sorted(classified) == sorted(names) and len(set(classified)) == len(classified)
