"""Checkpoints: exact resume after a real SIGKILL, clean stops, bounded files, refused bad files."""

import json
import random
import signal
import subprocess
import time

import pytest
import torch
from conftest import make_imagefolder, one_line_error, one_line_stop, run_cli, spawn
from safetensors.torch import save_file

from tl.core.errors import UserError
from tl.runs import checkpoints

ARGS = ["--epochs", "6", "--step-size", "2", "--image-size", "64", "--batch-size", "8", "--lr", "0.01",
        "--weights", "none"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("ck") / "d", n_train=24, n_val=8, size=120)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """reference(data, *args): the uninterrupted run to compare with, trained once per module and option set."""
    runs = {}

    def run(data, *args):
        key = (str(data), *args)
        if key not in runs:
            runs[key] = tmp_path_factory.mktemp("ref") / "run"
            proc = run_cli("train.py", "--data-dir", data, "--output-dir", runs[key], *args)
            assert proc.returncode == 0, proc.stderr[-2000:]
        return runs[key]
    return run


def metrics_without_timings(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "train_images_per_s")} for r in rows]


def start(data, out, mode, *extra):
    return spawn("train.py", "--mode", mode, "--data-dir", data, "--output-dir", out, *ARGS, *extra)


def wait_for_epochs(out, n, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.005)
    raise AssertionError(f"run ended or stalled before epoch {n}: {proc.communicate(60)[1][-2000:]}")


@pytest.mark.parametrize("mode, extra", [
    ("finetune", []),
    ("feature-extract", ["--feature-cache", "off"]),
    ("feature-extract", ["--epochs", "300"]),  # cached features: epochs take milliseconds
    ("finetune", ["--augment", "device"]),  # batched crops on the device (the CPU here), seeded per epoch and rank
])
@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume_matches_an_uninterrupted_run(tmp_path, data, reference, mode, extra):
    ref = reference(data, "--mode", mode, *ARGS, *extra)
    out = tmp_path / "killed"
    proc = start(data, out, mode, *extra)
    epochs = int((extra + ARGS)[(extra + ARGS).index("--epochs") + 1])
    # The moment a seeded epoch's metrics row appears: its best and state are being written or the
    # next epoch runs. Far enough from the end that no machine is fast enough to finish first.
    wait_for_epochs(out, random.Random(len(extra)).randint(1, epochs // 3), proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert (out / "config.json").exists() and not (out / "summary.json").exists(), "ended before the kill"
    if (out / "state.safetensors").exists():  # absent if killed before the first state was written
        checkpoints.load_state(out / "state.safetensors")  # the last complete state is loadable
    # What a kill inside an atomic write leaves (tl's and safetensors' temporary files): cleaned up.
    (out / ".state.safetensors.tmp").write_bytes(b"partial")
    (out / ".tmpAb12Cd").write_bytes(b"partial")

    resumed = run_cli("train.py", "--mode", mode, "--data-dir", str(data), "--output-dir", str(out),
                      *ARGS, *extra, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert metrics_without_timings(out) == metrics_without_timings(ref)
    assert (out / "best.safetensors").read_bytes() == (ref / "best.safetensors").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())


@pytest.mark.slow
def test_results_do_not_depend_on_workers_and_resume_exactly_with_them(tmp_path, data, reference):
    """--num-workers 2, killed and resumed, ends like an uninterrupted run with no workers."""
    ref = reference(data, "--mode", "finetune", *ARGS)
    out = tmp_path / "killed"
    proc = start(data, out, "finetune", "--num-workers", "2")
    wait_for_epochs(out, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_cli("train.py", "--data-dir", str(data), "--output-dir", str(out), *ARGS, "--num-workers", "2",
                      "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert metrics_without_timings(out) == metrics_without_timings(ref)
    assert (out / "best.safetensors").read_bytes() == (ref / "best.safetensors").read_bytes()


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_cleanly_then_resumes(tmp_path, data):
    out = tmp_path / "run"
    proc = start(data, out, "finetune")
    wait_for_epochs(out, 2, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    one_line_stop(subprocess.CompletedProcess([], proc.returncode, "", stderr), signal.SIGINT, "stopped by SIGINT",
                  "--resume")
    done = checkpoints.read_metadata(out / "state.safetensors")["epoch"]
    assert done >= 2 and len(metrics_without_timings(out)) == done
    resumed = run_cli("train.py", "--mode", "finetune", "--data-dir", str(data), "--output-dir", str(out),
                      *ARGS, "--resume")
    assert resumed.returncode == 0 and [r["epoch"] for r in metrics_without_timings(out)] == list(range(1, 7))


def test_state_holds_only_trained_tensors_and_round_trips(tmp_path):
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    model(torch.ones(3, 4)).sum().backward()
    opt.step()
    sched.step()
    checkpoints.save_state(tmp_path / "s.safetensors", model.state_dict(), opt, sched, {"epoch": 1})
    tensors, opt_state, sched_state, meta = checkpoints.load_state(tmp_path / "s.safetensors")
    assert set(tensors) == {"weight", "bias"} and meta["epoch"] == 1
    assert torch.equal(opt_state["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"])
    assert opt_state["param_groups"] == opt.state_dict()["param_groups"] and sched_state == sched.state_dict()
    opt.load_state_dict(opt_state)


def test_unusable_checkpoints_are_one_line_errors(tmp_path):
    good = tmp_path / "good.safetensors"
    checkpoints.save(good, {"fc.weight": torch.ones(2, 3)}, {"model": "resnet18", "mode": "finetune",
                                                            "classes": ["a", "b"], "base_weights": "none"})
    (tmp_path / "truncated.safetensors").write_bytes(good.read_bytes()[:-10])
    save_file({"x": torch.ones(1)}, tmp_path / "foreign.safetensors")
    save_file({"x": torch.ones(1)}, tmp_path / "newer.safetensors",
              metadata={"tl": json.dumps({"format": "tl-checkpoint", "format_version": 99})})
    for name, message in [("truncated", "damaged"), ("foreign", "not a tl checkpoint"),
                          ("newer", "newer than this tl reads"), ("missing", "does not exist")]:
        with pytest.raises(UserError, match=message):
            checkpoints.load(tmp_path / f"{name}.safetensors")
    with pytest.raises(UserError, match="lacks part of its identity"):
        checkpoints.identity_of(good, checkpoints.read_metadata(good))
    saved = checkpoints.Identity("resnet18", "finetune", ["a", "b"], "none", "none", "fc", 224, 0, "sha256:1",
                                {"lr": 0.001, "processes": 1})
    for key, other, named in [("model", "resnet34", "--model"), ("mode", "feature-extract", "--mode"),
                              ("classes", ["a", "b", "c"], "class folders"), ("base_weights", "sha256:00", "--weights"),
                              ("data", "sha256:2", "the files of --data-dir"),
                              ("recipe", {"lr": 0.01, "processes": 1}, "--lr"),
                              ("recipe", {"lr": 0.001, "processes": 2}, "number of processes")]:
        changed = checkpoints.Identity(**saved.meta() | {key: other})
        assert [named in d for d in saved.differences(changed)] == [True], (key, saved.differences(changed))
    assert saved.differences(checkpoints.Identity(**saved.meta() | {"weights": "/elsewhere/same.pth"})) == []


@pytest.mark.slow
def test_resume_refuses_a_state_from_another_setup(tmp_path, data):
    out = tmp_path / "run"
    first = run_cli("train.py", "--data-dir", str(data), "--output-dir", str(out), *ARGS[:2], *ARGS[4:],
                    "--epochs", "1")
    assert first.returncode == 0, first.stderr
    before = (out / "state.safetensors").read_bytes()
    for extra, message in [(["--mode", "feature-extract"], "this command changes --mode"),
                           (["--model", "resnet34"], "this command changes --model"),
                           (["--preprocess", "weights"], "changes --preprocess ('weights', not 'tutorial')")]:
        proc = run_cli("train.py", "--data-dir", str(data), "--output-dir", str(out), *ARGS, *extra, "--resume")
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    again = run_cli("train.py", "--data-dir", str(data), "--output-dir", str(out), *ARGS)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert (out / "state.safetensors").read_bytes() == before  # nothing saved was touched


@pytest.fixture(scope="module")
def long_epochs(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("mid") / "d", n_train=100, n_val=10)  # 50 steps at batch 4


MID = ["--epochs", "2", "--image-size", "32", "--batch-size", "4", "--weights", "none", "--num-workers", "2"]
# Every accuracy lever at once (docs/levers.md), on a model with dropout: the global generator is in use.
LEVERS = ["--mixup", "0.8", "--cutmix", "1.0", "--ema", "0.9", "--sampler", "balanced", "--augment", "trivialaugment",
          "--random-erasing", "0.25", "--class-weights", "auto", "--tta", "flip", "--calibrate",
          "--model", "mobilenet_v3_small", "--accumulate", "3", "--grad-checkpointing"]
# --mode lora with what combines with it: adapters, head and EMA saved and restored mid-cycle-free.
LORA_LEVERS = ["--mode", "lora", "--layer-decay", "0.8", "--accumulate", "3", "--ema", "0.9", "--mixup", "0.8",
               "--tta", "flip", "--calibrate"]


def kill_inside_an_epoch(proc, out, kill=lambda proc: proc.send_signal(signal.SIGKILL)):
    """SIGKILL a run (started with --save-every 0.0001) once it has saved a state inside an epoch."""
    deadline = time.time() + 300
    while not ((out / "state.safetensors").exists()
               and checkpoints.read_metadata(out / "state.safetensors")["step"] > 0):
        assert time.time() < deadline and proc.poll() is None, "no state inside an epoch was saved"
        time.sleep(0.01)
    kill(proc)
    proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL after a --save-every state", "SIGINT"])
def test_a_run_stopped_inside_an_epoch_resumes_there_exactly(tmp_path, long_epochs, reference, how):
    ref = reference(long_epochs, *MID)
    out = tmp_path / "run"
    extra = ["--save-every", "0.0001"] if how.startswith("SIGKILL") else []  # every agreement point: 16 steps
    proc = spawn("train.py", "--data-dir", long_epochs, "--output-dir", out, *MID, *extra)
    if how.startswith("SIGKILL"):
        kill_inside_an_epoch(proc, out)
    else:
        wait_for_epochs(out, 1, proc)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
        one_line_stop(subprocess.CompletedProcess([], proc.returncode, "", stderr), signal.SIGINT, "--resume")
    meta = checkpoints.read_metadata(out / "state.safetensors")
    assert meta["step"] > 0 or how == "SIGINT"  # a SIGINT on an epoch's last steps waits for its end
    resumed = run_cli("train.py", "--data-dir", str(long_epochs), "--output-dir", str(out), *MID, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    where = (f"resuming epoch {meta['epoch'] + 1} at step {meta['step']}" if meta["step"] else
             f"resuming after epoch {meta['epoch']}")
    assert where in resumed.stdout, resumed.stdout[-2000:]
    assert metrics_without_timings(out) == metrics_without_timings(ref)
    assert (out / "best.safetensors").read_bytes() == (ref / "best.safetensors").read_bytes()


@pytest.mark.slow
def test_every_lever_resumes_exactly_after_a_sigkill_inside_an_epoch(tmp_path, long_epochs, reference):
    """mixup+cutmix, EMA, the balanced sampler, a policy, erasing, class weights, TTA and calibration, with 2
    workers and dropout: killed inside an epoch, resumed, the same metrics and best.safetensors byte for byte."""
    ref = reference(long_epochs, *MID, *LEVERS)
    out = tmp_path / "run"
    proc = spawn("train.py", "--data-dir", long_epochs, "--output-dir", out, *MID, *LEVERS, "--save-every", "0.0001")
    kill_inside_an_epoch(proc, out)
    changed = run_cli("train.py", "--data-dir", long_epochs, "--output-dir", out, *MID, *LEVERS, "--ema", "0.99",
                      "--resume")
    one_line_error(changed, "cannot resume", "--ema (0.99, not 0.9)")
    resumed = run_cli("train.py", "--data-dir", long_epochs, "--output-dir", out, *MID, *LEVERS, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert metrics_without_timings(out) == metrics_without_timings(ref)
    assert (out / "best.safetensors").read_bytes() == (ref / "best.safetensors").read_bytes()
    summaries = [json.loads((d / "summary.json").read_text()) for d in (out, ref)]
    assert summaries[0]["calibration"] == summaries[1]["calibration"] and "val_acc_tta" in summaries[0]


@pytest.mark.slow
def test_lora_with_layer_decay_and_accumulation_resumes_exactly_after_a_sigkill_inside_an_epoch(tmp_path,
                                                                                              long_epochs, reference):
    ref = reference(long_epochs, *MID, *LORA_LEVERS)
    out = tmp_path / "run"
    killed = run_cli("tests/kill_after_save.py", "--data-dir", long_epochs, "--output-dir", out, *MID, *LORA_LEVERS,
                     "--save-every", "0.0001")  # SIGKILL right after the first save inside an epoch
    assert killed.returncode == -signal.SIGKILL and checkpoints.read_metadata(out / "state.safetensors")["step"] > 0
    resumed = run_cli("train.py", "--data-dir", long_epochs, "--output-dir", out, *MID, *LORA_LEVERS, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming epoch" in resumed.stdout
    assert metrics_without_timings(out) == metrics_without_timings(ref)
    assert (out / "best.safetensors").read_bytes() == (ref / "best.safetensors").read_bytes()


def test_a_run_without_the_levers_refuses_them_on_resume_by_name(tmp_path, data):
    out = tmp_path / "run"
    args = ["--data-dir", data, "--output-dir", out, *ARGS, "--epochs", "1"]
    assert run_cli("train.py", *args).returncode == 0
    for flag, value in (("--mixup", "0.2"), ("--sampler", "balanced"), ("--augment", "randaugment"),
                        ("--tta", "flip"), ("--calibrate", None)):
        proc = run_cli("train.py", *args, "--epochs", "2", "--resume", flag, *([value] if value else []))
        one_line_error(proc, "cannot resume", flag)
    assert run_cli("train.py", *args, "--epochs", "2", "--resume").returncode == 0
