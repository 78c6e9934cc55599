"""The SLURM job scripts on a real two-node cluster (slurmctld + two slurmd on this machine)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, make_imagefolder

from tl.runs import checkpoints

pytestmark = [pytest.mark.slurm,  # `make test-slurm`; `make test` leaves these out (they apt-get and start daemons)
              pytest.mark.skipif(os.geteuid() != 0, reason="the local SLURM cluster needs root (apt, munge)")]
RESUMING = r"resuming (after epoch \d+|epoch \d+ at step \d+)"  # the start line of a resumed run
STATE = Path("/tmp/tl-slurm-test")  # its own state dir and ports: a developer's cluster may be up
ENV = {**os.environ, "TL_SLURM_DIR": str(STATE), "TL_SLURM_PORT": "7817", "SLURM_CONF": str(STATE / "slurm.conf"),
       "VENV": str(Path(sys.executable).parent.parent), "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def cluster():
    script = str(ROOT / "slurm" / "local_cluster.sh")
    start = subprocess.run([script, "start"], env=ENV, capture_output=True, text=True, timeout=600)
    assert start.returncode == 0, start.stderr[-3000:]
    yield
    subprocess.run([script, "stop"], env=ENV, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_imagefolder(tmp_path_factory.mktemp("slurm") / "d", n_train=12, n_val=7, size=140)
    (root / "val" / "red" / "006.jpg").unlink()  # 13 val images, an odd count over 2 processes
    return root


def submit(script, out, data, epochs, *sbatch_args, **env):
    job_env = ENV | {"DATA_DIR": str(data), "OUTPUT_DIR": str(out), "MODE": "finetune",
                     "TRAIN_ARGS": f"--epochs {epochs} --image-size 112 --batch-size 4 --weights none"} | env
    proc = subprocess.run(["sbatch", "--parsable", f"--output={out}.log", *sbatch_args, f"slurm/{script}"],
                          cwd=ROOT, env=job_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_field(job, name):
    show = subprocess.run(["scontrol", "show", "job", job], env=ENV, capture_output=True, text=True).stdout
    return show.split(f" {name}=")[1].split()[0]


def job_state(job):
    return job_field(job, "JobState")


def finished(job):
    return job_state(job) in ("COMPLETED", "FAILED", "CANCELLED")


def wait_for(condition, timeout, what, every=0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def epochs_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("script, nodes, per_node", [("multi_node.sbatch", 2, 1), ("single_node.sbatch", 1, 2)])
def test_job_completes_with_exact_counts(cluster, data, tmp_path, script, nodes, per_node):
    out = tmp_path / "run"
    job = submit(script, out, data, 2, f"--nodes={nodes}", GPUS_PER_NODE=str(per_node))
    wait_for(lambda: job_state(job) in ("COMPLETED", "FAILED", "CANCELLED"), 300, "the job")
    log = Path(f"{out}.log").read_text(errors="replace")
    assert job_state(job) == "COMPLETED", log[-3000:]
    assert "2 process(es)" in log and json.loads((out / "config.json").read_text())["num_processes"] == 2
    assert [(r["train_images"], r["val_images"]) for r in epochs_of(out)] == [(24, 13), (24, 13)]
    assert json.loads((out / "summary.json").read_text())["num_val"] == 13


def pending(pid: int, signum: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    return any(int(line.split()[1], 16) >> (signum - 1) & 1 for line in status.splitlines()
               if line.startswith(("SigPnd:", "ShdPnd:")))


def preempt(job, out):
    """What `#SBATCH --signal=B:USR1@120` does before the time limit, sent now, at a moment that does not depend
    on the machine's speed: the ranks are stopped (SIGSTOP) until the SIGTERM the batch script's trap sends has
    reached each of them, so the job cannot finish its epochs before the preemption lands."""
    pids = rank_pids(out)
    assert len(pids) == 2, pids
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=ENV, check=True)
    wait_for(lambda: all(pending(pid, signal.SIGTERM) for pid in pids), 120, "SIGTERM at every rank", every=0.05)
    for pid in pids:
        os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize("sharded", [False, True], ids=["ddp", "shard-model"])
def test_preempted_job_requeues_and_resumes_exactly_with_workers(cluster, data, tmp_path, sharded):
    """multi_node.sbatch on the two nodes, preempted after epoch 2: requeued, resumed from its state (with
    --shard-model: every process's DCP shards), the uninterrupted run's metrics and best.safetensors exactly."""
    out = tmp_path / "run"
    args = "--epochs 5 --image-size 112 --batch-size 4 --weights none --precision bf16" + \
        (" --shard-model" if sharded else "")
    # The same two processes uninterrupted, without workers, outside SLURM: trained while the job runs.
    ref = tmp_path / "ref"
    ref_log = tmp_path / "ref.log"  # a file: a pipe read only at the end would fill with progress bars and stall it
    reference = subprocess.Popen([str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "train.py",
                                  "--mode", "finetune", "--data-dir", str(data), "--output-dir", str(ref),
                                  *args.split()], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                 stderr=ref_log.open("w"))
    job = submit("multi_node.sbatch", out, data, 5, TRAIN_ARGS=f"{args} --num-workers 2")
    wait_for(lambda: (out / "metrics.jsonl").exists() and len(epochs_of(out)) >= 2, 300, "epoch 2", every=0.02)
    preempt(job, out)
    wait_for(lambda: job_state(job) in ("COMPLETED", "FAILED", "CANCELLED"), 300, "the requeued job")
    log = Path(f"{out}.log").read_text(errors="replace")
    assert job_state(job) == "COMPLETED", log[-3000:]
    assert "stopped by SIGTERM" in log and "restart 1" in log and re.search(RESUMING, log)
    assert [r["epoch"] for r in epochs_of(out)] == [1, 2, 3, 4, 5]  # one continuous record
    assert json.loads((out / "summary.json").read_text())["epochs"] == 5
    assert reference.wait(timeout=600) == 0, ref_log.read_text(errors="replace")[-3000:]

    def without_timings(d):
        return [{k: v for k, v in r.items() if k not in ("seconds", "train_images_per_s")} for r in epochs_of(d)]
    assert without_timings(out) == without_timings(ref)
    assert (out / "best.safetensors").read_bytes() == (ref / "best.safetensors").read_bytes()
    if sharded:
        state = checkpoints.read_metadata(out / "state.safetensors")
        assert state["shards"] == "shards-5-0" and (out / "shards-5-0" / "__1_0.distcp").is_file()


def rank_pids(out):
    """The python processes that run train.py for this run: the ranks, not their launchers."""
    found = subprocess.run(["pgrep", "-f", "--", f"--output-dir {out}"], capture_output=True, text=True).stdout.split()
    pids = []
    for pid in found:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        if argv[1:3] == [b"-u", b"train.py"]:  # torchrun's worker command
            pids.append(int(pid))
    return pids


def test_killed_rank_requeues_and_resumes(cluster, data, tmp_path):
    out = tmp_path / "run"
    job = submit("multi_node.sbatch", out, data, 6)
    wait_for(lambda: (out / "state.safetensors").exists() and (out / "metrics.jsonl").exists()
             and len(epochs_of(out)) >= 2, 300, "a saved state and epoch 2")
    pids = rank_pids(out)
    assert len(pids) == 2, pids  # one rank per node
    os.kill(pids[-1], 9)  # a rank dies hard: OOM killer, segfault, a lost node
    wait_for(lambda: finished(job), 300, "the requeued job")
    log = Path(f"{out}.log").read_text(errors="replace")
    assert job_state(job) == "COMPLETED", log[-3000:]
    assert job_field(job, "Restarts") == "1", log[-3000:]
    assert "requeueing (restart 1 of at most 3)" in log and "restart 1" in log and "resuming after epoch" in log
    assert [r["epoch"] for r in epochs_of(out)] == [1, 2, 3, 4, 5, 6]  # one continuous record
    assert json.loads((out / "summary.json").read_text())["epochs"] == 6


def test_killed_rank_past_restart_bound_fails(cluster, data, tmp_path):
    out = tmp_path / "run"
    job = submit("multi_node.sbatch", out, data, 6, MAX_RESTARTS="0")
    wait_for(lambda: (out / "state.safetensors").exists() and (out / "metrics.jsonl").exists()
             and len(epochs_of(out)) >= 2, 300, "a saved state and epoch 2")
    pids = rank_pids(out)
    assert len(pids) == 2, pids
    os.kill(pids[0], 9)
    wait_for(lambda: finished(job), 300, "the job")
    log = Path(f"{out}.log").read_text(errors="replace")
    assert job_state(job) == "FAILED" and job_field(job, "Restarts") == "0", log[-3000:]
    assert "not requeueing: restart bound reached (0 requeues, MAX_RESTARTS=0)" in log


def test_user_error_fails_without_requeue(cluster, tmp_path):
    out = tmp_path / "run"
    job = submit("multi_node.sbatch", out, tmp_path / "no-such-data", 2)
    wait_for(lambda: finished(job), 300, "the job")
    log = Path(f"{out}.log").read_text(errors="replace")
    assert job_state(job) == "FAILED", log[-3000:]
    assert job_field(job, "Restarts") == "0" and job_field(job, "ExitCode") == "2:0", log[-3000:]
    assert "does not exist" in log and "not requeueing: tl stopped with a user error" in log
    assert not list(tmp_path.glob(".tl-user-error-*"))  # launch.sh cleans up its mark


def test_sweep_array_with_one_task_preempted(cluster, data, tmp_path):
    """slurm/sweep.sbatch over 3 seeds: 3 run dirs, 3 W&B runs in the sweep's group; task 1, preempted
    after its first epoch, requeues alone and ends equal to an uninterrupted run; tl.report sums it up."""
    base = {"data_dir": str(data), "weights": "none", "epochs": 5, "image_size": 112, "batch_size": 4,
            "precision": "bf16"}
    file = tmp_path / "seeds.json"
    file.write_text(json.dumps({"name": "seeds", "base": base, "grid": {"seed": [0, 1, 2]}}))
    sweep_dir = tmp_path / "sweep"
    # One thread per process, as accelerate launch gives each: the reference below must compute alike.
    env = ENV | {"SWEEP_DIR": str(sweep_dir), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["sbatch", "--parsable", "--array=0-2", f"--output={tmp_path}/task-%a.log",
                           "slurm/sweep.sbatch", str(file)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    tasks = [f"{proc.stdout.strip().split(';')[0]}_{i}" for i in range(3)]
    ref = tmp_path / "ref"  # the same option set, uninterrupted, outside SLURM, trained while the array runs
    ref_log = tmp_path / "ref.log"  # a file: a pipe read only at the end would fill with progress bars and stall it
    reference = subprocess.Popen([sys.executable, "-m", "tl.sweep", str(file), "--index", "1", "--sweep-dir", str(ref)],
                                 cwd=ROOT, env=env | {"WANDB_MODE": "disabled"}, stdout=subprocess.DEVNULL,
                                 stderr=ref_log.open("w"))
    runs = [sweep_dir / f"{i}-seed={i}" for i in range(3)]
    wait_for(lambda: (runs[1] / "metrics.jsonl").exists() and len(epochs_of(runs[1])) >= 1, 300, "task 1's epoch 1")
    subprocess.run(["scancel", "--signal=USR1", "--batch", tasks[1]], env=ENV, check=True)
    wait_for(lambda: all(finished(t) for t in tasks), 400, "the sweep's tasks")
    # errors="replace": a process killed mid-write (the preemption) can leave half a progress bar's UTF-8 character.
    logs = [(tmp_path / f"task-{i}.log").read_text(errors="replace") for i in range(3)]
    for i, task in enumerate(tasks):
        assert job_state(task) == "COMPLETED", logs[i][-3000:]
        assert job_field(task, "Restarts") == ("1" if i == 1 else "0"), logs[i][-3000:]
        assert [r["epoch"] for r in epochs_of(runs[i])] == [1, 2, 3, 4, 5]
        assert json.loads((runs[i] / "config.json").read_text())["seed"] == i
    assert "preemption signal" in logs[1] and re.search(RESUMING, logs[1])
    assert "Traceback" not in logs[1]  # W&B's service, stopped with the step, leaves one warning
    assert "preemption signal" not in logs[0] + logs[2]  # the signal and the requeue reached task 1 only
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == [r.name for r in runs]

    assert reference.wait(timeout=600) == 0, ref_log.read_text(errors="replace")[-3000:]

    def without_timings(d):
        return [{k: v for k, v in r.items() if k not in ("seconds", "train_images_per_s")} for r in epochs_of(d)]
    assert without_timings(runs[1]) == without_timings(ref / runs[1].name)
    assert (runs[1] / "best.safetensors").read_bytes() == (ref / runs[1].name / "best.safetensors").read_bytes()

    from wandb_records import read_records
    ids = []
    for run in runs:  # the latest attempt's offline file; a resume continues the same W&B run
        files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
        assert len(files) == (2 if run == runs[1] else 1), files
        record = next(r.run for r in read_records(files[-1]) if r.WhichOneof("record_type") == "run")
        assert (record.run_group, record.display_name) == ("seeds", run.name)
        assert {f.parent.name.rsplit("-", 1)[1] for f in files} == {record.run_id}
        ids.append(record.run_id)
    assert len(set(ids)) == 3

    from tl.report import report
    result = report([str(sweep_dir)])
    assert result["options"] == ["seed"] and [r["kind"] for r in result["rows"]] == ["run"] * 3 + ["mean"]
    assert result["rows"][-1]["n"] == 3 and result["rows"][-1]["best_val_acc_std"] is not None


def test_array_tasks_given_one_output_dir_one_trains(cluster, data, tmp_path):
    """A fixed OUTPUT_DIR for a whole array, by mistake: one task trains it; the others stop with the
    lock's one-line error and are not requeued. TRAIN_ARGS gets each task's own $SLURM_ARRAY_TASK_ID."""
    out = tmp_path / "shared"
    job = submit("single_node.sbatch", out, data, 2, "--array=0-2", f"--output={tmp_path}/task-%a.log",
                 GPUS_PER_NODE="1",
                 TRAIN_ARGS="--epochs 2 --image-size 112 --batch-size 4 --weights none --seed $SLURM_ARRAY_TASK_ID")
    tasks = [f"{job}_{i}" for i in range(3)]
    wait_for(lambda: all(finished(t) for t in tasks), 300, "the array's tasks")
    logs = [(tmp_path / f"task-{i}.log").read_text(errors="replace") for i in range(3)]
    states = [job_state(t) for t in tasks]
    assert states.count("COMPLETED") == 1, logs
    winner = states.index("COMPLETED")
    for i, task in enumerate(tasks):
        assert job_field(task, "Restarts") == "0", logs[i][-3000:]
        if i != winner:
            assert states[i] == "FAILED" and job_field(task, "ExitCode") == "2:0", logs[i][-3000:]
            errors = [line for line in logs[i].splitlines() if line.startswith("error: ")]
            assert len(errors) == 1 and f"SLURM job {tasks[winner]}" in errors[0], logs[i][-3000:]
            assert "give every array task its own output dir" in errors[0]
            assert "not requeueing: tl stopped with a user error" in logs[i]
    assert [r["epoch"] for r in epochs_of(out)] == [1, 2]  # one run, whole
    config = json.loads((out / "config.json").read_text())
    assert config["seed"] == winner and config["slurm"]["array_task_id"] == str(winner)
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2
    assert not list(tmp_path.glob(".tl-user-error-*"))


def test_predict_array_merges_what_one_process_writes(cluster, data, tmp_path):
    """slurm/predict.sbatch as a 3-task array over 13 images in batches of 2 (7 batches): the last task
    merges the parts into the file one process writes, byte for byte."""
    env = ENV | {"OMP_NUM_THREADS": "1", "PREDICT_ARGS": "--batch-size 2"}
    run = tmp_path / "run"
    trained = subprocess.run([sys.executable, "train.py", "--data-dir", str(data), "--output-dir", str(run),
                              "--epochs", "1", "--image-size", "64", "--batch-size", "4", "--weights", "none",
                              "--wandb", "disabled"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    ckpt, out = run / "best.safetensors", tmp_path / "predictions.csv"
    proc = subprocess.run(["sbatch", "--parsable", "--array=0-2", f"--output={tmp_path}/task-%a.log",
                           "slurm/predict.sbatch", str(ckpt), str(out), str(data / "val")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    tasks = [f"{proc.stdout.strip().split(';')[0]}_{i}" for i in range(3)]
    ref = subprocess.run([sys.executable, "-m", "tl.predict", "--checkpoint", str(ckpt), "--out",
                          str(tmp_path / "ref.csv"), "--batch-size", "2", str(data / "val")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    wait_for(lambda: all(finished(t) for t in tasks), 300, "the array's tasks")
    logs = [(tmp_path / f"task-{i}.log").read_text(errors="replace") for i in range(3)]
    assert [job_state(t) for t in tasks] == ["COMPLETED"] * 3, logs
    assert sum(f"wrote {out}: 13 rows" in log for log in logs) == 1, logs  # one task merged
    assert out.read_bytes() == (tmp_path / "ref.csv").read_bytes()
    assert not (tmp_path / "predictions.csv.parts").exists()
