"""python -m tl.sweep: grids and lists of option sets, their run dirs, a local sweep over seeds that
tl.report summarizes; and launch.sh's expansion of SLURM's task variables (no eval)."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import FAST, ROOT, run_cli

from tl import sweep
from tl.core.errors import UserError
from tl.report import report


def write(tmp_path, text, name="s.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_grid_crossed_with_runs_in_a_stable_order_with_names(tmp_path):
    s = sweep.load(write(tmp_path, "name: lr-seeds\nbase: {epochs: 2, mode: feature-extract}\n"
                                   "runs: [{optimizer: sgd}, {optimizer: adamw, lr: 1.0e-4}]\n"
                                   "grid: {seed: [0, 1], weights: [none, /models/base.pth]}\n"))
    assert s.dir == Path("runs", "lr-seeds") and len(s.sets) == 8
    assert s.sets[0] == {"epochs": 2, "mode": "feature-extract", "optimizer": "sgd", "seed": 0, "weights": "none"}
    assert [(x["optimizer"], x["seed"], x["weights"]) for x in s.sets[:4]] == [
        ("sgd", 0, "none"), ("sgd", 0, "/models/base.pth"), ("sgd", 1, "none"), ("sgd", 1, "/models/base.pth")]
    # Names: the index, then the options that differ across the sets, a default shown as itself.
    assert s.names[:2] == ["0-optimizer=sgd,lr=0.001,seed=0,weights=none",
                           "1-optimizer=sgd,lr=0.001,seed=0,weights=base.pth"]
    assert s.names[7] == "7-optimizer=adamw,lr=0.0001,seed=1,weights=base.pth"
    # train.py's flags: options at their defaults left out, the W&B group is the sweep's name.
    assert s.argv(0) == ["--wandb-group=lr-seeds", "--epochs=2", "--mode=feature-extract", "--weights=none"]
    assert sweep.load(s.file).names == s.names  # deterministic: every array task computes the same


def test_a_list_of_sets_and_no_differing_option(tmp_path):
    s = sweep.load(write(tmp_path, '{"runs": [{"lr": 0.01}, {"lr": 0.1, "compile": true}]}', "l.json"),
                   str(tmp_path / "out"))
    assert (s.name, s.names) == ("l", ["0-lr=0.01,compile=false", "1-lr=0.1,compile=true"])
    assert s.run_dir(1) == tmp_path / "out" / "1-lr=0.1,compile=true" and s.argv(1)[-1] == "--compile"
    assert sweep.load(write(tmp_path, "base: {epochs: 3}\n")).names == ["0"]
    dashes = sweep.load(write(tmp_path, "grid: {batch-size: [4, 8]}\n"))  # keys as flags, too
    assert dashes.names == ["0-batch-size=4", "1-batch-size=8"] and dashes.argv(1)[-1] == "--batch-size=8"


@pytest.mark.parametrize("text, message", [
    ("nme: x\n", "unknown key 'nme'; a sweep file has name, base, grid, runs"),
    ("name: a/b\n", "name must be a plain name"),
    ("base: {lrr: 1}\n", "base: unknown option 'lrr'; did you mean lr?"),
    ("grid: {seed: 1}\n", "grid: seed must be a list of values"),
    ("grid: {seed: [0, one]}\n", "grid: seed must be a whole number, got 'one'"),
    ("grid: {mode: [finetune, fine]}\n", "grid: mode must be one of finetune, feature-extract, lora, got 'fine'"),
    ("runs: {lr: 1}\n", "runs must be a list of option sets"),
    ("runs: [{lr: 0.1}, {seed: x}]\n", "runs[1]: seed must be a whole number"),
    ("base: {output_dir: x}\n", "output_dir is not a sweep option"),
    ("runs: [{seed: 0}]\ngrid: {seed: [1]}\n", "seed is in both grid and runs"),
    ("runs: [{lr: 0.001}, {}]\n", "option sets 0 and 1 are the same"),
    ("grid: {mode: [feature-extract], freeze_epochs: [0, 1]}\n",
     "option set 1 (1-freeze-epochs=1): --freeze-epochs is for --mode finetune"),
])
def test_bad_sweep_files_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(UserError, match=re.escape(message)) as e:
        sweep.load(write(tmp_path, text))
    assert "\n" not in str(e.value)


def test_dry_run_and_launch_args(tmp_path, capsys):
    file = write(tmp_path, "name: seeds\nbase: {epochs: 2, data_dir: my data}\ngrid: {seed: [0, 1, 2]}\n")
    sweep.main([file, "--dry-run", "--sweep-dir", str(tmp_path / "sw")])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"sweep seeds: 3 runs in {tmp_path / 'sw'}, W&B group seeds"
    assert out[1].split() == ["0-seed=0", "new", "--epochs=2", "--data-dir=my", "data"]
    assert out[-1] == f"on SLURM: sbatch --array 0-2 --export ALL,SWEEP_DIR={tmp_path / 'sw'} slurm/sweep.sbatch {file}"
    sweep.main([file, "--index", "2", "--launch-args"])
    assert capsys.readouterr().out.splitlines() == [os.path.join("runs", "seeds", "2-seed=2"), "--wandb-group=seeds",
                                                    "--epochs=2", "--data-dir=my data", "--seed=2"]
    with pytest.raises(SystemExit) as e:
        sweep.main([file, "--index", "3", "--launch-args"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (f"error: --index 3: {file} has 3 option sets, 0 to 2; submit the "
                                               "array as --array 0-2")


@pytest.mark.slow  # three runs, each in its own process (about a minute on 2 cores)
def test_local_sweep_over_seeds_then_report_and_rerun_skips(tmp_path, tiny_data, base_weights):
    base = {"mode": "feature-extract", "data_dir": str(tiny_data), "weights": str(base_weights), "epochs": 2,
            "model": FAST[1], "image_size": int(FAST[3]), "batch_size": int(FAST[5]), "wandb": "disabled"}
    file = write(tmp_path, json.dumps({"name": "seeds", "base": base, "grid": {"seed": [0, 1, 2]}}), "seeds.json")
    out = tmp_path / "sw"
    proc = run_cli("-m", "tl.sweep", file, "--sweep-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == f"sweep seeds: all 3 runs done in {out}; compare them: python -m " \
                                           f"tl.report {out}"
    dirs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert dirs == ["0-seed=0", "1-seed=1", "2-seed=2"]
    for i, d in enumerate(dirs):
        config = json.loads((out / d / "config.json").read_text())
        assert (config["seed"], config["wandb_group"], config["epochs"]) == (i, "seeds", 2)
    result = report([str(out)])
    assert [r["kind"] for r in result["rows"]] == ["run", "run", "run", "mean"] and result["options"] == ["seed"]
    assert result["rows"][-1]["n"] == 3
    # Again: every run is done, nothing trains (no child process starts).
    again = run_cli("-m", "tl.sweep", file, "--sweep-dir", str(out))
    assert again.returncode == 0 and again.stdout.count("done already, skipped") == 3, again.stderr


@pytest.mark.slow  # two processes that start and fail
def test_local_sweep_reports_a_failed_run_and_goes_on(tmp_path, base_weights):
    file = write(tmp_path, f"base: {{data_dir: {tmp_path / 'none'}, wandb: disabled}}\ngrid: {{seed: [0, 1]}}\n")
    proc = run_cli("-m", "tl.sweep", file, "--sweep-dir", str(tmp_path / "sw"))
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3 and "does not exist" in errors[0], proc.stderr  # each run's, then the sweep's
    assert errors[-1].startswith("error: 2 of 2 runs failed: 0-seed=0 (exit status 2), 1-seed=1 (exit status 2)")


def expand(value, **env):
    """launch.sh's expand_task_vars on `value`, run by bash as launch.sh runs it."""
    script = (ROOT / "slurm" / "launch.sh").read_text()
    function = re.search(r"^fail\(\).*?\n", script, re.M).group(0) + \
        re.search(r"^TASK_VARS=.*?\n}\n", script, re.M | re.S).group(0)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(["bash", "-c", function + 'expand_task_vars TRAIN_ARGS "$1"', "_", value],
                          env=clean | env, capture_output=True, text=True)


def test_launch_sh_expands_only_slurms_task_variables_and_runs_nothing(tmp_path):
    task = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_JOB_ID": "40", "SLURM_JOB_ID": "42"}
    done = expand("--seed $SLURM_ARRAY_TASK_ID --wandb-name a${SLURM_ARRAY_JOB_ID}_$SLURM_JOB_ID", **task)
    assert (done.returncode, done.stdout) == (0, "--seed 2 --wandb-name a40_42")
    marker = tmp_path / "ran"
    for value, shown in [(f"--seed $(touch {marker})", "$(touch"), (f"--seed `touch {marker}` $HOME", "$HOME"),
                         ("--x ${HOME}", "${HOME")]:
        refused = expand(value, **task)
        assert refused.returncode == 2 and refused.stdout == "", refused
        assert refused.stderr.startswith(f"error: TRAIN_ARGS holds {shown}, which launch.sh does not expand")
    assert not marker.exists()
    plain = expand("--seed $SLURM_ARRAY_TASK_ID", SLURM_JOB_ID="42")  # not an array job
    assert plain.returncode == 2 and "uses $SLURM_ARRAY_TASK_ID, which job 42 does not have" in plain.stderr
