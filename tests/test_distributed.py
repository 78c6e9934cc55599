"""Several processes on the CPU (gloo): sharding, exact evaluation counts, frozen-backbone DDP."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HYMENOPTERA_ZIP, PROXY_WEIGHTS, ROOT, make_imagefolder, run_cli
from test_checkpoint import LEVERS, MID, kill_inside_an_epoch, metrics_without_timings
from test_loop import ACCUMULATION, trained

from tl.pack import pack

BIN = Path(sys.executable).parent  # the environment running the tests


def launcher(kind):
    if kind == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", "2"]
    return [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "accelerate_configs/multi_gpu.yaml"),
            "--num_processes", "2"]


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory):
    root = make_imagefolder(tmp_path_factory.mktemp("dist") / "d", n_train=12, n_val=7)
    (root / "val" / "red" / "006.jpg").unlink()  # 13 val images: one shard gets one more
    return root


@pytest.mark.slow
def test_two_processes_see_each_image_once_and_frozen_ddp_syncs_only_the_head(tmp_path, odd_data):
    out = tmp_path / "run"
    proc = run_cli(*launcher("accelerate"), str(ROOT / "train.py"), "--mode", "feature-extract", "--data-dir",
                   str(odd_data), "--epochs", "2", "--image-size", "32", "--batch-size", "4", "--weights", "none",
                   "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and proc.stdout.count("best val acc") == 1  # main prints alone
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["train_images"], r["val_images"]) for r in rows] == [(24, 13), (24, 13)]
    assert json.loads((out / "summary.json").read_text())["num_val"] == 13
    # The frozen backbone is not synchronized, and nothing is "unused".
    assert "DDP all-reduces 2 parameter tensors (4,104 bytes) per step" in proc.stdout


@pytest.mark.slow
def test_two_processes_finetune_count_each_image_once_speak_once_and_test_once(tmp_path, odd_data):
    """torchrun, finetune: 24 train / 13 val / 7 test images over 2 processes, each counted once; one
    message per job (a skipped image, the results), the test split evaluated once with the best checkpoint."""
    from tl.predict import predict

    data = tmp_path / "d"
    shutil.copytree(odd_data, data)
    (data / "train" / "red" / "broken.jpg").write_bytes(b"not an image")
    (data / "train" / ".ipynb_checkpoints").mkdir()
    make_imagefolder(tmp_path / "t", n_train=0, n_val=4, seed=3)
    (tmp_path / "t" / "val" / "red" / "003.jpg").unlink()  # 7 test images: uneven shards
    shutil.move(tmp_path / "t" / "val", data / "test")
    out = tmp_path / "run"
    args = ["--data-dir", str(data), "--epochs", "2", "--image-size", "32", "--batch-size", "4", "--weights", "none",
            "--output-dir", str(out)]
    proc = run_cli(*launcher("torchrun"), str(ROOT / "train.py"), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and proc.stdout.count("best val acc") == 1  # main prints alone
    assert proc.stderr.count("skipping unreadable image") == 1 and proc.stdout.count("test acc") == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["train_images"], r["val_images"]) for r in rows] == [(24, 13), (24, 13)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_val"] == 13 and summary["test_total"] == 7
    assert predict(out / "best.safetensors", [str(data / "test")])["accuracy"] == summary["test_acc"]
    again = run_cli(*launcher("torchrun"), str(ROOT / "train.py"), *args)
    assert again.returncode != 0
    errors = [line for line in again.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "already holds a run" in errors[0], again.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("data_mode", ["stream", "packed"])
def test_three_processes_count_each_image_once_on_uneven_shards(tmp_path, odd_data, data_mode):
    """25 train and 13 val images over 3 processes: the sampler repeats 2 train images to give every
    process 9 steps' worth, and those repeats are neither trained on nor counted. In stream mode the
    same images from a label file (--data-file) make the same run."""
    data = tmp_path / "d"
    shutil.copytree(odd_data, data)
    (data / "train" / "blue" / "extra.jpg").write_bytes((data / "train" / "red" / "000.jpg").read_bytes())
    if data_mode == "packed":
        pack(data, tmp_path / "pack", progress=False)
        data = tmp_path / "pack"
    args = ["--data-mode", "stream", "--num-workers", "1", "--epochs", "2", "--image-size", "32", "--batch-size", "5",
            "--weights", "none"]  # 9 = 5 + 4: no batch of 1
    proc = run_cli(str(BIN / "torchrun"), "--nproc_per_node", "3", str(ROOT / "train.py"), "--data-dir", str(data),
                   "--output-dir", str(tmp_path / "run"), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics_without_timings(tmp_path / "run")
    assert [(r["train_images"], r["val_images"]) for r in rows] == [(25, 13), (25, 13)]
    if data_mode == "stream":
        images = sorted((p.relative_to(data).as_posix(), p.parent.name, p.parts[-3]) for p in data.rglob("*.jpg"))
        (tmp_path / "l.jsonl").write_text("".join(json.dumps(dict(zip(("path", "label", "split"), r))) + "\n"
                                                  for r in reversed(images)))
        labelled = run_cli(str(BIN / "torchrun"), "--nproc_per_node", "3", str(ROOT / "train.py"), "--data-file",
                           str(tmp_path / "l.jsonl"), "--data-root", str(data), "--output-dir", str(tmp_path / "l"),
                           *args)
        assert labelled.returncode == 0, labelled.stderr[-3000:]
        assert metrics_without_timings(tmp_path / "l") == rows


@pytest.mark.slow
@pytest.mark.skipif(not HYMENOPTERA_ZIP.is_file() or not PROXY_WEIGHTS.is_file(), reason="needs ../shared")
def test_three_processes_on_the_real_data_count_244_and_153(tmp_path, hymenoptera):
    """Packed and streamed (class folders streamed: the uneven-shards test above; in memory: the next one)."""
    pack(hymenoptera, tmp_path / "pack", progress=False)
    data = tmp_path / "pack"
    out = tmp_path / "run"
    proc = run_cli(str(BIN / "torchrun"), "--nproc_per_node", "3", str(ROOT / "train.py"), "--mode",
                   "feature-extract", "--feature-cache", "off", "--data-dir", str(data), "--data-mode", "stream",
                   "--num-workers", "1", "--epochs", "1", "--image-size", "64", "--weights", str(PROXY_WEIGHTS),
                   "--batch-size", "16", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((out / "metrics.jsonl").read_text())
    assert (row["train_images"], row["val_images"]) == (244, 153)


@pytest.mark.slow
@pytest.mark.skipif(not HYMENOPTERA_ZIP.is_file() or not PROXY_WEIGHTS.is_file(), reason="needs ../shared")
def test_two_processes_on_the_real_data_count_153_val_images(tmp_path, hymenoptera):
    out = tmp_path / "run"
    proc = run_cli(*launcher("accelerate"), str(ROOT / "train.py"), "--mode", "feature-extract",
                   "--data-dir", str(hymenoptera), "--epochs", "1", "--image-size", "64", "--weights",
                   str(PROXY_WEIGHTS), "--batch-size", "16", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((out / "metrics.jsonl").read_text())
    assert (row["train_images"], row["val_images"]) == (244, 153)


@pytest.mark.slow
def test_a_diverging_loss_stops_every_process_with_one_line(tmp_path, odd_data):
    out = tmp_path / "run"
    proc = run_cli(*launcher("torchrun"), str(ROOT / "train.py"), "--data-dir", str(odd_data), "--epochs", "3",
                   "--image-size", "32", "--batch-size", "4", "--weights", "none", "--lr", "1e30",
                   "--output-dir", str(out), timeout=300)  # before: one rank raised, the other hung
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "the loss became non-finite" in errors[0], proc.stderr[-3000:]


@pytest.mark.slow
def test_every_lever_resumes_exactly_at_two_processes(tmp_path):
    """torchrun, 2 processes, 2 workers each, every accuracy lever (test_checkpoint's LEVERS): SIGKILL of the
    whole job inside an epoch, then --resume gives the uninterrupted job's metrics and best.safetensors.
    (LoRA's: exact at one process in test_checkpoint; its two processes' steps are DDP's, in test_sharding.)"""
    # 22 steps a process: one save inside, at step 18 (--accumulate 3: saves fall on cycle ends)
    data = make_imagefolder(tmp_path / "d", n_train=44, n_val=5, size=40)
    (data / "train" / "red" / "000.jpg").unlink()  # 87 images: one rank's last batch mixes a repeated image
    args = [str(ROOT / "train.py"), "--data-dir", str(data), *MID, *LEVERS, "--batch-size", "2"]
    ref = run_cli(*launcher("torchrun"), *args, "--output-dir", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "run"
    job = subprocess.Popen([sys.executable, *launcher("torchrun"), *args, "--output-dir", str(out), "--save-every",
                            "0.0001"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    kill_inside_an_epoch(job, out, kill=lambda job: os.killpg(job.pid, signal.SIGKILL))  # torchrun and its ranks
    resumed = run_cli(*launcher("torchrun"), *args, "--output-dir", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert metrics_without_timings(out) == metrics_without_timings(tmp_path / "ref")
    assert (out / "best.safetensors").read_bytes() == (tmp_path / "ref" / "best.safetensors").read_bytes()


def test_two_processes_accumulating_give_the_large_batchs_weights(tmp_path, sixty_four):
    """2 processes x batch 4 x --accumulate 4 = one process x batch 32: the same 32 images per optimizer step
    (DistributedSampler's strided shards of one permutation), DDP averaging the two halves' gradients."""
    big, two = tmp_path / "big", tmp_path / "two"
    one = run_cli("train.py", "--data-dir", sixty_four, "--output-dir", big, *ACCUMULATION, "--batch-size", "32")
    assert one.returncode == 0, one.stderr[-2000:]
    proc = run_cli(*launcher("torchrun"), str(ROOT / "train.py"), "--data-dir", str(sixty_four), "--output-dir",
                   str(two), *ACCUMULATION, "--batch-size", "4", "--accumulate", "4", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference, weights = trained(big), trained(two)
    worst = max((weights[k] - reference[k]).abs().max().item() for k in weights)
    assert weights.keys() == reference.keys() and worst < 1e-5, worst
