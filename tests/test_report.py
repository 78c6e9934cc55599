"""python -m tl.report on real run dirs: three seeds and another lr, finished, killed and damaged runs; --errors
(what one run got wrong) on a finetune run with a test/ folder and on a feature-extract one."""

import csv
import json
import math
import shutil

import pytest
from conftest import FAST, make_imagefolder, one_line_error, run_cli
from PIL import Image

from tl.core.config import parse_args
from tl.core.errors import UserError
from tl.inference.mistakes import errors_report
from tl.report import report
from tl.train.loop import train

# Trains and exports real runs in a module fixture: a minute or two, so `make test` only.
pytestmark = pytest.mark.slow

SEEDS = {"s0": 0, "s1": 1, "s2": 2}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_data, base_weights):
    """A sweep dir: s0, s1, s2 differ only by seed; lr has another --lr. feature-extract: a fifth of
    finetune's time, and the seeds' heads still reach different accuracies."""
    from accelerate.state import AcceleratorState

    root = tmp_path_factory.mktemp("report") / "sweep"
    for name, extra in [*((n, ["--seed", str(s)]) for n, s in SEEDS.items()), ("lr", ["--lr", "0.01"])]:
        AcceleratorState._reset_state(reset_partial_state=True)
        train(parse_args(["--mode", "feature-extract", "--data-dir", str(tiny_data), "--epochs", "2",
                          "--weights", str(base_weights), "--output-dir", str(root / name), *FAST, *extra]))
    return root


@pytest.fixture
def copy(sweep, tmp_path):
    """A copy of the sweep that a test may damage (without the checkpoints and pictures: not read)."""
    return shutil.copytree(sweep, tmp_path / "sweep", ignore=shutil.ignore_patterns("*.safetensors", "*.png"))


def summary(run) -> dict:
    return json.loads((run / "summary.json").read_text())


def by_run(rows) -> dict:
    return {r["run"]: r for r in rows if r["kind"] == "run"}


def test_three_seeds_give_three_rows_and_their_mean_and_sample_std(sweep, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # two run dirs given: the report goes to the current dir
    result = report([str(sweep / n) for n in SEEDS])
    assert result["options"] == ["seed"]  # output_dir, wandb names etc. differ or not: never shown
    runs, means = by_run(result["rows"]), [r for r in result["rows"] if r["kind"] == "mean"]
    assert list(runs) == list(SEEDS) and len(means) == 1
    accs = [summary(sweep / n)["best_val_acc"] for n in SEEDS]
    mean = sum(accs) / 3
    assert means[0]["n"] == 3 and means[0]["best_val_acc"] == pytest.approx(mean)
    assert means[0]["best_val_acc_std"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in accs) / 2))
    assert means[0]["options"] == {"seed": "0,1,2"}
    for name, row in runs.items():
        s = summary(sweep / name)
        assert (row["best_val_acc"], row["best_epoch"], row["epochs_done"]) == (s["best_val_acc"], s["best_epoch"], 2)
        assert row["status"] == "done" and row["wall_s"] == s["total_seconds"] and row["train_images_per_s"] > 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["run", "seed", "status", "best", "val", "acc", "best", "epoch", "epochs", "done",
                              "wall", "s", "train", "img/s"]
    assert out[-3].startswith("mean ± std (n=3)") and f"{mean:.4f} ± " in out[-3]
    assert out[-2].startswith("* the feature cache: ")  # feature-extract runs: the head's speed alone
    assert out[-1] == f"wrote report.md, report.csv, report.png in {tmp_path}"
    for name in ("report.md", "report.csv", "report.png"):
        assert (tmp_path / name).is_file()
        assert not (sweep / name).exists() and not (sweep / "s0" / name).exists()


def test_sweep_dir_shows_differing_options_and_groups_by_all_but_seed(sweep, copy):
    result = report([str(copy)])  # a sweep alone: the report goes into it
    assert result["out"] == copy and result["options"] == ["lr", "seed"]
    rows = result["rows"]
    # lr sorts first; its group has one run, so no mean; then the seeds and their mean
    assert [(r["run"], r["kind"]) for r in rows] == [("lr", "run"), ("s0", "run"), ("s1", "run"), ("s2", "run"),
                                                    ("mean ± std (n=3)", "mean")]
    assert by_run(rows)["lr"]["options"] == {"lr": 0.01, "seed": 0}
    assert rows[-1]["options"] == {"lr": 0.001, "seed": "0,1,2"}

    with open(copy / "report.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == [r["run"] for r in rows]
    assert list(table[0])[:5] == ["run", "kind", "status", "lr", "seed"] and "test_acc" not in table[0]
    for r in table[:4]:
        assert float(r["best_val_acc"]) == summary(copy / r["run"])["best_val_acc"]
        assert float(r["train_images_per_s"]) > 0 and r["path"] == str(copy / r["run"])
    assert float(table[4]["best_val_acc_std"]) == pytest.approx(rows[-1]["best_val_acc_std"])
    assert table[4]["n"] == "3" and table[4]["seed"] == "0,1,2"

    md = (copy / "report.md").read_text().splitlines()
    assert "| run | lr | seed | status | best val acc | best epoch | epochs done | wall s | train img/s |" in md
    assert any(line.startswith("| mean ± std (n=3) | 0.001 | 0,1,2 |") for line in md)

    with Image.open(copy / "report.png") as img:
        img.verify()
        assert img.format == "PNG" and img.width > 600

    again = report([str(copy)])  # the report files beside the runs are not taken for runs
    assert [r["run"] for r in again["rows"]] == [r["run"] for r in rows]


def test_killed_run_is_incomplete_and_left_out_of_the_mean(copy):
    s2 = copy / "s2"
    (s2 / "summary.json").unlink()  # killed before the end: metrics.jsonl has epoch 1 only
    first = (s2 / "metrics.jsonl").read_text().splitlines()[0]
    (s2 / "metrics.jsonl").write_text(first + "\n")
    rows = report([str(copy)])["rows"]
    row = by_run(rows)["s2"]
    assert row["status"] == "incomplete" and row["epochs_done"] == 1
    assert (row["best_val_acc"], row["best_epoch"]) == (json.loads(first)["val_acc"], 1)
    mean = rows[-1]
    assert mean["run"] == "mean ± std (n=2, 1 incomplete left out)" and mean["n"] == 2
    accs = [summary(copy / n)["best_val_acc"] for n in ("s0", "s1")]
    assert mean["best_val_acc"] == pytest.approx(sum(accs) / 2)
    md = (copy / "report.md").read_text()
    assert "| s2 | 0.001 | 2 | incomplete |" in md and "| 1/2 |" in md  # epochs done of planned


def test_damaged_files_give_warnings_and_rows_not_a_crash(copy):
    with open(copy / "s1" / "metrics.jsonl", "a") as f:
        f.write("garbage\n[1, 2]\n{\"epoch\": 3, \"val_a")  # damage, and half a line cut by a kill
    (copy / "s0" / "summary.json").write_text("{not json")
    (copy / "lr" / "config.json").unlink()
    with pytest.warns(UserWarning) as caught:
        rows = report([str(copy)])["rows"]
    messages = " ".join(str(w.message) for w in caught)
    assert "left out 3 of 5 lines, not metrics rows" in messages and "summary.json" in messages
    assert "has no config.json" in messages
    runs = by_run(rows)
    assert runs["s1"]["status"] == "done; 3 bad lines in metrics.jsonl" and runs["s1"]["epochs_done"] == 2
    assert [e["epoch"] for e in runs["s1"]["curve"]] == [1, 2]
    assert runs["s0"]["status"] == "incomplete; summary.json unreadable"
    assert runs["lr"]["status"] == "done; no config.json" and runs["lr"]["best_val_acc"] is not None
    assert runs["lr"]["options"] == {"seed": None}  # unknown options; only the seed differs among the rest


def test_test_accuracy_column_and_its_mean_when_summaries_have_one(copy):
    for name, acc in zip(SEEDS, (0.5, 0.75, 1.0)):
        s = summary(copy / name)
        (copy / name / "summary.json").write_text(json.dumps(s | {"test_acc": acc}))
    result = report([str(copy)])
    assert "test acc" in result["header"]
    mean = result["rows"][-1]
    assert mean["test_acc"] == pytest.approx(0.75) and mean["test_acc_std"] == pytest.approx(0.25)
    assert by_run(result["rows"])["lr"]["test_acc"] is None
    assert "0.7500 ± 0.2500" in (copy / "report.md").read_text()


def test_refuses_to_write_into_a_run_dir(sweep):
    with pytest.raises(UserError, match="is a run dir; pass --out another folder"):
        report([str(sweep / "s0")], out=str(sweep / "s1"))


def test_cli(sweep, tmp_path):
    empty = tmp_path / "empty"
    (empty / "not-a-run").mkdir(parents=True)
    proc = run_cli("-m", "tl.report", str(empty), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: no run dirs") and len(proc.stderr.splitlines()) == 1
    assert not (empty / "report.md").exists()

    proc = run_cli("-m", "tl.report", str(sweep), "--out", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "mean ± std (n=3)" in proc.stdout and proc.stdout.endswith("in out\n")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.csv", "report.md", "report.png"]


@pytest.fixture(scope="module")
def three(tmp_path_factory, base_weights):
    """A finetune run on three classes with a test/ folder (green's images look like red's: mistakes)."""
    from accelerate.state import AcceleratorState

    root = tmp_path_factory.mktemp("errors")
    data = make_imagefolder(root / "data", classes=("blue", "red", "green"), n_train=8, n_val=4, size=72, n_test=3)
    AcceleratorState._reset_state(reset_partial_state=True)
    train(parse_args(["--data-dir", str(data), "--epochs", "2", "--weights", str(base_weights),
                      "--output-dir", str(root / "run"), *FAST]))
    return root / "run", data


def errors_json(folder) -> dict:
    return json.loads((folder / "errors.json").read_text())


def test_errors_report_of_a_run(three):
    run, data = three
    proc = run_cli("-m", "tl.report", str(run), "--errors", "--top", "5")
    assert proc.returncode == 0, proc.stderr
    s, found = summary(run), errors_json(run)
    assert found["accuracy"] == s["best_val_acc"] and found["correct"] == s["val_correct"]  # exactly the run's
    assert found["balanced_accuracy"] == s["val_balanced_acc"] and found["images"] == s["num_val"] == 12
    assert {r["class"]: r["accuracy"] for r in found["per_class"]} == s["per_class_acc"]
    best = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][s["best_epoch"] - 1]
    assert found["mean_loss"] == pytest.approx(best["val_loss"], rel=1e-4)
    assert found["epoch"] == s["best_epoch"] and found["split"] == "val" and found["data_dir"] == str(data)
    assert len(found["top_losses"]) == 5 and all(r["path"].startswith(str(data / "val")) for r in found["top_losses"])
    accuracy = [r["accuracy"] for r in found["per_class"]]
    assert accuracy == sorted(accuracy)
    page = (run / "errors.html").read_text()
    assert page.count("<img ") == 5 and all(f"<td>{c}</td>" in page for c in ("blue", "red", "green"))
    with Image.open(run / "errors.png") as img:
        img.verify()
        assert img.format == "PNG" and img.size[0] == 1000 and img.size[1] <= 840
    lines = proc.stdout.splitlines()
    assert lines[0] == (f"val: accuracy {s['best_val_acc']:.4f} ({s['val_correct']}/12), balanced accuracy "
                        f"{s['val_balanced_acc']:.4f}, 3 classes")
    assert lines[1].startswith("worst classes: ") and lines[2].startswith("most confused (true -> predicted): ")
    assert lines[-1] == f"wrote errors.html, errors.png, errors.json in {run}"


def test_errors_on_test_split_written_elsewhere(three, tmp_path):
    run, _ = three
    proc = run_cli("-m", "tl.report", str(run), "--errors", "--split", "test", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    s, found = summary(run), errors_json(tmp_path / "out")
    assert (found["accuracy"], found["correct"], found["images"]) == (s["test_acc"], s["test_correct"], 9)
    assert found["per_class"] and {r["class"]: r["accuracy"] for r in found["per_class"]} == s["test_per_class_acc"]
    assert len(found["top_losses"]) == 9  # --top 16, of 9 images
    assert proc.stdout.startswith(f"test: accuracy {s['test_acc']:.4f} (")


def test_errors_of_a_feature_extract_run_need_its_base_weights(sweep, tiny_data, base_weights, tmp_path):
    run = sweep / "s0"
    moved = shutil.copytree(tiny_data, tmp_path / "moved")  # the data set elsewhere now: --data-dir
    errors_report(str(run), weights=str(base_weights), data_dir=str(moved), out=str(tmp_path))
    found = errors_json(tmp_path)
    assert found["accuracy"] == summary(run)["best_val_acc"] and found["images"] == 12
    assert found["data_dir"] == str(moved)
    moved_weights = tmp_path / "base.pth"  # without --weights: the recorded file, when it is still there
    shutil.copy(base_weights, moved_weights)
    copy = shutil.copytree(run, tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "data_dir": str(moved)}))
    proc = run_cli("-m", "tl.report", str(copy), "--errors", "--out", str(tmp_path / "o"))
    assert proc.returncode == 0 and f"base weights: {base_weights}, the file the run recorded" in proc.stderr
    from safetensors.torch import load_file, save_file

    from tl.runs.checkpoints import read_metadata

    meta = read_metadata(copy / "best.safetensors")  # the recorded file gone: the error names it and the flag
    save_file(load_file(copy / "best.safetensors"), copy / "best.safetensors",
              {"tl": json.dumps({**meta, "weights": str(tmp_path / "gone.pth")})})
    proc = run_cli("-m", "tl.report", str(copy), "--errors", "--out", str(tmp_path / "o"))
    one_line_error(proc, f"({tmp_path / 'gone.pth'}, not there); pass that file with --weights")


def test_errors_bad_input_is_one_line(three, sweep, tmp_path, base_weights):
    run, data = three
    cases = [
        ([str(sweep), "--errors"], ["has no best.safetensors", "not a run dir", "e.g. runs/sweep/s0"]),
        ([str(run), str(sweep / "s0"), "--errors"], ["--errors takes one run dir, got 2"]),
        ([str(run), "--top", "3"], ["--top go with --errors only"]),
        ([str(run), "--errors", "--top", "0"], ["--top", "must be positive"]),
        ([str(sweep / "s0"), "--errors", "--split", "test", "--weights", str(base_weights)],
         ["has no test/ folder", "--split val"]),
        ([str(tmp_path / "nope"), "--errors"], ["is not a folder; pass a run dir"]),
    ]
    started = tmp_path / "started"  # a run that has not finished an epoch
    started.mkdir()
    shutil.copy(run / "config.json", started / "config.json")
    cases.append(([str(started), "--errors"], ["holds config.json but no epoch's weights yet"]))
    moved = tmp_path / "moved"  # the run's data set is gone from where config.json says
    moved.mkdir()
    shutil.copy(run / "config.json", moved / "config.json")
    (moved / "best.safetensors").symlink_to(run / "best.safetensors")
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps(config | {"data_dir": str(tmp_path / "gone")}))
    cases.append(([str(moved), "--errors"], [f"the run's data set {tmp_path / 'gone'}", "pass --data-dir"]))
    cases.append(([str(moved), "--errors", "--data-dir", str(tmp_path / "gone")], ["does not exist"]))
    other = make_imagefolder(tmp_path / "other", classes=("a", "b", "c"), n_train=1, n_val=1, size=32)
    cases.append(([str(moved), "--errors", "--data-dir", str(other)],
                  ["holds the classes [a, b, c], the run [blue, green, red]", "pass --data-dir"]))
    for argv, phrases in cases:
        one_line_error(run_cli("-m", "tl.report", *argv, cwd=tmp_path), *phrases)
    assert not (moved / "errors.json").exists() and not (sweep / "errors.json").exists()


def test_table_lines_stay_short_and_cached_feature_speeds_are_marked(copy, capsys):
    """Seen by a newcomer: a ~140-character preprocessing column, and feature-cache epochs' train img/s
    beside full-model ones without a word."""
    config = json.loads((copy / "lr" / "config.json").read_text())
    config |= {"mode": "finetune", "data_dir": "/" + "very-long-folder-name/" * 5 + "hymenoptera_data",
               "preprocessing": {**config["preprocessing"], "resize": 999}}
    (copy / "lr" / "config.json").write_text(json.dumps(config))
    result = report([str(copy)])
    printed = capsys.readouterr().out
    assert "preprocessing" not in result["options"] and "data_dir" in result["options"]
    assert max(len(line) for line in printed.splitlines()) < 200, printed
    assert "/very-long-folder-name/very-long-fold..." in printed and "hymenoptera_data" not in printed
    speeds = {r["run"]: r["cached_features"] for r in result["rows"] if r["kind"] == "run"}
    assert speeds == {"s0": True, "s1": True, "s2": True, "lr": False}
    assert "* the feature cache: the head alone on backbone features" in printed
    marked = [line.split()[0] for line in printed.splitlines() if line.rstrip().endswith("*")]
    assert marked == ["s0", "s1", "s2"], printed
