"""Honest evaluation end to end: a test/ folder, --val-split, --patience, top-5 and per-class scores."""

import json
import shutil

import pytest
from accelerate.state import AcceleratorState
from conftest import FAST, HYMENOPTERA_ZIP, PROXY_WEIGHTS, make_imagefolder, run_cli

from tl.core.config import parse_args
from tl.core.errors import UserError
from tl.data.listing import list_images
from tl.predict import predict
from tl.train.loop import train

TEN = [f"c{i}" for i in range(10)]


def run(out, data, *extra, epochs=3, mode="finetune", weights="none"):
    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh process's state, for each run
    cfg = parse_args(["--mode", mode, "--data-dir", str(data), "--epochs", str(epochs), "--lr", "0.01",
                      "--weights", str(weights), "--output-dir", str(out), *FAST, *extra])
    return train(cfg)[0]


def rows(out, *drop):
    return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "train_images_per_s", *drop)}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def with_test(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("test") / "set", n_train=8, n_val=4, n_test=5)


@pytest.fixture(scope="module")
def ten(tmp_path_factory):
    """Ten classes: top-5 and per-class scores mean something (nine of them look alike)."""
    return make_imagefolder(tmp_path_factory.mktemp("ten") / "set", classes=TEN, n_train=3, n_val=2, n_test=2,
                            size=48)


@pytest.mark.parametrize("mode, data_mode", [("finetune", "memory"), ("feature-extract", "stream")])
def test_test_folder_is_evaluated_once_with_the_best_checkpoint(tmp_path, with_test, base_weights, mode, data_mode):
    out = tmp_path / "run"
    summary = run(out, with_test, "--data-mode", data_mode, mode=mode, weights=base_weights, epochs=2)
    assert summary["test_total"] == 10 and summary["test_correct"] == round(summary["test_acc"] * 10)
    # Exactly what tl.predict finds over test/ with best.safetensors: the best epoch's weights.
    best = predict(out / "best.safetensors", [str(with_test / "test")], str(base_weights))
    assert best["accuracy"] == summary["test_acc"]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["test_acc"] == summary["test_acc"] and set(saved["test_per_class_f1"]) == {"blue", "red"}
    assert (out / "test_confusion.png").stat().st_size > 1000
    assert "test_acc" not in rows(out)[0]  # once, at the end: not per epoch


def test_ten_classes_give_top5_and_per_class_scores_of_the_best_epoch(tmp_path, ten, base_weights):
    out = tmp_path / "run"
    summary = run(out, ten, mode="feature-extract", weights=base_weights)
    metrics = rows(out)
    assert all(r["val_acc"] <= r["val_top5"] <= 1 for r in metrics) and len(metrics) == 3
    assert summary["val_top5"] == metrics[summary["best_epoch"] - 1]["val_top5"]
    assert 0 <= summary["test_acc"] <= summary["test_top5"] <= 1
    # Per-class scores from the best epoch's val predictions, as tl.predict makes them again.
    predicted = predict(out / "best.safetensors", [str(ten / "val")], str(base_weights))["predictions"]
    truth = [c for c in TEN for _ in range(2)]
    for c in TEN:
        hits = sum(t == p == c for t, p in zip(truth, predicted))
        assert summary["per_class_recall"][c] == summary["per_class_acc"][c] == hits / 2
        assert summary["per_class_precision"][c] == (hits / predicted.count(c) if c in predicted else 0.0)
    assert set(summary["test_per_class_precision"]) == set(TEN)


def test_no_top5_up_to_five_classes(tmp_path, tiny_data, base_weights):
    out = tmp_path / "run"
    summary = run(out, tiny_data, epochs=1, mode="feature-extract", weights=base_weights)
    assert "val_top5" not in summary and "val_top5" not in rows(out)[0] and "test_acc" not in summary
    assert summary["stop_reason"] == "epochs" and not (out / "test_confusion.png").exists()


@pytest.mark.parametrize("mode", [pytest.param("finetune", marks=pytest.mark.slow), "feature-extract"])
def test_val_split_validates_on_the_held_out_train_images(tmp_path, tiny_data, base_weights, mode):
    data = tmp_path / "data"
    shutil.copytree(tiny_data / "train", data / "train")  # no val/
    out = tmp_path / "run"
    summary = run(out, data, "--val-split", "0.25", mode=mode, epochs=2, weights=base_weights)
    held = list_images(data, val_split=0.25)
    assert (summary["num_train"], summary["num_val"]) == (len(held.train), len(held.val)) == (18, 6)
    assert json.loads((out / "config.json").read_text())["val_split"] == 0.25
    # tl.predict finds the same images from the checkpoint alone and reproduces the best val accuracy.
    best = predict(out / "best.safetensors", [], str(base_weights), val_of=str(data))
    assert best["accuracy"] == summary["best_val_acc"]
    with pytest.raises(UserError, match=r"--val-split \(0.5, not 0.25\)"):
        run(out, data, "--val-split", "0.5", "--resume", mode=mode, epochs=3, weights=base_weights)


def test_val_split_refuses_a_pack(tmp_path, tiny_data):
    from tl.pack import pack

    pack(tiny_data, tmp_path / "pack", progress=False)
    with pytest.raises(UserError, match="is a pack, which holds its own val split"):
        run(tmp_path / "run", tmp_path / "pack", "--val-split", "0.2")


PATIENCE = ("--lr", "1e-9", "--patience", "2")  # the head hardly moves: val accuracy stays at epoch 1's


def test_patience_stops_early_and_a_resume_does_nothing_more(tmp_path, tiny_data, base_weights):
    out = tmp_path / "run"
    summary = run(out, tiny_data, *PATIENCE, mode="feature-extract", epochs=8, weights=base_weights)
    assert summary["best_epoch"] == 1 and summary["epochs"] == 3 and summary["stop_reason"] == "patience"
    assert [r["epoch"] for r in rows(out)] == [1, 2, 3]
    again = run(out, tiny_data, *PATIENCE, "--resume", mode="feature-extract", epochs=8, weights=base_weights)
    assert again == json.loads((out / "summary.json").read_text()) and len(rows(out)) == 3


@pytest.mark.slow
def test_patience_resumed_stops_where_an_uninterrupted_run_does(tmp_path, tiny_data, base_weights):
    whole, part = tmp_path / "whole", tmp_path / "part"
    run(whole, tiny_data, *PATIENCE, mode="feature-extract", epochs=8, weights=base_weights)
    assert run(part, tiny_data, *PATIENCE, mode="feature-extract", epochs=2, weights=base_weights)["stop_reason"] \
        == "epochs"
    resumed = run(part, tiny_data, *PATIENCE, "--resume", mode="feature-extract", epochs=8, weights=base_weights)
    assert rows(part) == rows(whole) and (resumed["epochs"], resumed["stop_reason"]) == (3, "patience")
    # A longer patience on resume trains on, like more --epochs.
    longer = run(part, tiny_data, *PATIENCE, "--patience", "3", "--resume", mode="feature-extract", epochs=8,
                 weights=base_weights)
    assert longer["epochs"] == 4 and len(rows(part)) == 4


@pytest.mark.slow
def test_patience_from_the_command_line_says_why_it_stopped(tmp_path, tiny_data, base_weights):
    out = tmp_path / "run"
    args = ["train.py", "--mode", "feature-extract", "--data-dir", str(tiny_data), "--output-dir", str(out),
            "--epochs", "5", "--lr", "1e-9", "--patience", "1", "--weights", str(base_weights), *FAST]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stopped early after epoch 2: val accuracy has not improved for 1 epochs (--patience 1)" in proc.stdout
    again = run_cli(*args, "--resume")
    assert again.returncode == 0 and "nothing to do" in again.stdout and "--patience 1" in again.stdout


@pytest.mark.slow
@pytest.mark.skipif(not HYMENOPTERA_ZIP.is_file() or not PROXY_WEIGHTS.is_file(), reason="needs ../shared")
def test_val_split_on_the_real_data_set(tmp_path, hymenoptera):
    data = tmp_path / "hym"
    shutil.copytree(hymenoptera / "train", data / "train")
    out = tmp_path / "run"
    proc = run_cli("train.py", "--mode", "feature-extract", "--epochs", "2", "--data-dir", str(data), "--val-split",
                   "0.2", "--weights", str(PROXY_WEIGHTS), "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["num_train"], summary["num_val"]) == (244 - 49, 49)  # ants 123 -> 25, bees 121 -> 24
    proc = run_cli("-m", "tl.predict", "--checkpoint", str(out / "best.safetensors"), "--weights",
                   str(PROXY_WEIGHTS), "--val-of", str(data))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == f"accuracy {summary['best_val_acc']:.4f} ({summary['val_correct']}/49)"
