"""Prediction from a checkpoint alone (plus the base weights for feature-extract)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST, ROOT, make_imagefolder, one_line_error, one_line_stop, run_cli, spawn
from PIL import Image

from tl.core.config import parse_args
from tl.core.errors import UserError
from tl.inference.predictions import Output, read_progress
from tl.predict import predict
from tl.train.loop import train


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
    assert len(lines) == 12 + 2  # the image, the rest of the val folder (not the image again), accuracy, png
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
    # without --weights the recorded file is used (test_a_head_checkpoint_uses_the_base_weights_file_...)
    proc = run_cli("-m", "tl.predict", "--checkpoint", str(runs["finetune"] / "best.safetensors"), "nope.jpg")
    assert proc.returncode == 2 and proc.stderr.startswith("error: nope.jpg does not exist")


# --------------------------------------------------------------------------- --out: any number of images

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # every process computes alike (the probabilities are compared byte for byte)


def predict_out(ckpt, out, *args, cwd=None, env=None):
    return run_cli("-m", "tl.predict", "--checkpoint", ckpt, "--out", out, *args, env={**ONE_THREAD, **(env or {})},
                   **({"cwd": cwd} if cwd else {}))


def shards(ckpt, out, n, *args):
    """n processes at once, each --shard k/n: the last to finish merges."""
    procs = [spawn("-m", "tl.predict", "--checkpoint", ckpt, "--out", out, "--shard", f"{k}/{n}", *args,
                   env=ONE_THREAD) for k in range(n)]
    for p in procs:
        out_text, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    return out_text


@pytest.fixture(scope="module")
def reference(runs, tiny_data, tmp_path_factory):
    """One process over the val folder: batches of 2, so 3 processes get 2 batches each."""
    out = tmp_path_factory.mktemp("reference") / "predictions.csv"
    proc = predict_out(runs["finetune"] / "best.safetensors", out, "--batch-size", "2", tiny_data / "val")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc


def test_out_over_val_writes_rows_and_the_run_s_metrics(runs, reference):
    out, proc = reference
    summary = json.loads((runs["finetune"] / "summary.json").read_text())
    lines = out.read_text().splitlines()
    assert lines[0] == "path,class_1,prob_1,class_2,prob_2,label" and len(lines) == 13
    assert all(re.fullmatch(r"\S+\.jpg,(blue|red),\d\.\d{6},(blue|red),\d\.\d{6},(blue|red)", line)
               for line in lines[1:]), lines
    metrics = json.loads(out.with_name("predictions.metrics.json").read_text())
    assert metrics["accuracy"] == summary["best_val_acc"] and metrics["rows"] == 12
    assert f"accuracy {summary['best_val_acc']:.4f}" in proc.stdout and "balanced accuracy" in proc.stdout
    assert "confusion matrix" in proc.stdout
    assert not out.with_name("predictions.csv.parts").exists()


@pytest.mark.parametrize("n", [2, 3])
def test_processes_write_what_one_process_writes(runs, tiny_data, reference, tmp_path, n):
    out = tmp_path / "predictions.csv"
    shards(runs["finetune"] / "best.safetensors", out, n, "--batch-size", "2", tiny_data / "val")
    assert out.read_bytes() == reference[0].read_bytes()
    assert not (tmp_path / "predictions.csv.parts").exists()


def test_torchrun_and_jsonl(runs, tiny_data, reference, tmp_path):
    out = tmp_path / "p.jsonl"
    proc = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "-m", "tl.predict",
                           "--checkpoint", str(runs["finetune"] / "best.safetensors"), "--out", str(out),
                           "--batch-size", "2", str(tiny_data / "val")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **ONE_THREAD}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    csv_rows = [line.split(",") for line in reference[0].read_text().splitlines()[1:]]
    assert [[r["path"], r["classes"][0], f"{r['probs'][0]:.6f}", r["label"]] for r in rows] == \
        [[c[0], c[1], c[2], c[5]] for c in csv_rows]
    assert "accuracy" in proc.stdout


def wait_for_commit(proc, progress, after=0):
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        state = read_progress(progress)
        if state and state["images"] > after:
            return state
        time.sleep(0.005)
    raise AssertionError(f"no commit past {after} images")


def test_stopped_and_killed_prediction_resumes_without_a_row_twice(runs, tmp_path):
    """300 images in 150 batches; a commit after the first batch of each start: a stop signal and a SIGKILL
    land well before the end (the test polls every 5 ms; the rest of the batches take seconds), and the
    resumed file equals an uninterrupted run's."""
    data = make_imagefolder(tmp_path / "big", n_train=1, n_val=150, size=64)
    ckpt, args = runs["finetune"] / "best.safetensors", ["--batch-size", "2", "--num-workers", "0", data / "val"]
    ref = tmp_path / "ref.csv"
    assert predict_out(ckpt, ref, *args).returncode == 0
    out = tmp_path / "p.csv"
    progress = tmp_path / "p.csv.parts" / "part-00000-of-00001.json"
    proc = spawn("-m", "tl.predict", "--checkpoint", ckpt, "--out", out, *args, env=ONE_THREAD)
    wait_for_commit(proc, progress)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    one_line_stop(subprocess.CompletedProcess([], proc.returncode, stdout, stderr), signal.SIGTERM,
                  "stopped by SIGTERM", "run the same command again to continue")
    stopped = read_progress(progress)
    assert 0 < stopped["images"] < 300 and not stopped["done"]
    proc = spawn("-m", "tl.predict", "--checkpoint", ckpt, "--out", out, *args, env=ONE_THREAD)
    wait_for_commit(proc, progress, stopped["images"])
    proc.kill()  # right after the resumed run's first commit; a hundred-odd batches to go
    proc.wait(30)
    assert not read_progress(progress)["done"] and not out.exists()
    with open(progress.with_suffix(".csv"), "ab") as f:  # rows written after the last commit, as a kill leaves them
        f.write(b"uncommitted,row\n")
    again = predict_out(ckpt, out, *args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert out.read_bytes() == ref.read_bytes()
    paths = [line.split(",")[0] for line in out.read_text().splitlines()[1:]]
    assert len(paths) == len(set(paths)) == 300


def test_full_disk_keeps_what_was_committed(runs, tiny_data, reference, tmp_path, monkeypatch):
    import errno

    import tl.inference.predictions

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "predictions.csv"
    monkeypatch.setattr(tl.inference.predictions.os, "fsync", full)
    with pytest.raises(UserError, match="is full; the 0 images committed are kept: run the same command again"):
        predict(runs["finetune"] / "best.safetensors", [str(tiny_data / "val")], batch_size=2, out=out, workers=0)
    monkeypatch.undo()
    predict(runs["finetune"] / "best.safetensors", [str(tiny_data / "val")], batch_size=2, out=out, workers=0)
    assert out.read_bytes() == reference[0].read_bytes()


def test_rerun_is_done_another_job_is_refused(runs, tiny_data, reference, tmp_path):
    ckpt = runs["finetune"] / "best.safetensors"
    out = tmp_path / "predictions.csv"
    shutil.copy(reference[0], out)
    shutil.copy(reference[0].with_name("predictions.metrics.json"), tmp_path)
    same = predict_out(ckpt, out, "--batch-size", "2", tiny_data / "val")
    assert same.returncode == 0 and "nothing to do" in same.stdout and "accuracy" in same.stdout
    other = predict_out(ckpt, out, "--batch-size", "2", "--top-k", "1", tiny_data / "val")
    one_line_error(other, "holds another prediction", "--overwrite")
    assert out.read_bytes() == reference[0].read_bytes()
    replaced = predict_out(ckpt, out, "--batch-size", "2", "--top-k", "1", "--overwrite", tiny_data / "val")
    assert replaced.returncode == 0 and out.read_text().splitlines()[0] == "path,class_1,prob_1,label"
    one_line_error(predict_out(ckpt, out, "--shard", "3/3", tiny_data / "val"), "--shard 3/3", "0 <= K < N")
    one_line_error(predict_out(ckpt, tmp_path / "no" / "p.csv", tiny_data / "val"), "does not exist")


def test_unreadable_image_is_skipped_and_listed(runs, tiny_data, tmp_path):
    val = shutil.copytree(tiny_data / "val", tmp_path / "val")
    (val / "red" / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "p.jsonl"
    proc = predict_out(runs["finetune"] / "best.safetensors", out, val)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(out.read_text().splitlines()) == 12 and "1 unreadable images skipped" in proc.stdout
    assert (tmp_path / "p.skipped.txt").read_text() == f"{val / 'red' / 'broken.jpg'}\n"


def test_pack_input_gives_the_folder_s_rows(runs, tiny_data, reference, tmp_path):
    assert run_cli("-m", "tl.pack", tiny_data, tmp_path / "pack").returncode == 0
    out = tmp_path / "p.csv"
    proc = predict_out(runs["finetune"] / "best.safetensors", out, "--batch-size", "2", tmp_path / "pack")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split(",") for line in out.read_text().splitlines()]
    assert rows[1][0] == f"{tmp_path / 'pack' / 'val-000000.tar'}#00000000"
    assert [r[1:] for r in rows] == [line.split(",")[1:] for line in reference[0].read_text().splitlines()]


@pytest.mark.slow
def test_exports_predict_the_checkpoint_s_classes(runs, tiny_data, reference, tmp_path):
    from tl.export import export

    for kind in ("onnx", "torchscript"):
        model = tmp_path / f"m.{'onnx' if kind == 'onnx' else 'torchscript.pt'}"
        export(runs["finetune"] / "best.safetensors", kind, output=model, check_parity=False)
        out = tmp_path / f"{kind}.csv"
        assert predict_out(model, out, "--batch-size", "2", tiny_data / "val").returncode == 0
        assert [line.split(",")[1] for line in out.read_text().splitlines()] == \
            [line.split(",")[1] for line in reference[0].read_text().splitlines()]


def test_jobs_of_other_process_counts_on_one_out_leave_each_other_alone(tmp_path):
    """Three processes started together on one --out: `--shard 0/2`, `--shard 1/2` and a plain one (all pass
    their checks before any part exists). The two-process job merges first; it removes only its own parts,
    so the plain process goes on committing, and at its end finds OUT complete and removes its part."""
    out, job = tmp_path / "p.csv", {"model": "sha256:x", "images": "sha256:y"}
    summarize = lambda f: {"rows": Path(f).read_bytes().count(b"\n") - 1}  # noqa: E731
    outputs = [(Output(out, job, "csv"), k, n) for k, n in ((0, 2), (1, 2), (0, 1))]
    for output, k, n in outputs:
        output.check(k, n, overwrite=False)
    parts = [output.open_part(k, n) for output, k, n in outputs]
    parts[2].append(b"a.jpg,red\n", 1, [])
    parts[2].commit()
    merged = []
    for part, (output, k, _) in zip(parts[:2], outputs[:2]):
        part.append(f"{k}.jpg,red\n".encode(), 1, [])
        part.commit(done=True)
        part.close()
        merged.append(output.merge(2, 1, False, summarize))
    assert merged[0] is None and merged[1]["rows"] == 2  # the last of the job's processes to finish merges
    assert sorted(p.name for p in (tmp_path / "p.csv.parts").iterdir()) == [
        "merge.lock", "part-00000-of-00001.csv", "part-00000-of-00001.json"]
    parts[2].append(b"b.jpg,red\n", 1, [])
    parts[2].commit(done=True)  # was: cannot write .../part-00000-of-00001.json (No such file or directory)
    parts[2].close()
    assert outputs[2][0].merge(1, 1, False, summarize) is None and outputs[2][0].finished()
    assert not (tmp_path / "p.csv.parts").exists() and out.read_text().count("\n") == 3


def test_a_merge_that_waited_while_another_process_merged_and_removed_the_parts_returns_quietly(tmp_path):
    """Two processes of a job finish at once: both open merge.lock, one merges and removes the parts folder, the
    other then gets the lock, finds OUT complete and removes its parts: none left, and no error (it was
    FileNotFoundError, failing one task of a SLURM array now and then)."""
    out, job = tmp_path / "p.csv", {"model": "sha256:x", "images": "sha256:y"}
    output = Output(out, job, "csv")
    output.check(0, 2, overwrite=False)
    output.open_part(0, 2).close()
    shutil.rmtree(tmp_path / "p.csv.parts")  # what the merging process did meanwhile
    output._remove_parts(2)
    assert not (tmp_path / "p.csv.parts").exists()


def test_a_part_whose_folder_was_removed_says_what_happened(tmp_path):
    output = Output(tmp_path / "p.csv", {"model": "sha256:x"}, "csv")
    output.check(0, 1, overwrite=False)
    part = output.open_part(0, 1)
    part.append(b"a.jpg,red\n", 1, [])
    shutil.rmtree(tmp_path / "p.csv.parts")
    with pytest.raises(UserError, match="was removed while it ran: another tl.predict on the same --out") as e:
        part.commit()
    assert "--resume" not in str(e.value)
    part.close()


def test_a_head_checkpoint_uses_the_base_weights_file_its_run_recorded(runs, tiny_data, base_weights, tmp_path):
    """Without --weights, the recorded base file is used when it is still there with the same sha256."""
    head = runs["feature-extract"] / "best.safetensors"
    proc = run_cli("-m", "tl.predict", "--checkpoint", head, tiny_data / "val")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"base weights: {base_weights}, the file the run recorded (its sha256 matches)" in proc.stderr
    assert predict(head, [str(tiny_data / "val")])["accuracy"] == \
        json.loads((runs["feature-extract"] / "summary.json").read_text())["best_val_acc"]
    moved = tmp_path / "base.pth"
    shutil.copy(base_weights, moved)
    out = tmp_path / "run"
    train(parse_args(["--mode", "feature-extract", "--data-dir", str(tiny_data), "--epochs", "1", "--weights",
                      str(moved), "--output-dir", str(out), *FAST]))
    moved.unlink()
    one_line_error(run_cli("-m", "tl.predict", "--checkpoint", out / "best.safetensors", tiny_data / "val"),
                   f"trained on a local weights file ({moved}, not there); pass that file with --weights")
