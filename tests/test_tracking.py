"""What a run leaves for people: W&B records read back from the offline run file, and the pictures."""

import json
import time

import numpy as np
import pytest
from conftest import FAST, make_imagefolder, run_cli, spawn
from PIL import Image
from wandb_records import config, find_run_file, history, read_records, summary

from tl.core.config import parse_args
from tl.train.loop import train

PICTURES = ("predictions", "curves", "confusion", "batch")


@pytest.fixture
def wandb_home(tmp_path, monkeypatch):
    for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):  # keep ~ clean
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_offline_run_holds_metrics_pictures_confusion_and_checkpoint(tmp_path, tiny_data, wandb_home):
    out = tmp_path / "run"
    train(parse_args(["--data-dir", str(tiny_data), "--epochs", "3", "--weights", "none", "--output-dir", str(out),
                      "--wandb-log-model", *FAST]))  # auto: no W&B login here, so offline
    run_file = find_run_file(out)
    rows = history(run_file)
    epochs = [r for r in rows if "val_acc" in r]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_acc"] for r in epochs] == pytest.approx([m["val_acc"] for m in metrics])
    for key in ("train_loss", "train_acc", "val_loss", "val_balanced_acc", "val_macro_f1", "lr", "train_images_per_s",
                "seconds"):
        assert all(key in r for r in epochs), key
    logged = {k: v for r in rows for k, v in r.items()}
    for name in PICTURES:
        assert logged[name]["_type"] == "image-file"
        assert (run_file.parent / "files" / logged[name]["path"]).stat().st_size > 1000
    assert "confusion_matrix_table" in logged
    assert config(run_file)["mode"] == "finetune" and config(run_file)["epochs"] == 3
    saved = json.loads((out / "summary.json").read_text())
    for key in ("best_val_acc", "val_balanced_acc", "val_macro_f1"):
        assert summary(run_file)[key] == saved[key], key
    artifacts = [r.artifact for r in read_records(run_file) if r.WhichOneof("record_type") == "artifact"]
    assert any(a.type == "model" and "best.safetensors" in str(a.manifest) for a in artifacts)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_wandb_can_be_disabled(tmp_path, tiny_data, wandb_home, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("WANDB_MODE", "disabled")
    flag = ["--wandb", "disabled"] if how == "flag" else []
    out = tmp_path / "run"
    train(parse_args(["--data-dir", str(tiny_data), "--epochs", "1", "--weights", "none", "--output-dir", str(out),
                      *flag, *FAST]))
    assert (out / "summary.json").exists() and not (out / "wandb").exists()


@pytest.mark.slow
def test_no_network_falls_back_to_offline_and_says_how_to_sync(tmp_path, tiny_data, wandb_home):
    env = {"WANDB_API_KEY": "0" * 40, "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "WANDB_INIT_TIMEOUT": "4"}  # tl's 20 s, shorter
    proc = run_cli("train.py", "--wandb", "online", "--data-dir", str(tiny_data), "--epochs", "1", "--weights",
                   "none", "--output-dir", str(tmp_path / "run"), *FAST, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "W&B: could not start online" in proc.stdout and "wandb sync" in proc.stdout, \
        proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("W&B: could not start online"))
    assert line.endswith("; logging offline instead")  # one line, though W&B's message has several
    assert any("val_acc" in r for r in history(find_run_file(tmp_path / "run")))


def test_pictures_are_bounded_and_not_blank(tmp_path, tiny_data):
    out = tmp_path / "run"
    train(parse_args(["--data-dir", str(tiny_data), "--epochs", "2", "--weights", "none", "--output-dir", str(out),
                      "--wandb", "disabled", *FAST]))
    for name in PICTURES:  # sizes bounded (W&B and a page show them whole), not to the pixel
        with Image.open(out / f"{name}.png") as img:
            assert 250 <= min(img.size) and max(img.size) <= 1100, (name, img.size)
            pixels = np.asarray(img.convert("L"), dtype=float)
        assert pixels.std() > 10 and (pixels < 128).mean() > 0.005, f"{name}.png looks blank"
    with Image.open(out / "batch.png") as img:  # the training photos themselves are there: red and blue
        rgb = np.asarray(img.convert("RGB"), dtype=float)
    assert (rgb[..., 0] - rgb[..., 2] > 80).mean() > 0.01 and (rgb[..., 2] - rgb[..., 0] > 80).mean() > 0.01


@pytest.mark.parametrize("broken", ["init", "finish"])
def test_a_wandb_failure_never_changes_the_outcome_of_training(tmp_path, tiny_data, wandb_home, monkeypatch, broken):
    import wandb

    def fail(*args, **kwargs):
        raise RuntimeError("W&B service crashed")

    monkeypatch.setattr(wandb, "init", fail) if broken == "init" else \
        monkeypatch.setattr(wandb.plot, "confusion_matrix", fail)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=f"W&B: could not {dict(init='start').get(broken, broken)}.*training goes on"):
        summary, _ = train(parse_args(["--data-dir", str(tiny_data), "--epochs", "2", "--weights", "none",
                                       "--output-dir", str(out), "--wandb", "offline", *FAST]))
    assert json.loads((out / "summary.json").read_text())["best_val_acc"] == summary["best_val_acc"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_killed_wandb_service_is_one_warning_and_no_traceback(tmp_path, tiny_data, wandb_home):
    """W&B's service process dies mid-run (OOM killer, a job's scancel): training ends as usual, with one
    warning, and neither tl nor W&B's exit hook prints a traceback."""
    import psutil

    out = tmp_path / "run"
    proc = spawn("train.py", "--wandb", "offline", "--data-dir", str(tiny_data), "--epochs", "3", "--weights", "none",
                 "--output-dir", str(out), *FAST)
    deadline = time.time() + 120  # batch.png: written once the W&B run has started, before epoch 1
    while not (out / "batch.png").exists():
        assert time.time() < deadline and proc.poll() is None, proc.communicate(10)[1][-2000:]
        time.sleep(0.01)
    services = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.name() == "wandb-core"]
    assert len(services) == 1, services
    services[0].kill()
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert "warning: W&B: could not" in stderr and "Traceback" not in stderr and "Exception ignored" not in stderr, \
        stderr[-3000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_tl_makes_no_deprecated_calls(tmp_path, tiny_data, wandb_home):
    import warnings

    from tl.predict import predict

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(parse_args(["--data-dir", str(tiny_data), "--epochs", "1", "--weights", "none", "--output-dir",
                          str(tmp_path / "run"), "--wandb", "offline", *FAST]))
        predict(tmp_path / "run" / "best.safetensors", [str(tiny_data / "val")], png=str(tmp_path / "p.png"))
    ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
            if issubclass(w.category, DeprecationWarning | FutureWarning) and "/tl/" in w.filename]
    assert ours == []


def test_test_accuracy_top5_and_per_class_scores_reach_wandb(tmp_path, wandb_home, base_weights):
    classes = [f"c{i}" for i in range(10)]
    data = make_imagefolder(tmp_path / "ten", classes=classes, n_train=2, n_val=1, n_test=1, size=48)
    out = tmp_path / "run"
    saved, _ = train(parse_args(["--mode", "feature-extract", "--data-dir", str(data), "--epochs", "2", "--weights",
                                 str(base_weights), "--output-dir", str(out), "--wandb", "offline", *FAST]))
    run_file = find_run_file(out)
    logged = summary(run_file)
    for key in ("test_acc", "test_top5", "val_top5"):
        assert logged[key] == saved[key], key
    assert logged["per_class_f1"] == saved["per_class_f1"] and set(logged["test_per_class_precision"]) == set(classes)
    rows = history(run_file)
    assert [r["val_top5"] for r in rows if "val_acc" in r] == [
        json.loads(line)["val_top5"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("test_confusion", {}).get("_type") == "image-file" for r in rows)
