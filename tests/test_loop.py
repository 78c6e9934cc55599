"""Both scenarios end to end on generated data: they learn, write their files, freeze what they must."""

import json
import os

import pytest
import torch
from conftest import FAST, HYMENOPTERA_ZIP, PROXY_WEIGHTS, run_cli
from PIL import Image
from safetensors.torch import load_file

from tl.core.config import parse_args
from tl.inference.trained import load_model
from tl.predict import predict
from tl.runs import checkpoints
from tl.train.loop import train


def run(tmp_path, data, mode, *extra, epochs=8):
    out = tmp_path / mode
    cfg = parse_args(["--mode", mode, "--data-dir", str(data), "--epochs", str(epochs), "--lr", "0.01",
                      "--output-dir", str(out), *FAST, *extra])
    summary, model = train(cfg)
    return out, summary, model


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["finetune", "feature-extract"])
def test_mode_learns_and_writes_every_output(tmp_path, tiny_data, base_weights, mode):
    out, summary, _ = run(tmp_path, tiny_data, mode, "--weights", str(base_weights))
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == list(range(1, 9))
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert summary["best_val_acc"] == max(r["val_acc"] for r in rows) >= 0.9
    assert rows[summary["best_epoch"] - 1]["val_acc"] == summary["best_val_acc"]
    assert rows[7]["lr"] == pytest.approx(0.001)  # StepLR: x0.1 after 7 epochs

    saved = json.loads((out / "summary.json").read_text())
    assert saved["num_train"] == 24 and saved["num_val"] == 12 and saved["classes"] == ["blue", "red"]
    assert saved["best_val_acc"] == summary["best_val_acc"] and saved["total_seconds"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["mode"] == mode and config["epochs"] == 8 and config["weights"] == str(base_weights)
    with Image.open(out / "predictions.png") as img:
        assert img.width > 400 and img.height > 200
    meta = checkpoints.read_metadata(out / "best.safetensors")
    assert meta["mode"] == mode and meta["model"] == "resnet18"
    assert meta["classes"] == ["blue", "red"]
    assert meta["base_weights"].startswith("sha256:")


@pytest.mark.parametrize("cache", ["on", "off"])
def test_feature_extract_freezes_backbone_and_saves_only_the_head(tmp_path, tiny_data, base_weights, cache):
    out, _, model = run(tmp_path, tiny_data, "feature-extract", "--weights", str(base_weights),
                        "--feature-cache", cache)
    base = torch.load(base_weights, weights_only=True)
    trained = model.state_dict()
    backbone = [k for k in base if not k.startswith("fc.")]
    assert len(backbone) > 100  # weights and every BatchNorm buffer
    for k in backbone:
        assert torch.equal(trained[k], base[k]), f"{k} changed"
    assert not torch.equal(trained["fc.weight"][:, :8], torch.zeros(2, 8))
    head = load_file(out / "best.safetensors")
    assert set(head) == {"fc.weight", "fc.bias"} and head["fc.weight"].shape == (2, 512)
    assert (out / "best.safetensors").stat().st_size < 10_000


def test_finetune_checkpoint_reloads_to_the_same_val_accuracy(tmp_path, tiny_data):
    out, summary, _ = run(tmp_path, tiny_data, "finetune", "--weights", "none")
    tensors = load_file(out / "best.safetensors")
    assert all(v.dtype in (torch.float32, torch.int64) for v in tensors.values())
    model, meta = load_model(out / "best.safetensors")
    assert torch.equal(model.state_dict()["layer1.0.bn1.running_mean"], tensors["layer1.0.bn1.running_mean"])
    result = predict(out / "best.safetensors", [str(tiny_data / "val")])
    assert result["accuracy"] == summary["best_val_acc"] == meta["val_acc"]


@pytest.mark.slow
def test_smaller_train_crops_still_validate_at_image_size(tmp_path, tiny_data, base_weights):
    proc = run_cli("train.py", "--mode", "finetune", "--data-dir", str(tiny_data), "--epochs", "8", "--lr", "0.01",
                   "--weights", str(base_weights), "--output-dir", str(tmp_path / "out"), *FAST, "--train-size", "48")
    assert proc.returncode == 0, proc.stderr
    assert "(48 px train crops, 64 px val; the tutorial's preprocessing)" in proc.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["best_val_acc"] >= 0.9
    meta = checkpoints.read_metadata(tmp_path / "out" / "best.safetensors")
    assert meta["image_size"] == 64  # what predict evaluates at, as the loop did
    assert predict(tmp_path / "out" / "best.safetensors", [str(tiny_data / "val")])["accuracy"] == meta["val_acc"]


@pytest.mark.slow
@pytest.mark.skipif(not HYMENOPTERA_ZIP.is_file() or not PROXY_WEIGHTS.is_file(), reason="needs ../shared")
@pytest.mark.parametrize("mode", ["feature-extract", "finetune"])
def test_real_data_from_the_command_line(tmp_path, hymenoptera, mode):
    out = tmp_path / "run"
    proc = run_cli("train.py", "--mode", mode, "--epochs", "1", "--data-dir", str(hymenoptera),
                   "--weights", str(PROXY_WEIGHTS), "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("config.json", "metrics.jsonl", "summary.json", "best.safetensors", "predictions.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["num_train"], summary["num_val"]) == (244, 153)  # the GIF is not an image set member
    assert summary["classes"] == ["ants", "bees"] and 0.4 <= summary["best_val_acc"] <= 1
    assert summary["best_val_acc"] == summary["val_correct"] / 153  # the exact ratio, not a float32 mean
    assert all(r["val_acc"] * 153 == round(r["val_acc"] * 153) for r in
               map(json.loads, (out / "metrics.jsonl").read_text().splitlines()))
    size = (out / "best.safetensors").stat().st_size
    assert size < 100_000 if mode == "feature-extract" else size > 40_000_000
    proc = run_cli("-m", "tl.predict", "--checkpoint", str(out / "best.safetensors"), "--weights",
                   str(PROXY_WEIGHTS), str(hymenoptera / "val"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == f"accuracy {summary['best_val_acc']:.4f} " \
        f"({round(summary['best_val_acc'] * 153)}/153)"


@pytest.mark.slow
def test_compile_trains_and_a_resume_keeps_the_choice(tmp_path, tiny_data):
    out = tmp_path / "run"
    args = ["--mode", "feature-extract", "--data-dir", str(tiny_data), "--output-dir", str(out), "--epochs", "2",
            "--weights", "none", "--lr", "0.01", *FAST]
    proc = run_cli("train.py", *args, "--compile")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["recipe"]["compile"] is True
    again = run_cli("train.py", *args, "--epochs", "3", "--resume")
    assert again.returncode == 2 and "--compile (False, not True)" in again.stderr, again.stderr[-2000:]


@pytest.mark.slow
def test_streaming_gives_the_same_run_as_decoding_into_memory(tmp_path, tiny_data):
    outs = {}
    for mode in ("memory", "stream"):
        outs[mode] = tmp_path / mode
        proc = run_cli("train.py", "--data-dir", str(tiny_data), "--output-dir", str(outs[mode]), "--epochs", "3",
                       "--weights", "none", "--data-mode", mode, *FAST)
        assert proc.returncode == 0, proc.stderr[-2000:]
        workers = 0 if mode == "memory" else len(os.sched_getaffinity(0))
        assert f"data: {mode} (--data-mode {mode}; " in proc.stdout and f"{workers} DataLoader worker(s)" in proc.stdout

    def rows(out):
        return [{k: v for k, v in r.items() if k not in ("seconds", "train_images_per_s")} for r in read_metrics(out)]
    assert rows(outs["memory"]) == rows(outs["stream"])
    assert (outs["memory"] / "best.safetensors").read_bytes() == (outs["stream"] / "best.safetensors").read_bytes()


def test_auto_data_mode_streams_what_would_not_fit(tmp_path):
    from tl.data.listing import Listing
    from tl.data.preprocess import Preprocess
    from tl.data.splits import choose_data_mode

    small = Listing(["a", "b"], [("x", 0)] * 244, [("y", 1)] * 153, "sha256:0")
    mode, why = choose_data_mode("auto", small, Preprocess.tutorial(224), 1)
    assert mode == "memory" and why.startswith("auto: at most 0.") and "GiB available" in why
    imagenet = Listing(["a", "b"], [("x", 0)] * 1_281_167, [("y", 1)] * 50_000, "sha256:0")
    assert choose_data_mode("auto", imagenet, Preprocess.tutorial(224), 8)[0] == "stream"
    assert choose_data_mode("memory", imagenet, Preprocess.tutorial(224), 8)[0] == "memory"  # asked for: honoured


@pytest.mark.slow
def test_a_packed_set_trains_exactly_like_its_folder_in_both_data_modes(tmp_path, tiny_data):
    pack = tmp_path / "pack"
    assert run_cli("-m", "tl.pack", str(tiny_data), str(pack)).returncode == 0
    outs = {}
    for name, data, mode in [("folder", tiny_data, "memory"), ("memory", pack, "memory"), ("stream", pack, "stream")]:
        outs[name] = tmp_path / name
        proc = run_cli("train.py", "--data-dir", str(data), "--output-dir", str(outs[name]), "--epochs", "2",
                       "--weights", "none", "--data-mode", mode, *FAST)
        assert proc.returncode == 0, proc.stderr[-2000:]

    def rows(out):
        return [{k: v for k, v in r.items() if k not in ("seconds", "train_images_per_s")} for r in read_metrics(out)]
    assert rows(outs["folder"]) == rows(outs["memory"]) == rows(outs["stream"])
    assert len({(outs[n] / "best.safetensors").read_bytes() for n in outs}) == 1
    # The pack's fingerprint is its folder's: a run started on one resumes on the other.
    more = run_cli("train.py", "--data-dir", str(pack), "--output-dir", str(outs["folder"]), "--epochs", "3",
                   "--weights", "none", *FAST, "--resume")
    assert more.returncode == 0 and "resuming after epoch 2" in more.stdout, more.stderr[-2000:]


# A model without BatchNorm (LayerNorm only, no dropout): accumulated micro-batches equal one large batch.
ACCUMULATION = ["--model", "timm/test_vit", "--weights", "none", "--image-size", "160", "--epochs", "1",
                "--precision", "no", "--lr", "0.05", "--wandb", "disabled", "--num-workers", "0"]


def trained(out) -> dict[str, torch.Tensor]:
    return load_file(out / "best.safetensors")


def test_accumulation_gives_the_large_batchs_weights(tmp_path, sixty_four):
    """batch 8 x --accumulate 4 = batch 32: two optimizer steps over the same 64 images, the same weights up
    to float summation order; with --grad-checkpointing too (the same loss and gradients)."""
    big, small, ckpt = (tmp_path / n for n in ("big", "small", "ckpt"))
    for out, extra in ((big, ["--batch-size", "32"]), (small, ["--batch-size", "8", "--accumulate", "4"]),
                       (ckpt, ["--batch-size", "8", "--accumulate", "4", "--grad-checkpointing"])):
        proc = run_cli("train.py", "--data-dir", sixty_four, "--output-dir", out, *ACCUMULATION, *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
    reference = trained(big)
    for out in (small, ckpt):
        weights = trained(out)
        assert weights.keys() == reference.keys()
        worst = max((weights[k] - reference[k]).abs().max().item() for k in weights)
        assert worst < 1e-5, (out.name, worst)
    config = json.loads((small / "config.json").read_text())
    assert config["accumulate"] == 4 and config["recipe"]["accumulate"] == 4
    assert "accumulate" not in json.loads((big / "config.json").read_text())["recipe"]  # a default run: as before
    rows = [json.loads(line) for line in (small / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["train_images"] == 64
