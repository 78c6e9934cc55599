"""python -m tl.lr_find: the range test on a run's model and data, its suggestion, its plot, its errors."""

import re

import pytest
import torch
from conftest import FAST, one_line_error, run_cli
from PIL import Image

from tl.core.config import Config
from tl.lr_find import lr_at, lr_ratios, set_lrs, smoothed, suggest
from tl.train.optim import build_optimizer, build_scheduler, param_groups

SUGGESTION = re.compile(r"^suggested --lr (\S+) \(steepest descent; minimum loss at (\S+), /10: (\S+)\); plot in (.+)$",
                        flags=re.M)


def files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def lr_find(tmp_path, tiny_data, base_weights, *args, mode="finetune"):
    return run_cli("-m", "tl.lr_find", "--data-dir", tiny_data, "--mode", mode, "--weights", base_weights, *FAST,
                   "--steps", "12", *args, cwd=tmp_path)


@pytest.fixture(scope="module")
def finetune(tmp_path_factory, tiny_data, base_weights):
    """One finetune range test with the default --out, in a folder of its own."""
    cwd = tmp_path_factory.mktemp("lr_find")
    before = files(tiny_data)
    proc = lr_find(cwd, tiny_data, base_weights)
    return cwd, proc, before


def check_run(proc, cwd, png_name, start=1e-7, end=10.0):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = SUGGESTION.findall(proc.stdout)
    assert len(found) == 1, proc.stdout
    suggested, minimum, tenth, png = found[0]
    assert start <= float(suggested) <= end and start <= float(minimum) <= end
    assert float(tenth) == pytest.approx(float(minimum) / 10, rel=0.1)
    assert png == png_name
    with Image.open(cwd / png_name) as img:
        assert img.format == "PNG" and img.width >= 400
    return float(suggested)


def test_finetune_writes_the_plot_and_nothing_else(finetune, tiny_data):
    cwd, proc, before = finetune
    check_run(proc, cwd, "lr_find.png")
    assert "lr find: finetune resnet18 on 24 train images, 12 batches of 8" in proc.stdout
    assert files(cwd) == ["lr_find.png"]  # no runs/, no output dir, no stray temporary file
    assert files(tiny_data) == before


def test_feature_extract_with_the_feature_cache(tmp_path, tiny_data, base_weights):
    before = files(tiny_data)
    (tmp_path / "plots").mkdir()
    proc = lr_find(tmp_path, tiny_data, base_weights, "--out", "plots/fe.png", "--start-lr", "1e-5", "--end-lr", "1",
                   mode="feature-extract")
    check_run(proc, tmp_path, "plots/fe.png", 1e-5, 1.0)
    assert "feature cache: backbone features of 24 train" in proc.stdout
    assert files(tmp_path) == ["plots", "plots/fe.png"]
    assert files(tiny_data) == before


def test_the_same_command_suggests_the_same(finetune, tiny_data, base_weights, tmp_path):
    _, first, _ = finetune
    again = lr_find(tmp_path, tiny_data, base_weights)
    assert again.returncode == 0, again.stderr
    assert SUGGESTION.findall(again.stdout) == SUGGESTION.findall(first.stdout)


@pytest.mark.parametrize("args, phrase", [
    (["--start-lr", "0"], "argument --start-lr: must be positive"),
    (["--start-lr", "1e-3", "--end-lr", "1e-4"], "--end-lr 0.0001 must be above --start-lr 0.001"),
    (["--end-lr", "1e-7"], "--end-lr 1e-07 must be above --start-lr 1e-07"),
    (["--steps", "1"], "argument --steps: must be 5 or more"),
    (["--steps", "many"], "argument --steps: must be a whole number"),
    (["--batch-size", "0"], "--batch-size must be positive"),  # train.py's checks, as train.py makes them
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["--output-dir", "somewhere"], "--output-dir does not apply"),
    (["--out", "missing/plot.png"], "the folder missing does not exist"),
])
def test_bad_input_is_one_error_line(tmp_path, tiny_data, args, phrase):
    proc = run_cli("-m", "tl.lr_find", "--data-dir", tiny_data, *args, cwd=tmp_path)
    one_line_error(proc, phrase)
    assert files(tmp_path) == []


def test_a_range_that_diverges_at_once_is_one_error_line(tmp_path, tiny_data, base_weights):
    proc = lr_find(tmp_path, tiny_data, base_weights, "--start-lr", "1e3", "--end-lr", "1e6", mode="feature-extract")
    one_line_error(proc, "the loss diverged within 2 steps", "lower --start-lr")
    assert "stopped after 2 of 12 steps" in proc.stdout
    assert files(tmp_path) == []  # no plot of one point


def test_refuses_a_plot_inside_the_data(tmp_path, tiny_data):
    proc = run_cli("-m", "tl.lr_find", "--data-dir", tiny_data, "--out", tiny_data / "train" / "red" / "lr.png",
                   cwd=tmp_path)
    one_line_error(proc, "is inside --data-dir", "would become an image of the data set")


def test_refuses_several_processes(tmp_path, tiny_data):
    """Under torchrun or accelerate launch with several processes (WORLD_SIZE > 1) it stops at once, before a
    process group is set up; only rank 0 prints."""
    proc = run_cli("-m", "tl.lr_find", "--data-dir", tiny_data, env={"WORLD_SIZE": "2", "RANK": "0"}, cwd=tmp_path)
    one_line_error(proc, "runs on one process, not 2")
    quiet = run_cli("-m", "tl.lr_find", "--data-dir", tiny_data, env={"WORLD_SIZE": "2", "RANK": "1"}, cwd=tmp_path)
    assert quiet.returncode == 2 and quiet.stderr == ""


def test_help_lists_its_options_and_train_options():
    proc = run_cli("-m", "tl.lr_find", "--help")
    assert proc.returncode == 0, proc.stderr
    for option in ("--start-lr", "--end-lr", "--steps", "--out", "--data-dir", "--mode", "--weights", "--optimizer",
                   "--batch-size", "--image-size", "--label-smoothing"):
        assert option in proc.stdout, option
    assert proc.stdout.count("--help") == 1


def test_lrs_grow_exponentially_and_keep_the_groups_ratios():
    lrs = [lr_at(i, 5, 1e-4, 1.0) for i in range(5)]
    assert lrs == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    head, backbone = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [head], "lr": 0.01}, {"params": [backbone], "lr": 0.001}], lr=0.01)
    set_lrs(optimizer, 0.5, [1.0, 0.1])
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.5, 0.05])


@pytest.mark.parametrize("warmup", [0, 2])
def test_ratios_are_the_recipes_even_under_a_warmup(warmup):
    """A warmup schedule has lowered every group's lr before the first step: the ratios stay the recipe's."""
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    cfg = Config(lr=0.01, backbone_lr_scale=0.1, warmup_epochs=warmup, weight_decay=0.05)
    optimizer = build_optimizer(param_groups(net, net[1], cfg), cfg)
    build_scheduler(optimizer, cfg)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 / (warmup + 1))
    assert lr_ratios(optimizer) == pytest.approx([1.0, 1.0, 0.1, 0.1])  # head, head.no_decay, backbone, ...


def test_smoothing_and_suggestion():
    assert smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected: no pull towards 0
    lrs = [10 ** (-6 + i * 0.1) for i in range(50)]
    # flat, then falling fastest at index 30 (lr 1e-3), then flat at its minimum from index 40 (lr 1e-2)
    losses = [1.0 - 0.5 * (1 + torch.tanh(torch.tensor((i - 30) / 3.0)).item()) for i in range(50)]
    found = suggest(lrs, losses)
    assert found["suggested"] == pytest.approx(1e-3)
    assert found["window"] == (5, 48)
    assert found["falling"]
    assert 40 <= found["min_index"] < 48


def test_the_run_s_loss_with_mixup_and_class_weights(tmp_path, tiny_data, base_weights):
    """The range test trains on the loss the run would: mixed soft targets, class weights."""
    proc = lr_find(tmp_path, tiny_data, base_weights, "--mixup", "0.8", "--cutmix", "1.0", "--class-weights", "auto")
    check_run(proc, tmp_path, "lr_find.png")
