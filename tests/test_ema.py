"""--ema: the average follows torch's EMA formula, covers what the mode trains, and the best epoch keeps
whichever weights score higher, saying which; tl.predict reproduces that figure from best.safetensors."""

import json

import pytest
import torch
from conftest import FAST, one_line_error, run_cli
from safetensors.torch import load_file

from tl.runs import checkpoints
from tl.runs.checkpointer import Checkpointer
from tl.runs.rundir import RunDir
from tl.train.ema import WeightEMA


def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.LazyLinear(2))


def test_the_average_follows_the_formula_buffers_included():
    model = small_model()
    model(torch.randn(2, 3, 6, 6))  # materialize the lazy layer, move BatchNorm's statistics
    ema = WeightEMA(model, "3", mode="finetune", decay=0.9, device="cpu")
    expected = {k: v.clone().double() for k, v in model.state_dict().items() if v.is_floating_point()}
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(2, 3, 6, 6))  # train mode: running statistics move too
        ema.update()
        for k, v in model.state_dict().items():
            if v.is_floating_point():  # the first update copies, the next ones average
                expected[k] = v.double() if step == 0 else 0.9 * expected[k] + 0.1 * v.double()
    averaged = ema.trained()
    assert set(averaged) == set(model.state_dict())
    for k, v in expected.items():
        assert torch.allclose(averaged[k].double(), v, atol=1e-6), k
    frozen = WeightEMA(model, "3", mode="feature-extract", decay=0.9, device="cpu")
    assert set(frozen.trained()) == {"3.weight", "3.bias"}


@pytest.mark.parametrize("mode, extra", [
    ("finetune", []),
    ("feature-extract", ["--epochs", "2"]),
    ("feature-extract", ["--feature-cache", "off"]),
])
def test_best_keeps_the_higher_scoring_weights_and_says_which(tmp_path, tiny_data, base_weights, mode, extra):
    out = tmp_path / "run"
    proc = run_cli("train.py", "--mode", mode, "--data-dir", tiny_data, "--output-dir", out, "--epochs", "3", *FAST,
                   "--weights", base_weights, "--lr", "0.01", "--ema", "0.5", "--precision", "no", *extra)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all({"ema_val_acc", "ema_val_loss", "ema_val_balanced_acc"} <= set(r) for r in rows)
    assert "ema acc" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    best = rows[summary["best_epoch"] - 1]
    won = best["ema_val_acc"] > best["val_acc"]
    assert summary["best_val_acc"] == max(best["val_acc"], best["ema_val_acc"])
    assert summary["best_weights"] == ("ema" if won else "model")  # which one wins is the data's and seed's
    meta = checkpoints.read_metadata(out / "best.safetensors")
    assert meta["weights_from"] == summary["best_weights"] and meta["recipe"]["ema"] == 0.5
    state = load_file(out / "state.safetensors")
    averaged = {k for k in state if k.startswith("averaged.")}
    trained = set(load_file(out / "best.safetensors"))
    if mode == "feature-extract":
        assert trained == {"fc.weight", "fc.bias"}
        assert averaged == {"averaged.n_averaged", "averaged.module.weight", "averaged.module.bias"}
    else:
        assert len(averaged) == len(trained) + 1
    predicted = run_cli("-m", "tl.predict", "--checkpoint", out / "best.safetensors", "--weights", base_weights,
                        tiny_data / "val")
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert f"accuracy {summary['best_val_acc']:.4f}" in predicted.stdout


@pytest.mark.parametrize("value", ["1", "1.5", "-0.1"])
def test_a_decay_outside_0_1_is_one_line(tmp_path, tiny_data, value):
    proc = run_cli("train.py", "--data-dir", tiny_data, "--output-dir", tmp_path / "run", *FAST, "--ema", value)
    one_line_error(proc, "--ema is a decay per step above 0 and below 1")


@pytest.mark.parametrize("ema_acc, expected", [(0.75, "ema"), (0.5, "model")])
def test_the_best_epoch_saves_the_averaged_weights_when_they_score_higher(tmp_path, ema_acc, expected):
    """Both ways, whatever a seed does: the checkpointer writes the weights that scored higher and says which."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = WeightEMA(model, "1", mode="finetune", decay=0.5, device="cpu")
    ema.update()
    with torch.no_grad():
        model[1].weight.add_(1.0)  # the model moves away from its average
    identity = checkpoints.Identity("tiny", "finetune", ["a", "b"], "none", "none", "1", 8, 0, "sha256:1",
                                    {"ema": 0.5, "processes": 1})
    run = RunDir.open(str(tmp_path / "run"), "finetune", False, False)
    run.begin()
    saver = Checkpointer(run, identity, model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 7), {}, ema)
    assert saver.end_epoch({"epoch": 1, "val_acc": 0.6, "ema_val_acc": ema_acc}, [0, 1], [0.9, 0.8], 1, 1.0)
    best, meta = checkpoints.load(run.file("best.safetensors"))
    assert meta["weights_from"] == expected and meta["val_acc"] == max(0.6, ema_acc)
    want = ema.trained() if expected == "ema" else model.state_dict()
    assert all(torch.equal(best[k], want[k]) for k in best)
    assert not torch.equal(ema.trained()["1.weight"], model.state_dict()["1.weight"])
    run.close(False)
