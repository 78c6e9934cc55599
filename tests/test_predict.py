"""Prediction from a checkpoint alone (plus the base weights for feature-extract)."""

import json
import shutil

import pytest
from conftest import FAST, run_cli
from PIL import Image

from tl.config import parse_args
from tl.errors import UserError
from tl.loop import train
from tl.predict import predict


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data, base_weights):
    out = {}
    for mode in ("finetune", "feature-extract"):
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        out[mode] = tmp_path_factory.mktemp("predict") / mode
        train(parse_args(["--mode", mode, "--data-dir", str(tiny_data), "--epochs", "4", "--lr", "0.01",
                          "--weights", str(base_weights), "--output-dir", str(out[mode]), *FAST]))
    return out


@pytest.mark.parametrize("mode", ["finetune", "feature-extract"])
def test_prediction_over_val_reproduces_the_best_val_accuracy(runs, tiny_data, base_weights, mode):
    summary = json.loads((runs[mode] / "summary.json").read_text())
    weights = str(base_weights) if mode == "feature-extract" else None
    result = predict(runs[mode] / "best.safetensors", [str(tiny_data / "val")], weights=weights)
    assert result["accuracy"] == summary["best_val_acc"]
    assert len(result["predictions"]) == 12


def test_head_checkpoint_works_on_a_machine_with_only_it_and_the_base(tmp_path, runs, tiny_data, base_weights):
    alone = tmp_path / "elsewhere"
    alone.mkdir()
    shutil.copy(runs["feature-extract"] / "best.safetensors", alone / "head.safetensors")
    shutil.copy(base_weights, alone / "base.pth")
    assert (alone / "head.safetensors").stat().st_size < 10_000
    image = tiny_data / "val" / "red" / "000.jpg"
    proc = run_cli("-m", "tl.predict", "--checkpoint", "head.safetensors", "--weights", "base.pth",
                   "--png", "pred.png", str(image), str(tiny_data / "val"), cwd=alone)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    path, label, prob = lines[0].split("\t")
    assert path == str(image) and label in ("blue", "red") and 0.5 <= float(prob) <= 1
    assert len(lines) == 1 + 12 + 2  # the image, the val folder, accuracy, png
    assert lines[-2].startswith("accuracy ") and lines[-1] == "wrote pred.png"
    with Image.open(alone / "pred.png") as img:
        assert img.width > 400


def test_feature_extract_checkpoint_refuses_another_base(tmp_path, runs, tiny_data, base_weights):
    import torch
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "other.pth")
    with pytest.raises(UserError, match="not the base this checkpoint was trained on"):
        predict(runs["feature-extract"] / "best.safetensors", [str(tiny_data / "val")],
                weights=str(tmp_path / "other.pth"))
    with pytest.raises(UserError, match=f"local weights file \\({base_weights}\\); pass that file with --weights"):
        predict(runs["feature-extract"] / "best.safetensors", [str(tiny_data / "val")])
    proc = run_cli("-m", "tl.predict", "--checkpoint", str(runs["finetune"] / "best.safetensors"), "nope.jpg")
    assert proc.returncode == 2 and proc.stderr.startswith("error: nope.jpg does not exist")
