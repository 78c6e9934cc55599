"""The recipe beyond the tutorial: freeze then unfreeze, per-group learning rates, AdamW and weight
decay, cosine with warmup, label smoothing; each changes what it says and resumes exactly."""

import json
import math
import signal

import pytest
import torch
from conftest import FAST, make_imagefolder, run_cli, spawn
from safetensors.torch import load_file
from test_checkpoint import metrics_without_timings, wait_for_epochs

from tl.core.config import parse_args
from tl.runs import checkpoints
from tl.train.loop import train
from tl.train.optim import build_optimizer, build_scheduler, param_groups


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("optim") / "d", n_train=16, n_val=6, size=72)


def run(tmp_path, data, base_weights, name, *extra, epochs=2):
    out = tmp_path / name
    train(parse_args(["--data-dir", str(data), "--output-dir", str(out), "--epochs", str(epochs), "--lr", "0.01",
                      "--weights", str(base_weights), *FAST, *extra]))
    return out


def backbone(tensors: dict, prefix: str = "") -> dict:
    """resnet18's tensors but the head's (fc.), their names without prefix."""
    names = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    return {k: v for k, v in names.items() if not k.startswith("fc.")}


def test_frozen_epochs_leave_the_backbone_bit_identical_then_it_trains(tmp_path, data, base_weights):
    base = torch.load(base_weights, weights_only=True)
    out = run(tmp_path, data, base_weights, "run", "--freeze-epochs", "2")
    state, _ = checkpoints.load(out / "state.safetensors")
    frozen = backbone(state, "model.")
    assert frozen.keys() == backbone(base).keys()
    # Weights and BatchNorm statistics alike: the frozen epochs ran the backbone as feature-extract does.
    assert all(torch.equal(frozen[k], base[k]) for k in frozen)
    assert not torch.equal(state["model.fc.weight"], torch.zeros_like(state["model.fc.weight"]))
    train(parse_args(["--data-dir", str(data), "--output-dir", str(out), "--epochs", "3", "--lr", "0.01",
                      "--weights", str(base_weights), *FAST, "--freeze-epochs", "2", "--resume"]))
    state, _ = checkpoints.load(out / "state.safetensors")
    after = backbone(state, "model.")
    assert not torch.equal(after["layer1.0.conv1.weight"], base["layer1.0.conv1.weight"])
    assert not torch.equal(after["bn1.running_mean"], base["bn1.running_mean"])  # BatchNorm trains again


def test_groups_learning_rates_and_weight_decay_are_as_configured(tmp_path, data, base_weights):
    out = run(tmp_path, data, base_weights, "run", "--backbone-lr-scale", "0.1", "--optimizer", "adamw",
              "--weight-decay", "0.05", epochs=1)
    groups = {g["name"]: g for g in json.loads((out / "config.json").read_text())["param_groups"]}
    assert list(groups) == ["head", "head.no_decay", "backbone", "backbone.no_decay"]
    assert groups["head"]["lr"] == 0.01 and groups["backbone"]["lr"] == pytest.approx(0.001)
    assert groups["head"]["weight_decay"] == 0.05 and groups["backbone.no_decay"]["weight_decay"] == 0
    assert groups["head"]["tensors"] == 1 and groups["head.no_decay"]["tensors"] == 1  # fc.weight, fc.bias
    assert sum(g["parameters"] for g in groups.values()) == 11_177_538  # resnet18 with a 2-class head
    state, _ = checkpoints.load(out / "state.safetensors")
    assert any(k.endswith(".exp_avg_sq") for k in state)  # AdamW's state, saved for a resume


def test_backbone_lr_scale_scales_how_far_the_backbone_moves(tmp_path, data, base_weights):
    base = backbone(torch.load(base_weights, weights_only=True))

    def moved(name, *extra):
        tensors = load_file(run(tmp_path, data, base_weights, name, *extra, epochs=1) / "best.safetensors")
        return sum((tensors[k].float() - base[k].float()).norm() for k in base if k.endswith("conv1.weight"))

    assert moved("small", "--backbone-lr-scale", "0.01") < 0.1 * moved("same")


def test_cosine_schedule_with_warmup_follows_the_formula(tmp_path, data, base_weights):
    out = run(tmp_path, data, base_weights, "run", "--schedule", "cosine", "--warmup-epochs", "1", epochs=4)
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [0.005, 0.01] + [0.01 * (1 + math.cos(math.pi * k / 3)) / 2 for k in (1, 2)]
    assert lrs == pytest.approx(expected)


def test_step_schedule_with_warmup_steps_after_it():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    cfg = parse_args(["--warmup-epochs", "2", "--step-size", "2", "--lr", "1"])
    optimizer = build_optimizer(param_groups(model, model[1], cfg), cfg)
    scheduler = build_scheduler(optimizer, cfg)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([1 / 3, 2 / 3, 1, 1, 0.1, 0.1])


def test_label_smoothing_changes_the_training_loss(tmp_path, data, base_weights):
    def first_loss(name, *extra):
        out = run(tmp_path, data, base_weights, name, "--mode", "feature-extract", *extra, epochs=1)
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]

    plain, smoothed = first_loss("plain"), first_loss("smooth", "--label-smoothing", "0.5")
    assert smoothed != plain


@pytest.mark.parametrize("args, message", [
    (["--mode", "feature-extract", "--freeze-epochs", "2"], "--freeze-epochs is for --mode finetune"),
    (["--label-smoothing", "1"], "--label-smoothing must be"),
    (["--schedule", "cosine", "--warmup-epochs", "3", "--epochs", "3"], "leaves no epoch of the cosine"),
    (["--backbone-lr-scale", "0"], "--backbone-lr-scale must be positive"),
    (["--weight-decay", "-1"], "--weight-decay must be 0 or more"),
    (["--layer-decay", "0"], r"--layer-decay must be above 0 and at most 1 \(off\), e.g. 0.75, got 0.0"),
    (["--layer-decay", "1.5"], "--layer-decay must be above 0 and at most 1"),
    (["--mode", "feature-extract", "--layer-decay", "0.75"], "--layer-decay is for --mode finetune"),
    (["--accumulate", "0"], r"--accumulate must be 1 \(off\) or more micro-batches per optimizer step, got 0"),
])
def test_bad_recipe_options_are_one_line_errors(args, message):
    from tl.core.errors import UserError
    with pytest.raises(UserError, match=message):
        parse_args(args)


def test_cosine_spans_epochs_so_a_resume_keeps_them(tmp_path, data, base_weights):
    out = run(tmp_path, data, base_weights, "run", "--mode", "feature-extract", "--schedule", "cosine", epochs=2)
    proc = run_cli("train.py", "--mode", "feature-extract", "--data-dir", str(data), "--output-dir", str(out),
                   "--epochs", "3", "--lr", "0.01", "--weights", str(base_weights), *FAST, "--schedule", "cosine",
                   "--resume")
    assert proc.returncode == 2 and "--epochs (3, not 2)" in proc.stderr, proc.stderr[-2000:]


RECIPE = ["--freeze-epochs", "3", "--optimizer", "adamw", "--weight-decay", "0.05", "--schedule", "cosine",
          "--warmup-epochs", "1", "--backbone-lr-scale", "0.1", "--label-smoothing", "0.1"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    ref = tmp_path_factory.mktemp("recipe") / "ref"
    proc = run_cli("train.py", "--data-dir", str(data), "--output-dir", str(ref), *RECIPE, *ARGS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return ref


ARGS = ["--epochs", "5", "--image-size", "64", "--batch-size", "4", "--lr", "0.01", "--weights", "none"]


@pytest.mark.slow
@pytest.mark.parametrize("killed_after", [2, 3, 4])  # epochs: before, at and after the freeze ends
def test_sigkill_around_the_unfreeze_then_resume_matches_an_uninterrupted_run(tmp_path, data, reference,
                                                                              killed_after):
    out = tmp_path / "killed"
    proc = spawn("train.py", "--data-dir", data, "--output-dir", out, *RECIPE, *ARGS)
    wait_for_epochs(out, killed_after, proc)  # the row appears: its best and state being written, or after
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    resumed = run_cli("train.py", "--data-dir", str(data), "--output-dir", str(out), *RECIPE, *ARGS, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert metrics_without_timings(out) == metrics_without_timings(reference)
    assert (out / "best.safetensors").read_bytes() == (reference / "best.safetensors").read_bytes()


@pytest.mark.parametrize("name", ["resnet18", "timm/test_vit"])
def test_layer_decay_gives_each_layer_its_rate(name):
    """--layer-decay D: the head at --lr, each layer below at D per layer less (x --backbone-lr-scale); for
    timm models the same rates as timm's own param_groups_layer_decay."""
    from tl.model.network import build_model, layer_depths

    cfg = parse_args(["--model", name, "--layer-decay", "0.5", "--backbone-lr-scale", "0.1", "--weight-decay",
                      "0.01", "--optimizer", "adamw"])
    model, head = build_model(name, "none", 2, "finetune")
    depths, top = layer_depths(model, head)
    groups = param_groups(model, model.get_submodule(head), cfg, (depths, top))
    assert [g["name"] for g in groups][:2] == ["head", "head.no_decay"]
    names = {id(p): n for n, p in model.named_parameters()}
    rate = {names[id(p)]: g["lr"] for g in groups for p in g["params"]}
    assert len(rate) == len(names)  # every parameter in exactly one group
    for n, lr in rate.items():
        want = 0.001 if depths[n] == top else 0.001 * 0.1 * 0.5 ** (top - depths[n])
        assert lr == pytest.approx(want), n
    assert len({depths[n] for n in names.values()}) > 4 and min(depths.values()) == 0
    if name.startswith("timm/"):
        from timm.optim import param_groups_layer_decay

        scale = {names[id(p)]: g["lr_scale"] for g in param_groups_layer_decay(model, 0.01, layer_decay=0.5)
                 for p in g["params"]}
        assert all(rate[n] / (0.001 if depths[n] == top else 0.0001) == pytest.approx(scale[n]) for n in rate)


def test_a_layer_decay_run_records_its_groups_and_a_resume_keeps_it(tmp_path, data, base_weights):
    out = tmp_path / "run"
    args = ["--data-dir", str(data), "--output-dir", str(out), "--weights", str(base_weights), *FAST]
    proc = run_cli("train.py", *args, "--epochs", "1", "--layer-decay", "0.75")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "layer decay 0.75: 9 layers below the head, learning rates from 0.001 (head) down to 7.5e-05" in \
        proc.stdout
    groups = json.loads((out / "config.json").read_text())["param_groups"]
    assert [g["name"] for g in groups] == ["head", *(f"layer{d}" for d in range(8, -1, -1))]
    assert groups[-1]["lr"] == pytest.approx(0.001 * 0.75 ** 9)
    refused = run_cli("train.py", *args, "--epochs", "2", "--layer-decay", "0.5", "--resume")
    assert refused.returncode == 2 and "--layer-decay (0.5, not 0.75)" in refused.stderr, refused.stderr[-2000:]
