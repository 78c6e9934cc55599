"""Options: defaults from the tutorial, --help for each, one-line errors for bad values."""

import dataclasses
import json
import re

import pytest
from accelerate.state import AcceleratorState
from conftest import FAST, run_cli

from tl.core.config import RANGES, Config, parse_args
from tl.core.errors import UserError


def test_defaults_are_the_tutorials():
    cfg = parse_args([])
    assert (cfg.mode, cfg.model, cfg.epochs, cfg.batch_size) == ("finetune", "resnet18", 25, 4)
    assert (cfg.lr, cfg.momentum, cfg.step_size, cfg.gamma) == (0.001, 0.9, 7, 0.1)
    assert cfg.data_dir == "data/hymenoptera_data" and cfg.weights == "DEFAULT"


def test_every_numeric_option_has_its_range():
    """Config.validate checks each number against RANGES: a new numeric option needs its entry."""
    numeric = {f.name for f in dataclasses.fields(Config) if f.type in (int, float)}
    assert numeric == set(RANGES), sorted(numeric ^ set(RANGES))
    cfg = parse_args([])
    for name, allowed in RANGES.items():
        assert allowed.holds(getattr(cfg, name)), f"the default of --{name} is out of its own range"


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
    (["--patience", "-1"], "--patience must be 0"),
    (["--val-split", "1"], "--val-split must be a fraction"),
    (["--val-split", "-0.1"], "--val-split must be a fraction"),
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
    from tl.core.config import IDENTITY, RECIPE, RECIPE_EXTRAS, RESUME_FREE

    names = [f.name for f in dataclasses.fields(Config)]
    classified = [*IDENTITY, *RECIPE, *RECIPE_EXTRAS, *RESUME_FREE]
    assert sorted(classified) == sorted(names) and len(set(classified)) == len(classified)


# --config FILE: options from YAML or JSON, flags over them, one-line errors naming the key.

def test_config_file_in_yaml_or_json_and_flags_override_it(tmp_path):
    (tmp_path / "a.yaml").write_text("mode: feature-extract\nbatch-size: 8\nlr: 1e-3  # YAML 1.1: a string\n"
                                     "compile: true\ndata_zip: null\n")
    (tmp_path / "a.json").write_text('{"epochs": 3, "weight_decay": 0, "wandb_name": "x"}')
    cfg = parse_args(["--config", str(tmp_path / "a.yaml"), "--batch-size", "16"])
    assert (cfg.mode, cfg.batch_size, cfg.lr, cfg.compile, cfg.data_zip) == ("feature-extract", 16, 0.001, True, None)
    cfg = parse_args(["--epochs", "5", "--config", str(tmp_path / "a.json")])  # a flag wins wherever it stands
    assert (cfg.epochs, cfg.weight_decay, cfg.wandb_name) == (5, 0.0, "x") and isinstance(cfg.weight_decay, float)
    assert parse_args(["--config", str(tmp_path / "a.json")]).epochs == 3


@pytest.mark.parametrize("text, message", [
    ("lrr: 0.1\n", "unknown option 'lrr'; did you mean lr?"),
    ("epochs: two\n", "epochs must be a whole number, got 'two'"),
    ("epochs: 2.5\n", "epochs must be a whole number, got 2.5"),
    ("lr: fast\n", "lr must be a number, got 'fast'"),
    ("compile: 1\n", "compile must be true or false, got 1"),
    ("mode: fine\n", "mode must be one of finetune, feature-extract, lora, got 'fine'"),
    ("weights: null\n", "weights must be a string, got None"),
    ("resume: true\n", "resume: true is not taken from a file"),
    ("batch_size: 4\nbatch-size: 8\n", "batch_size is given twice"),
    ("- epochs\n", "holds a list, not a mapping"),
    ("epochs: [\n", "is not valid YAML or JSON"),
    ("epochs: 0\n", "--epochs must be positive"),  # the checks of the flags apply too
])
def test_bad_config_files_are_one_line_errors_naming_the_key(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=re.escape(message)) as e:
        parse_args(["--config", str(path)])
    assert "\n" not in str(e.value)


def test_bad_config_file_from_the_command_line_is_one_line(tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 2\nlrr: 0.1\n")
    proc = run_cli("train.py", "--config", str(tmp_path / "c.yaml"))
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: {tmp_path / 'c.yaml'}: unknown option 'lrr'; did you mean lr?")


def test_config_file_that_is_missing_or_bad_json(tmp_path):
    with pytest.raises(UserError, match="cannot read --config .*nope.yaml"):
        parse_args(["--config", str(tmp_path / "nope.yaml")])
    (tmp_path / "c.json").write_text('{"epochs": 1,}')
    with pytest.raises(UserError, match="c.json is not valid JSON"):
        parse_args(["--config", str(tmp_path / "c.json")])


def test_a_runs_config_json_trains_the_run_again(tmp_path, tiny_data, base_weights):
    """Run X is resumed once (its config.json then says resume: true); --config X/config.json --output-dir Y
    trains a new run with X's options, to X's metrics (timings aside), and records what reproduces it."""
    from tl.train.loop import train

    x, y = tmp_path / "X", tmp_path / "Y"
    argv = ["--mode", "feature-extract", "--data-dir", str(tiny_data), "--weights", str(base_weights), "--seed", "3",
            "--output-dir", str(x), "--lr", "0.01", *FAST]
    train(parse_args([*argv, "--epochs", "1"]))
    AcceleratorState._reset_state(reset_partial_state=True)
    cfg = parse_args([*argv, "--epochs", "2", "--resume"])
    train(cfg)
    recorded = json.loads((x / "config.json").read_text())
    assert recorded["resume"] is True and recorded["output_dir"] == str(x)
    # A run's config.json gives its options back; where and whether to resume come from the command.
    assert parse_args(["--config", str(x / "config.json")]) == dataclasses.replace(cfg, resume=False, output_dir=None)
    proc = run_cli("train.py", "--config", str(x / "config.json"), "--output-dir", str(y))
    assert proc.returncode == 0, proc.stderr[-2000:]

    def rows(d):
        return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "train_images_per_s")}
                for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows(y) == rows(x) and len(rows(y)) == 2
    again = json.loads((y / "config.json").read_text())
    assert again["resume"] is False and again["output_dir"] == str(y)
    for key in ("tl_version", "tl_commit", "data_files", "data_sample", "data", "seed", "lr", "weights"):
        assert again[key] == recorded[key], key
    assert recorded["tl_version"] and recorded["data_files"] == {"train": 24, "val": 12}
    assert recorded["data_sample"].startswith("sha256:") and recorded["slurm"] is None
    assert recorded["tl_commit"] is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", recorded["tl_commit"])


def test_strict_images_takes_on_off_auto_and_reads_old_config_files(tmp_path):
    assert parse_args([]).strict_images == "auto" and not parse_args([]).strict()
    assert parse_args(["--strict-images"]).strict() and not parse_args(["--strict-images", "off"]).strict()
    assert parse_args(["--data-file", "x.csv"]).strict()  # a label file's rows each claim an image
    assert not parse_args(["--data-file", "x.csv", "--strict-images", "off"]).strict()
    for old, now in ((True, "on"), (False, "auto")):  # config.json of runs from when it was a switch
        (tmp_path / "c.json").write_text(json.dumps({"strict_images": old}))
        assert parse_args(["--config", str(tmp_path / "c.json")]).strict_images == now
    with pytest.raises(UserError, match="--data-root is where a --data-file's paths start from"):
        parse_args(["--data-root", "somewhere"])
    with pytest.raises(UserError, match="--data-dir and --data-file both name the data set"):
        parse_args(["--data-file", "x.csv", "--data-dir", "somewhere"])


@pytest.mark.parametrize("text, option, value", [
    ("strict_images: off\n", "strict_images", "off"),  # YAML 1.1 made this false, which meant auto
    ("strict_images: on\n", "strict_images", "on"),
    ("strict_images: 'off'\n", "strict_images", "off"),
    ("strict_images: Off\n", "strict_images", "off"),
    ("compile: Yes\n", "compile", True),
    ("feature_cache: off\n", "feature_cache", "off"),  # was refused: must be a string, got False
    ("feature_cache: false\n", "feature_cache", "off"),
    ('{"feature_cache": false}', "feature_cache", "off"),
    ("compile: yes\n", "compile", True),
    ("compile: on\n", "compile", True),
    ("compile: no\n", "compile", False),
    ("compile: true\n", "compile", True),
    ("wandb_name: yes\n", "wandb_name", "yes"),  # a name is the word written
])
def test_config_files_mean_the_words_written(tmp_path, text, option, value):
    path = tmp_path / ("c.json" if text.startswith("{") else "c.yaml")
    path.write_text(text)
    assert getattr(parse_args(["--config", str(path)]), option) == value


@pytest.mark.parametrize("name, text, message", [
    ("c.yaml", "epochs: 1\nlr: 0.1\nepochs: 3\n", "epochs is given twice (lines 1 and 3)"),
    ("c.json", '{"epochs": 1,\n "lr": 0.1,\n "epochs": 3}', "epochs is given twice (lines 1 and 3)"),
    ("c.yaml", "batch_size: 4\n\n\nbatch_size: 4\n", "batch_size is given twice (lines 1 and 4)"),  # one value
])
def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / name}: {message}; keep one")):
        parse_args(["--config", str(tmp_path / name)])


def test_a_data_set_flag_replaces_the_config_files(tmp_path):
    (tmp_path / "folder.yaml").write_text("data_dir: /data/folder\nepochs: 3\n")
    (tmp_path / "labels.yaml").write_text("data_file: /data/labels.csv\ndata_root: /data/images\n")
    cfg = parse_args(["--config", str(tmp_path / "folder.yaml"), "--data-file", "x.csv"])
    assert (cfg.data_file, cfg.data_dir, cfg.epochs) == ("x.csv", Config.data_dir, 3)
    cfg = parse_args(["--config", str(tmp_path / "labels.yaml"), "--data-dir", "/other"])
    assert (cfg.data_dir, cfg.data_file, cfg.data_root) == ("/other", None, None)
    cfg = parse_args(["--config", str(tmp_path / "labels.yaml"), "--data-root", "/moved"])  # not a data set
    assert (cfg.data_file, cfg.data_root) == ("/data/labels.csv", "/moved")
    # A conflict left names the file the other value came from.
    (tmp_path / "root.yaml").write_text("data_root: /data/images\n")
    with pytest.raises(UserError, match=re.escape(f"data_root in {tmp_path / 'root.yaml'} is where a --data-file's")):
        parse_args(["--config", str(tmp_path / "root.yaml")])
    (tmp_path / "both.yaml").write_text("data_file: a.csv\ndata_dir: /d\n")
    with pytest.raises(UserError, match="data_dir and data_file both name the data set; keep one"):
        parse_args(["--config", str(tmp_path / "both.yaml")])
