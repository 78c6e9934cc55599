"""The run directory: nothing of an earlier run lost, one writer at a time, truthful resume, files
rebuilt or refused when damaged. Each test failed on the code before tl/runs/rundir.py existed."""

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
import torch
from conftest import ROOT, make_imagefolder, one_line_error, run_cli, spawn
from safetensors.torch import load_file

from tl.core.errors import UserError
from tl.runs import checkpoints
from tl.runs.rundir import LOCK, RunDir

QUICK = ["--mode", "feature-extract", "--image-size", "32", "--batch-size", "4", "--weights", "none", "--lr", "0.01",
         "--wandb", "disabled"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("run") / "d", n_train=6, n_val=3)


def train(data, out, *extra, epochs=3):
    return run_cli("train.py", "--data-dir", str(data), "--output-dir", str(out), "--epochs", str(epochs),
                   *QUICK, *extra)



def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def rows(out):
    return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "train_images_per_s")}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished 3-epoch run, copied fresh for each test that damages it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = train(data, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture
def run_copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def test_a_failing_resume_or_overwrite_leaves_the_earlier_run_untouched(run_copy, tmp_path):
    (run_copy / "state.safetensors").unlink()  # a finished run whose state is gone
    before = snapshot(run_copy)
    typo = tmp_path / "typo"
    one_line_error(train(typo, run_copy, "--resume"), "no state.safetensors to continue from", "--overwrite")
    one_line_error(train(typo, run_copy, "--overwrite"), "does not exist")
    assert snapshot(run_copy) == before


def test_overwrite_keeps_the_old_run_until_the_new_one_saved_an_epoch(run_copy, data):
    before = snapshot(run_copy)
    # Fails in its first epoch, after the old run was moved aside: the old run comes back.
    one_line_error(train(data, run_copy, "--overwrite", "--mode", "finetune", "--lr", "1e30"), "the loss became")
    assert snapshot(run_copy) == before
    proc = train(data, run_copy, "--overwrite", "--seed", "1", epochs=2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["epoch"] for r in rows(run_copy)] == [1, 2] and not (run_copy / ".tl-overwritten").exists()
    assert json.loads((run_copy / "config.json").read_text())["seed"] == 1


@pytest.mark.slow
def test_a_second_process_in_a_live_run_dir_is_refused_naming_the_holder(data, tmp_path):
    out = tmp_path / "run"
    first = spawn("train.py", "--data-dir", data, "--output-dir", out, "--epochs", "100000", *QUICK)
    try:
        deadline = time.time() + 300
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
            assert time.time() < deadline and first.poll() is None, "the first run did not start training"
            time.sleep(0.1)
        for extra in ([], ["--resume"], ["--overwrite"]):
            one_line_error(train(data, out, *extra), "is in use by pid", str(first.pid), "another --output-dir")
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=120)
    assert not (out / LOCK).exists()  # released on the way out
    epochs = [r["epoch"] for r in rows(out)]
    assert epochs == list(range(1, len(epochs) + 1))  # one writer: every epoch once, in order


def test_stale_locks_are_taken_over_and_a_lost_lock_stops_writing(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    here = RunDir.open(str(out), "finetune", False, False)  # a real holder's record, then made dead
    record = json.loads((out / LOCK).read_text())
    here.close(failed=False)
    (out / LOCK).write_text(json.dumps(record | {"pid": gone.pid, "start": "1"}))
    RunDir.open(str(out), "finetune", False, False).close(failed=False)  # a dead process: taken at once

    other_node = json.dumps({"host": "n7", "pid": 1, "machine": "n7/x/1", "start": "5", "job": "42",
                             "since": "2026-01-01 00:00:00"})
    (out / LOCK).write_text(other_node)
    with pytest.raises(UserError, match="in use by pid 1 on n7, SLURM job 42"):
        RunDir.open(str(out), "finetune", False, False)
    monkeypatch.setenv("TL_LOCK_STALE_S", "60")
    old = time.time() - 61
    os.utime(out / LOCK, (old, old))  # a node that died: no heartbeat for longer than the limit
    run = RunDir.open(str(out), "finetune", False, False)
    (out / LOCK).write_text(other_node)  # someone took it over while this run thought it held it
    with pytest.raises(UserError, match="lost the lock .* to pid 1 on n7"):
        run.check_lock()
    run.close(failed=False)
    assert (out / LOCK).read_text() == other_node  # not ours to remove


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["half-written last line", "deleted", "garbage"])
def test_damaged_or_deleted_metrics_are_rebuilt_on_resume(data, tmp_path, damage):
    ref = tmp_path / "ref"
    assert train(data, ref, epochs=4).returncode == 0
    out = tmp_path / "run"
    assert train(data, out, epochs=2).returncode == 0
    metrics = out / "metrics.jsonl"
    if damage == "deleted":
        metrics.unlink()
    elif damage == "garbage":
        metrics.write_bytes(b"\x00\xff not json\n")
    else:
        metrics.write_text(metrics.read_text() + '{"epoch": 3, "train_lo')
    proc = train(data, out, "--resume", epochs=4)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert rows(out) == rows(ref)
    assert (out / "best.safetensors").read_bytes() == (ref / "best.safetensors").read_bytes()


def _rewrite_state(path, tensors=None, drop_meta=()):
    loaded, meta = checkpoints.load(path)
    meta = {k: v for k, v in meta.items() if k not in drop_meta and k not in ("format", "format_version")}
    checkpoints.save(path, tensors(loaded) if tensors else loaded, meta)


@pytest.mark.parametrize("damage, message", [
    ("wrong shape", "is damaged"),
    ("missing tensor", "is damaged"),
    ("missing progress", "is damaged"),
    ("missing identity", "lacks part of its identity"),
    ("truncated", "is damaged"),
    ("best deleted", "best.safetensors"),
])
def test_a_damaged_state_is_a_one_line_error_and_stays_as_it_is(run_copy, data, damage, message):
    state = run_copy / "state.safetensors"
    if damage == "wrong shape":
        _rewrite_state(state, lambda t: t | {"model.fc.weight": torch.zeros(3, 512)})
    elif damage == "missing tensor":
        _rewrite_state(state, lambda t: {k: v for k, v in t.items() if k != "model.fc.bias"})
    elif damage == "missing progress":
        _rewrite_state(state, drop_meta=("best_epoch", "history"))
    elif damage == "missing identity":
        _rewrite_state(state, drop_meta=("classes",))
    elif damage == "truncated":
        state.write_bytes(state.read_bytes()[:-100])
    else:
        (run_copy / "best.safetensors").unlink()
    before = snapshot(run_copy)
    one_line_error(train(data, run_copy, "--resume", epochs=5), message)
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("extra, named", [
    (["--lr", "0.02"], "--lr"),
    (["--step-size", "3"], "--step-size"),
    (["--batch-size", "2"], "--batch-size"),
    (["--seed", "5"], "--seed"),
    (["--image-size", "48"], "--image-size"),
    (["--feature-cache", "off"], "--feature-cache"),
])
def test_resume_honours_every_option_or_refuses_it_by_name(run_copy, data, extra, named):
    before = snapshot(run_copy)
    one_line_error(train(data, run_copy, "--resume", *extra, epochs=5), "cannot resume", named)
    assert snapshot(run_copy) == before


@pytest.mark.slow
def test_resume_after_the_data_changed_is_refused_before_training(run_copy, data, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(data, changed)
    (changed / "val" / "red" / "000.jpg").unlink()
    before = snapshot(run_copy)
    one_line_error(train(changed, run_copy, "--resume", epochs=5), "cannot resume", f"--data-dir {changed} (images "
                   "changed since the run began: 1 removed (the first: val/red/000.jpg))")
    assert snapshot(run_copy) == before
    moved = tmp_path / "moved"  # the same files elsewhere: fine
    shutil.copytree(data, moved)
    proc = train(moved, run_copy, "--resume", epochs=4)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["epoch"] for r in rows(run_copy)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_resuming_a_finished_run_does_nothing_and_fewer_epochs_are_refused(run_copy, data):
    before = snapshot(run_copy)
    proc = train(data, run_copy, "--resume")
    assert proc.returncode == 0 and "nothing to do" in proc.stdout, proc.stderr[-2000:]
    assert snapshot(run_copy) == before
    one_line_error(train(data, run_copy, "--resume", epochs=2), "already trained 3 epochs", "--epochs 3")


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_is_one_line_and_loses_nothing(data, tmp_path):
    """A real full disk: a 150 MB tmpfs holds epoch 1 of a finetune run (45 + 90 MB) but not epoch 2's writes."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("needs unshare -m (root) for a private tmpfs mount")
    disk, copy = tmp_path / "disk", tmp_path / "copy"
    disk.mkdir()
    args = ["--data-dir", str(data), "--output-dir", str(disk / "run"), "--epochs", "3", "--image-size", "32",
            "--batch-size", "4", "--weights", "none", "--lr", "0.01", "--wandb", "disabled"]
    script = (f"mount -t tmpfs -o size=150m tmpfs {disk} && {sys.executable} {ROOT / 'train.py'} {' '.join(args)}; "
              f"status=$?; cp -a {disk / 'run'} {copy}; exit $status")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=600)
    one_line_error(proc, "cannot write", "No space left on device", "--resume")
    assert checkpoints.read_metadata(copy / "state.safetensors")["epoch"] == 1  # the last good state is whole
    assert not [p.name for p in copy.iterdir() if p.name.endswith(".tmp")]  # no half-written file left
    ref = tmp_path / "ref"
    assert run_cli("train.py", *args[:2], "--output-dir", str(ref), *args[4:]).returncode == 0
    resumed = run_cli("train.py", *args[:2], "--output-dir", str(copy), *args[4:], "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert rows(copy) == rows(ref)
    assert load_file(copy / "best.safetensors").keys() == load_file(ref / "best.safetensors").keys()
    assert (copy / "best.safetensors").read_bytes() == (ref / "best.safetensors").read_bytes()


def test_a_read_only_output_dir_is_one_line(data, tmp_path):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("needs unshare -m (root) for a read-only bind mount")
    ro = tmp_path / "ro"
    ro.mkdir()
    script = (f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && "
              f"{sys.executable} {ROOT / 'train.py'} --data-dir {data} --output-dir {ro / 'run'} --epochs 1 "
              + " ".join(QUICK))
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    one_line_error(proc, "cannot create output dir", "Read-only file system")


@pytest.mark.slow
def test_a_stop_during_start_up_ends_at_once_and_leaves_nothing(tmp_path):
    big = make_imagefolder(tmp_path / "big", n_train=300, n_val=100, size=400)  # seconds of decoding
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--data-dir", str(big), "--output-dir",
                             str(out), *QUICK], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = ""
    while "decode train" not in seen:  # the progress bar of the decoding: start-up's slow part
        char = proc.stderr.read(1)
        assert char, f"ended before decoding: {seen[-2000:]}"
        seen += char
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM, rest  # a stop, not an error
    lines = (seen + rest).replace("\r", "\n").splitlines()
    assert [line for line in lines if line.startswith(("error: ", "stopped "))] == [
        "stopped by SIGTERM before the first epoch was saved; nothing to keep: run the same command again"], rest
    assert "Traceback" not in rest and not out.exists()


def test_stop_messages_name_the_saved_epochs_correctly(data, tmp_path):
    out = tmp_path / "run"
    proc = spawn("train.py", "--data-dir", data, "--output-dir", out, "--epochs", "100000", *QUICK)
    deadline = time.time() + 300
    while not (out / "state.safetensors").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    done = checkpoints.read_metadata(out / "state.safetensors")["epoch"]
    saved = "epoch 1 is saved" if done == 1 else f"epochs 1-{done} are saved"
    assert f"stopped by SIGINT during epoch {done + 1}; {saved} in {out}" in stderr, stderr[-2000:]
    assert not re.search(r"epochs 1-1\b", stderr)


def test_resume_after_a_start_killed_before_its_first_epoch_starts_afresh(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")  # what a kill during start-up or the first epoch's saves leaves
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    checkpoints.save(out / "best.safetensors", {"fc.bias": torch.zeros(2)}, {"epoch": 1})
    (out / LOCK).write_text(json.dumps({"host": "gone", "pid": 1, "machine": "gone", "start": "1", "since": "x"}))
    os.utime(out / LOCK, (0, 0))
    proc = train(data, out, "--resume", epochs=2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["epoch"] for r in rows(out)] == [1, 2]
    one_line_error(train(data, tmp_path / "never-made", "--resume"), "nothing to resume", "does not exist")


@pytest.mark.slow
def test_default_output_dirs_of_runs_started_together_differ(data, tmp_path):
    procs = [spawn("train.py", "--data-dir", data, "--epochs", "1", *QUICK, cwd=tmp_path) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr_text()[-2000:]
    made = sorted((tmp_path / "runs").iterdir())
    assert len(made) == 2 and all((d / "summary.json").exists() for d in made)


def test_output_dir_inside_the_data_dir_is_refused(data, tmp_path):
    inside = tmp_path / "d"
    shutil.copytree(data, inside)
    one_line_error(train(inside, inside / "train" / "runs"), "inside --data-dir")
    assert not (inside / "train" / "runs").exists()


def test_a_kill_while_moving_an_overwritten_run_aside_loses_none_of_it(run_copy, data):
    before = snapshot(run_copy)
    moving = run_copy / ".tl-overwritten.moving"  # as a kill half-way through moving the old run aside leaves it
    moving.mkdir()
    for name in ("best.safetensors", "metrics.jsonl", "state.safetensors"):
        (run_copy / name).rename(moving / name)
    proc = train(data, run_copy, "--resume")
    assert proc.returncode == 0 and "nothing to do" in proc.stdout, proc.stderr[-2000:]
    assert snapshot(run_copy) == before


@pytest.mark.slow
def test_tl_debug_shows_the_traceback_behind_the_one_line_error(tmp_path):
    plain = run_cli("train.py", "--data-dir", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "run"))
    debug = run_cli("train.py", "--data-dir", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "run"),
                    env={"TL_DEBUG": "1"})
    one_line_error(plain, "does not exist")
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "ensure_data" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == plain.stderr.strip().splitlines()[-1]


def test_a_requeued_slurm_job_takes_over_its_own_earlier_lock_from_another_node(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    earlier = {"host": "n2", "pid": 7, "machine": "n2/x/1", "start": "5", "job": "42", "restart": "0",
               "since": "2026-01-01 00:00:00"}
    (out / LOCK).write_text(json.dumps(earlier))  # its node died: the heartbeat is fresh, the job is requeued
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    RunDir.open(str(out), "finetune", False, False).close(failed=False)
    (out / LOCK).write_text(json.dumps(earlier | {"restart": "1"}))  # the same incarnation: alive
    with pytest.raises(UserError, match="in use by pid 7 on n2, SLURM job 42"):
        RunDir.open(str(out), "finetune", False, False)


def test_a_lock_path_that_is_not_a_lock_file_is_one_line(tmp_path):
    out = tmp_path / "run"
    (out / LOCK).mkdir(parents=True)
    with pytest.raises(UserError, match="is not a tl lock file; remove it"):
        RunDir.open(str(out), "finetune", False, False)


def test_a_kill_between_writing_best_and_the_state_resumes(data, tmp_path):
    """best is written before the state: after a kill between the two it is one epoch ahead."""
    out = tmp_path / "run"
    assert train(data, out, epochs=2).returncode == 0
    tensors, meta = checkpoints.load(out / "best.safetensors")
    ahead = {k: v for k, v in meta.items() if k not in ("format", "format_version")} | {"epoch": 3}
    checkpoints.save(out / "best.safetensors", tensors, ahead)
    proc = train(data, out, "--resume", epochs=3)
    assert proc.returncode == 0 and "resuming after epoch 2" in proc.stdout, proc.stderr[-2000:]
    ahead["epoch"] = 5  # the state now says 3: two ahead is not this run's best
    checkpoints.save(out / "best.safetensors", tensors, ahead)
    one_line_error(train(data, out, "--resume", epochs=5), "is not the best epoch")
