"""The catalogue of bad input and faults (README, Troubleshooting), end to end from the command line.

Entries tested closer to their module live there too: bad data dirs and downloads in test_data.py,
weights in test_model.py, checkpoints and Ctrl-C in test_checkpoint.py, flags in test_config.py.
"""

import json
import random
import shutil
import signal
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, make_imagefolder, one_line_error, run_cli, spawn
from PIL import Image

SMALL = ["--epochs", "1", "--image-size", "32", "--batch-size", "4", "--weights", "none"]



def test_every_image_mode_trains_and_non_ascii_names_work(tmp_path):
    root = make_imagefolder(tmp_path / "d", classes=("äpfel", "日本"), n_train=2, n_val=1)
    rgb = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    folder = root / "train" / "äpfel"
    Image.fromarray(rgb).convert("L").save(folder / "grau ß.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(folder / "sixteen.png")
    assert Image.open(folder / "sixteen.png").mode.startswith("I")
    out = tmp_path / "run"
    proc = run_cli("train.py", "--data-dir", str(root), "--output-dir", str(out), *SMALL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning" not in proc.stderr  # no glyph-by-glyph font noise for 日本 either
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads((out / "metrics.jsonl").read_text())["train_images"] == 8  # 9 % 4 == 1: one left out
    assert summary["num_train"] == 9 and summary["skipped_images"] == [] and summary["classes"] == ["äpfel", "日本"]


@pytest.fixture
def broken_data(tmp_path):
    root = make_imagefolder(tmp_path / "d", n_train=3, n_val=1)
    good = (root / "train" / "red" / "000.jpg").read_bytes()
    (root / "train" / "red" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "train" / "red" / "empty.jpg").write_bytes(b"")
    (root / "train" / "blue" / "notes.jpg").write_text("this is a text file")
    Image.new("1", (15000, 13000)).save(root / "train" / "blue" / "bomb.png")  # 195 MP: over PIL's limit
    return root


@pytest.mark.slow
def test_unreadable_images_are_skipped_counted_or_fatal_with_a_flag(tmp_path, broken_data):
    out = tmp_path / "run"
    proc = run_cli("train.py", "--data-dir", str(broken_data), "--output-dir", str(out), *SMALL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    skipped = sorted(p.rsplit("/", 1)[1] for p in json.loads((out / "summary.json").read_text())["skipped_images"])
    assert skipped == ["bomb.png", "empty.jpg", "notes.jpg", "truncated.jpg"]
    assert proc.stderr.count("skipping unreadable image") == 4
    strict = run_cli("train.py", "--data-dir", str(broken_data), "--output-dir", str(tmp_path / "strict"),
                     "--strict-images", *SMALL)
    one_line_error(strict, "unreadable image", "--strict-images")


@pytest.mark.slow
def test_fewer_images_than_the_batch_and_than_the_processes(tmp_path):
    root = make_imagefolder(tmp_path / "d", n_train=2, n_val=1)  # 2 val images for 3 processes
    out = tmp_path / "run"
    proc = run_cli(str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "3", str(ROOT / "train.py"),
                   "--data-dir", str(root), "--output-dir", str(out), *SMALL, "--batch-size", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((out / "metrics.jsonl").read_text())
    assert (row["train_images"], row["val_images"]) == (4, 2)  # padded to 2 per process; the repeats not counted


def zip_of(tmp_path, name, entries):
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as z:
        for arcname, data in entries:
            z.writestr(arcname, data)
    return path


@pytest.mark.parametrize("case, message", [
    ("truncated", "is not a readable zip"),
    ("corrupted", "fails its checksum"),
    ("traversal", "point outside the folder"),
])
def test_bad_zips_are_refused_and_write_nothing(tmp_path, case, message):
    image = (make_imagefolder(tmp_path / "src", n_train=1, n_val=1) / "train" / "red" / "000.jpg").read_bytes()
    entries = [(f"bugs/{split}/{c}/0.jpg", image) for split in ("train", "val") for c in ("a", "b")]
    if case == "traversal":
        entries.append(("bugs/../../evil.txt", b"gotcha"))
    archive = zip_of(tmp_path, "bugs.zip", entries)
    data = archive.read_bytes()
    if case == "truncated":
        archive.write_bytes(data[: len(data) // 2])
    elif case == "corrupted":
        i = data.index(image[100:120])  # flip bytes inside a stored member
        archive.write_bytes(data[:i] + bytes(b ^ 0xFF for b in data[i:i + 20]) + data[i + 20:])
    work = tmp_path / "work"
    proc = run_cli("train.py", "--data-dir", str(work / "data" / "bugs"), "--data-zip", str(archive),
                   "--output-dir", str(work / "run"), *SMALL)
    one_line_error(proc, message)
    assert not (tmp_path / "evil.txt").exists() and not (work / "evil.txt").exists()
    assert list((work / "data").iterdir()) == []  # no half-extracted data set left behind


@pytest.mark.parametrize("where", ["output", "data"])
def test_unwritable_places_are_one_line_errors(tmp_path, tiny_data, where):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should go")
    args = {"output": ["--data-dir", str(tiny_data), "--output-dir", str(blocker / "run")],
            "data": ["--data-dir", str(blocker / "d" / "bugs"), "--data-zip", str(blocker),
                     "--output-dir", str(tmp_path / "run")]}[where]
    proc = run_cli("train.py", *args, *SMALL)
    one_line_error(proc, "cannot create", "writable")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_weights_are_one_line_errors(tmp_path, tiny_data, base_weights, suffix):
    import torch
    from safetensors.torch import save_file

    full = tmp_path / f"w{suffix}"
    state = torch.load(base_weights, weights_only=True)
    save_file(state, full) if suffix == ".safetensors" else torch.save(state, full)
    full.write_bytes(full.read_bytes()[:100_000])
    proc = run_cli("train.py", "--data-dir", str(tiny_data), "--weights", str(full),
                   "--output-dir", str(tmp_path / "run"), *SMALL[:4])
    one_line_error(proc, "cannot be read", "complete state dict")


def test_a_diverging_loss_stops_the_run_naming_epoch_and_step(tmp_path, tiny_data):
    out = tmp_path / "run"
    proc = run_cli("train.py", "--data-dir", str(tiny_data), "--output-dir", str(out), *SMALL,
                   "--epochs", "5", "--lr", "1e30")
    one_line_error(proc, "the loss became", "at epoch ", ", step ", "lower --lr")
    assert not (out / "summary.json").exists()


@pytest.mark.slow
def test_ten_sigkills_at_random_moments_each_resumed_end_like_an_uninterrupted_run(tmp_path, tiny_data):
    # More epochs (~8 ms each) than ten attempts of at most 30 epochs each can reach: none finishes the run.
    args = ["--mode", "feature-extract", "--data-dir", str(tiny_data), "--epochs", "400", "--image-size", "48",
            "--weights", "none", "--lr", "0.01"]
    ref = tmp_path / "ref"
    assert run_cli("train.py", *args, "--output-dir", str(ref)).returncode == 0
    out = tmp_path / "killed"
    rng = random.Random(0)
    target = 0
    for attempt in range(10):
        proc = spawn("train.py", *args, "--output-dir", out, *(["--resume"] if attempt else []))
        # Killed as a seeded number of new epoch rows appears (an event, not a time, so machine speed
        # never decides whether a kill lands): mid-epoch, mid-save or between them; never near the end.
        target += rng.randint(1, 30)
        deadline = time.time() + 300
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= target):
            assert proc.poll() is None and time.time() < deadline, f"attempt {attempt}: {proc.stderr_text()[-2000:]}"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        target = len(metrics.read_text().splitlines())  # rows a kill cut off are written again
    final = run_cli("train.py", *args, "--output-dir", str(out), "--resume")
    assert final.returncode == 0, final.stderr[-2000:]

    def rows(d):
        return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "train_images_per_s")}
                for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows(out) == rows(ref)
    assert (out / "best.safetensors").read_bytes() == (ref / "best.safetensors").read_bytes()
    shutil.rmtree(out)


@pytest.mark.slow
def test_make_train_cpus_launcher_offline_fails_fast_with_one_line_and_no_traceback(tmp_path, tiny_data):
    """What a new user meets: `make train-cpu` on a node without internet and no cached weights."""
    out = tmp_path / "run"
    proc = run_cli(str(Path(sys.executable).parent / "accelerate"), "launch", "--quiet", "--config_file",
                   str(ROOT / "accelerate_configs" / "cpu.yaml"), str(ROOT / "train.py"), "--data-dir",
                   str(tiny_data), "--output-dir", str(out), "--epochs", "1",
                   env={"TORCH_HOME": str(tmp_path / "torch"), "https_proxy": "http://127.0.0.1:9",
                        "HTTPS_PROXY": "http://127.0.0.1:9"})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "could not download" in errors[0] and "--weights" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "CalledProcessError" not in proc.stderr
    assert "decode" not in proc.stderr  # the weights are checked before the slow decoding
    assert not out.exists()  # a failed start leaves no empty run dir


@pytest.mark.slow
def test_feature_extract_on_a_random_backbone_says_so(tmp_path, tiny_data):
    proc = run_cli("train.py", "--mode", "feature-extract", "--data-dir", str(tiny_data), "--output-dir",
                   str(tmp_path / "run"), *SMALL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("warning: feature-extract with --weights none trains a head on a frozen random") == 1


@pytest.mark.slow
def test_streaming_skips_unreadable_headers_and_names_a_file_that_breaks_later(tmp_path, tiny_data):
    root = tmp_path / "d"
    shutil.copytree(tiny_data, root)
    (root / "train" / "blue" / "notes.jpg").write_text("this is a text file")  # fails the signature check
    (root / "val" / "red" / "empty.png").write_bytes(b"")
    args = ["--data-dir", str(root), "--data-mode", "stream", "--num-workers", "2", *SMALL]
    proc = run_cli("train.py", *args, "--output-dir", str(tmp_path / "ok"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("skipping unreadable image") == 2
    assert [Path(p).name for p in json.loads((tmp_path / "ok" / "summary.json").read_text())["skipped_images"]] == \
        ["notes.jpg", "empty.png"]
    good = (root / "train" / "red" / "000.jpg").read_bytes()
    (root / "train" / "red" / "001.jpg").write_bytes(good[: len(good) // 3])  # a header, then nothing
    broken = run_cli("train.py", *args, "--output-dir", str(tmp_path / "broken"))
    one_line_error(broken, "unreadable image", "001.jpg", "while streaming", "--data-mode memory", "tl.pack")
