"""Label files (--data-file): a CSV or JSONL of path,label[,split] instead of class folders."""

import json
import random
import shutil
from pathlib import Path

import pytest
from conftest import FAST, make_imagefolder, one_line_error, run_cli
from safetensors.torch import load_file
from test_checkpoint import metrics_without_timings

from tl.core.errors import UserError
from tl.data.labels import list_label_file, samples_for_predict
from tl.data.listing import list_images
from tl.pack import pack
from tl.predict import predict


def rows_of(root: Path, base: Path, splits=("train", "val", "test")) -> list[tuple[str, str, str]]:
    """(path relative to base, class, split) of every image of an ImageFolder."""
    return [(f.relative_to(base).as_posix(), c.name, split) for split in splits if (root / split).is_dir()
            for c in sorted((root / split).iterdir()) for f in sorted(c.iterdir())]


def write_csv(path: Path, rows, header="path,label,split", shuffle=True) -> Path:
    rows = list(rows)
    if shuffle:  # the file's order must not matter
        random.Random(0).shuffle(rows)
    path.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows))
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(dict(zip(("path", "label", "split"), r))) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("labels")
    root = make_imagefolder(base / "set", n_train=8, n_val=5, n_test=3)
    return root, write_csv(base / "labels.csv", rows_of(root, base))


def test_a_label_file_lists_what_its_folders_list(data, tmp_path):
    root, csv_file = data
    folders, listed = list_images(root), list_label_file(csv_file)
    assert listed.classes == folders.classes
    for split in ("train", "val", "test"):
        assert getattr(listed, split) == getattr(folders, split)
    # JSONL, paths under --data-root, another order: the same data set, the same fingerprint
    jsonl = write_jsonl(tmp_path / "x.jsonl", sorted(rows_of(root, root.parent), key=lambda r: r[0], reverse=True))
    again = list_label_file(jsonl, data_root=str(root.parent))
    assert (again.train, again.val, again.test, again.fingerprint) == \
        (listed.train, listed.val, listed.test, listed.fingerprint)
    renamed = write_csv(tmp_path / "y.csv", [(p, "x" + c, s) for p, c, s in rows_of(root, root.parent)])
    assert list_label_file(renamed, data_root=str(root.parent)).fingerprint != listed.fingerprint


def test_without_a_split_column_val_split_holds_out_val(data, tmp_path):
    root, _ = data
    rows = [(p, c) for p, c, s in rows_of(root, root.parent) if s == "train"]
    no_split = tmp_path / "n.csv"
    no_split.write_text("path,label,notes\n" + "".join(f"{p},{c},whatever\n" for p, c in rows))
    with pytest.raises(UserError, match="no split column.*--val-split"):
        list_label_file(no_split, data_root=str(root.parent))
    listed = list_label_file(no_split, data_root=str(root.parent), val_split=0.25)
    assert (len(listed.train), len(listed.val)) == (12, 4)
    assert [c for _, c in listed.val] == [0, 0, 1, 1]
    assert listed.val == list_label_file(no_split, data_root=str(root.parent), val_split=0.25).val  # deterministic


@pytest.mark.parametrize("text, message", [
    ("file,class\nset/train/blue/000.jpg,blue\n", "line 1 is 'file,class', not a header naming the columns"),
    ("set/train/blue/000.jpg,blue,train\n", "not a header naming the columns path,label[,split]"),
    ("path,label,split\nset/train/blue/000.jpg,blue,train\nset/train/nope.jpg,red,train\n",
     "line 3: set/train/nope.jpg does not exist (relative to the label file"),
    ("path,label,split\nset/train/blue/000.jpg,blue,training\n", "line 2 has the split 'training'; a split is one of"),
    ("path,label,split\nset/train/blue/000.jpg,,train\n", "line 2 has an empty label"),
    ("path,label,split\nset/train/blue/000.jpg,blue,train\nset/train/red/000.jpg,red,train\n"
     "set/val/blue/000.jpg,blue,val\n", "class 'red' (first at"),
    ("path,label,split\nset/train/blue/000.jpg,blue,train\n./set/train/blue/000.jpg,blue,val\n",
     "line 3 lists ./set/train/blue/000.jpg again (first at line 2)"),
    ("path,label,split\nset/train/blue/000.jpg,blue\n", "line 2 has 2 field(s) where the header names 3"),
    ("path,label,split\n", "lists no images"),
    ("path,label,split\nset/train,blue,train\n", "line 2: set/train is not a regular file"),
])
def test_bad_label_files_name_the_line(data, text, message):
    root, _ = data
    bad = root.parent / "bad.csv"
    bad.write_text(text)
    with pytest.raises(UserError, match=None) as e:
        list_label_file(bad)
    assert message in str(e.value), str(e.value)


def test_bad_jsonl_lines(data):
    root, _ = data
    bad = root.parent / "bad.jsonl"
    bad.write_text('{"path": "set/train/blue/000.jpg", "label": "blue", "split": "train"}\n{"path": "x.jpg"\n')
    with pytest.raises(UserError, match="bad.jsonl line 2 is not valid JSON"):
        list_label_file(bad)
    bad.write_text('{"path": "set/train/blue/000.jpg", "label": "blue", "split": "train"}\n{"file": "x.jpg"}\n')
    with pytest.raises(UserError, match="line 2 has no path and no label key"):
        list_label_file(bad)
    bad.write_text('{"path": "set/train/blue/000.jpg", "label": "blue", "split": "train"}\n'
                   '{"path": "set/val/blue/000.jpg", "label": "blue"}\n')
    with pytest.raises(UserError, match="line 2 has no split"):
        list_label_file(bad)


def test_a_label_file_run_is_the_folder_run(data, tmp_path):
    """The same images from a label file (stream mode here, memory in the folder run): the same run."""
    root, csv_file = data
    args = ["--epochs", "2", "--lr", "0.01", "--weights", "none", *FAST]
    folder = run_cli("train.py", "--data-dir", root, "--data-mode", "memory", "--output-dir", tmp_path / "f", *args)
    assert folder.returncode == 0, folder.stderr[-2000:]
    labelled = run_cli("train.py", "--data-file", csv_file, "--data-mode", "stream", "--num-workers", "1",
                       "--output-dir", tmp_path / "l", *args)
    assert labelled.returncode == 0, labelled.stderr[-2000:]
    assert metrics_without_timings(tmp_path / "f") == metrics_without_timings(tmp_path / "l")
    folder_best, labelled_best = (load_file(tmp_path / d / "best.safetensors") for d in ("f", "l"))
    assert folder_best.keys() == labelled_best.keys()
    assert all((folder_best[k] == v).all() for k, v in labelled_best.items())
    f, lab = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("f", "l"))
    assert (lab["test_acc"], lab["test_total"]) == (f["test_acc"], 6)
    config = json.loads((tmp_path / "l" / "config.json").read_text())
    assert config["data_file"] == str(csv_file) and config["classes"] == ["blue", "red"]
    # tl.predict over the label file's test rows, and the run's val rows of it, as the run scored them
    proc = run_cli("-m", "tl.predict", "--checkpoint", tmp_path / "l" / "best.safetensors", "--data-file", csv_file,
                   "--split", "test", "--out", tmp_path / "test.csv")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"accuracy {lab['test_acc']:.4f} ({lab['test_correct']}/6)" in proc.stdout
    assert len((tmp_path / "test.csv").read_text().splitlines()) == 1 + 6
    result = predict(tmp_path / "l" / "best.safetensors", [], val_of=str(csv_file))
    assert result["accuracy"] == lab["best_val_acc"] and len(result["predictions"]) == 10
    # a pack of the label file trains the same run again
    packed = pack(csv_file, tmp_path / "pack", progress=False)
    assert packed["fingerprint"] == list_label_file(csv_file).fingerprint
    again = run_cli("train.py", "--data-dir", tmp_path / "pack", "--output-dir", tmp_path / "p", *args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert metrics_without_timings(tmp_path / "p") == metrics_without_timings(tmp_path / "l")


def test_an_unreadable_image_names_its_line_unless_strict_images_off(tmp_path):
    root = make_imagefolder(tmp_path / "set", n_train=3, n_val=2)
    (root / "train" / "red" / "001.jpg").write_bytes(b"not a jpeg")
    csv_file = write_csv(tmp_path / "l.csv", rows_of(root, tmp_path), shuffle=False)
    line = 1 + 1 + rows_of(root, tmp_path).index(("set/train/red/001.jpg", "red", "train"))
    args = ["--data-file", csv_file, "--epochs", "1", "--weights", "none", "--image-size", "32", "--batch-size", "4"]
    strict = run_cli("train.py", *args, "--output-dir", tmp_path / "s")
    one_line_error(strict, f"unreadable image {csv_file} line {line}: ", "--strict-images off")
    lenient = run_cli("train.py", *args, "--strict-images", "off", "--mode", "feature-extract", "--output-dir",
                      tmp_path / "o")
    assert lenient.returncode == 0, lenient.stderr[-2000:]
    assert f"skipping unreadable image {csv_file} line {line}" in lenient.stderr
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["skipped_images"] == [str(root / "train" / "red" / "001.jpg")] and summary["num_train"] == 5


def test_label_file_errors_from_the_command_line(data, tmp_path):
    root, csv_file = data
    missing = write_csv(tmp_path / "m.csv", [*rows_of(root, root.parent), ("set/gone.jpg", "red", "val")],
                        shuffle=False)
    proc = run_cli("train.py", "--data-file", missing, "--data-root", root.parent, "--output-dir", tmp_path / "r")
    one_line_error(proc, f"{missing} line {len(rows_of(root, root.parent)) + 2}: set/gone.jpg does not exist",
                   "--data-root")
    one_line_error(run_cli("train.py", "--data-root", root.parent, "--output-dir", tmp_path / "r"),
                   "--data-root is where a --data-file's paths start from")
    one_line_error(run_cli("train.py", "--data-file", tmp_path / "nope.csv", "--output-dir", tmp_path / "r"),
                   "nope.csv does not exist")
    one_line_error(run_cli("-m", "tl.pack", csv_file, tmp_path / "pk", "--data-root", tmp_path),
                   "does not exist (relative to --data-root")


def test_predict_samples_of_a_label_file(data, tmp_path):
    root, csv_file = data
    val = samples_for_predict(csv_file, ["blue", "red"], split="val")
    assert sorted(val) == list_images(root).val
    unlabelled = tmp_path / "u.jsonl"
    unlabelled.write_text("".join(json.dumps({"path": str(p)}) + "\n" for p, _ in list_images(root).test))
    assert samples_for_predict(unlabelled, ["blue", "red"]) == [(p, -1) for p, _ in list_images(root).test]
    with pytest.raises(UserError, match="has the label 'red', not a class of the checkpoint"):
        samples_for_predict(csv_file, ["blue", "green"])


def test_a_label_files_pack_may_sit_beside_its_images(data, tmp_path):
    """A label file's data set is its rows: a pack in the folder its paths start from is not part of it (a
    folder SRC refuses that DST, whose pack would be listed as its images)."""
    root = shutil.copytree(data[0], tmp_path / "set")
    csv_file = write_csv(root / "labels.csv", rows_of(root, root, splits=("train", "val")))
    meta = pack(csv_file, root / "pack", progress=False)
    assert meta["splits"]["train"]["count"] == 16 and (root / "pack" / "tl-pack.json").is_file()
    with pytest.raises(UserError, match="is inside SRC"):
        pack(root, root / "pack2", progress=False)


def test_a_changed_label_file_on_resume_says_which_rows_changed(data, tmp_path):
    """--resume after the label file changed is refused (the run would not be the run it was), naming
    --data-file, the file, and what changed: rows relabelled, moved to another split, added, removed."""
    root, _ = data
    rows = rows_of(root, root.parent, splits=("train", "val"))
    csv_file = write_csv(tmp_path / "l.csv", rows, shuffle=False)
    out = tmp_path / "run"
    args = ["--data-file", csv_file, "--data-root", root.parent, "--output-dir", out, "--weights", "none", *FAST]
    assert run_cli("train.py", *args, "--epochs", "1").returncode == 0
    path, label, split = rows[3]
    other = "red" if label == "blue" else "blue"
    write_csv(csv_file, [(path, other, split), *rows[:3], *rows[4:-1]], shuffle=False)  # relabel one, drop one
    one_line_error(run_cli("train.py", *args, "--epochs", "2", "--resume"), "cannot resume",
                   f"--data-file {csv_file} (rows changed since the run began: 1 relabelled (the first: "
                   f"set/{Path(path).relative_to('set')}, {label} -> {other}), 1 removed (the first: {rows[-1][0]}))")
