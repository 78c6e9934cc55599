"""Every entry point turns impossible values, files of the right name with the wrong content and dirs
that exist but hold nothing into one `error:` line and exit status 2, with nothing written."""

import pytest
import torch
from conftest import make_imagefolder, one_line_error, run_cli

from tl.core.cli import number


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Data, weights files that are not state dicts, an empty dir, files of other content."""
    root = tmp_path_factory.mktemp("cli")
    make_imagefolder(root / "d", n_train=2, n_val=1, size=40)
    torch.save(torch.zeros(3), root / "tensor.pth")
    torch.save([torch.zeros(3)], root / "list.pth")
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, "epoch": 3}, root / "ckpt.pth")
    (root / "empty").mkdir()
    (root / "empty.yaml").write_text("")
    (root / "noise.safetensors").write_bytes(bytes(range(256)) * 4)
    (root / "run").mkdir()
    (root / "run" / "metrics.jsonl").write_text('{"epoch": 1, "val_acc": 0.5}\n')
    return root


TRAIN = ["--data-dir", "{d}/d", "--epochs", "1", "--image-size", "32", "--batch-size", "2", "--weights", "none",
         "--wandb", "disabled", "--output-dir", "{d}/out"]

CASES = [  # (entry point, arguments, the phrase the error line holds)
    ("train.py", ["--batch-size", "0"], "--batch-size must be positive, got 0"),
    ("train.py", ["--epochs", "ten"], "argument --epochs: invalid int value: 'ten'"),
    ("train.py", ["--momentum", "-0.5"], "--momentum must be at least 0 and below 1"),
    ("train.py", ["--momentum", "1"], "--momentum must be at least 0 and below 1"),
    ("train.py", ["--seed", "-1"], "--seed must be from 0 to 2**32 - 1"),
    ("train.py", ["--seed", str(2**32)], "--seed must be from 0 to 2**32 - 1"),
    ("train.py", ["--lr", "inf"], "--lr must be a finite number, got inf"),
    ("train.py", ["--gamma", "nan"], "--gamma must be a finite number"),
    ("train.py", ["--save-every", "inf"], "--save-every must be a finite number"),
    ("train.py", ["--weights", "{d}/tensor.pth"], "holds a Tensor, not a state dict"),
    ("train.py", ["--weights", "{d}/list.pth"], "holds a list, not a state dict"),
    ("train.py", ["--weights", "{d}/ckpt.pth"], "it looks like a training checkpoint: save its 'model' entry"),
    ("train.py", ["--weights", "{d}/noise.safetensors"], "cannot be read"),
    ("train.py", ["--data-dir", "{d}/empty"], "has no train/ folder"),
    ("train.py", ["--resume", "--output-dir", "{d}/empty"], "nothing to resume: {d}/empty holds no run"),
    ("train.py", ["--config", "{d}/tensor.pth"], "cannot read --config"),
    ("tl.predict", ["--checkpoint", "x", "--batch-size", "-1", "{d}/d/val"],
     "argument --batch-size: must be positive, got -1"),
    ("tl.predict", ["--checkpoint", "x", "--batch-size", "2.5", "{d}/d/val"], "must be a whole number, got '2.5'"),
    ("tl.predict", ["--checkpoint", "{d}/noise.safetensors", "{d}/d/val"], "is damaged or not a safetensors file"),
    ("tl.predict", ["--checkpoint", "{d}/empty", "{d}/d/val"], "checkpoint {d}/empty is a folder; pass the best"),
    ("train.py", ["--data-dir", "{d}/tensor.pth"], "data dir {d}/tensor.pth is a file, not a folder"),
    ("tl.predict", ["--checkpoint", "x"], "pass image files or folders, --data-file LABELS"),
    ("tl.export", ["--checkpoint", "{d}/noise.safetensors", "--format", "onnx"], "is damaged"),
    ("tl.export", ["--checkpoint", "x", "--format", "pickle"], "argument --format: invalid choice: 'pickle'"),
    ("tl.pack", ["{d}/d", "{d}/pack", "--shard-size-mb", "0"], "argument --shard-size-mb: must be positive, got 0"),
    ("tl.pack", ["{d}/d", "{d}/pack", "--shard-size-mb", "nan"], "must be positive, got nan"),
    ("tl.pack", ["{d}/d", "{d}/pack", "--workers", "0"], "argument --workers: must be positive, got 0"),
    ("tl.pack", ["{d}/empty", "{d}/pack"], "has no train/ folder"),
    ("tl.pack", ["{d}/d", "{d}/tensor.pth"], "exists and is not a folder"),
    ("tl.sweep", ["{d}/empty.yaml", "--index", "-1"], "argument --index: must be 0 or more, got -1"),
    ("tl.sweep", ["{d}/empty.yaml", "--dry-run"], "sweep file {d}/empty.yaml is empty"),
    ("tl.sweep", ["{d}/empty"], "cannot read sweep file"),
    ("tl.sweep", ["{d}/noise.safetensors"], "cannot read sweep file"),
    ("tl.report", ["{d}/empty"], "no run dirs"),
    ("tl.report", ["{d}/run", "--out", "{d}/tensor.pth"], "cannot make the folder"),
    ("tl.report", [], "the following arguments are required: RUN_OR_SWEEP_DIR"),
    ("tl.report", ["{d}/run", "--out", "{d}/run"], "is a run dir; pass --out another folder"),
]


@pytest.mark.parametrize("entry, args, phrase", CASES, ids=[f"{e} {' '.join(a)}" for e, a, _ in CASES])
def test_bad_input_is_one_error_line(files, entry, args, phrase):
    args = [a.replace("{d}", str(files)) for a in (TRAIN if entry == "train.py" else []) + args]
    before = sorted(p.relative_to(files) for p in files.rglob("*"))
    command = ["train.py"] if entry == "train.py" else ["-m", entry]
    one_line_error(run_cli(*command, *args), phrase.replace("{d}", str(files)))
    assert sorted(p.relative_to(files) for p in files.rglob("*")) == before


def test_number_bounds():
    assert number(int, 1)("3") == 3 and number(float, 0, above=True)("0.5") == 0.5
    for parse, text in ((number(int, 1), "0"), (number(float, 0, above=True), "0"), (number(float, 0), "inf"),
                        (number(int, 0, 9), "10")):
        with pytest.raises(Exception, match="must be"):
            parse(text)


def test_a_warning_or_error_under_an_open_progress_bar_starts_a_line_of_its_own(capsys):
    """A stop signal can land inside a bar's first display: the bar stays open, and the error line came
    right after it on the same line (seen under load in test_run's start-up stop)."""
    import gc
    import warnings

    from tqdm import tqdm

    from tl.core.errors import UserError
    from tl.core.errors import run_cli as tl_run_cli

    def work():
        bar = tqdm(total=10, desc="decode train")  # never closed: the error's traceback keeps it alive
        warnings.warn("skipping unreadable image x.jpg", stacklevel=1)
        del bar.last_print_t, bar.start_t  # as a signal right after a bar's first display leaves it
        raise UserError("it broke")

    shown = warnings.showwarning
    try:
        with pytest.raises(SystemExit):
            tl_run_cli(work)
    finally:
        warnings.showwarning = shown
        gc.unfreeze()
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert "warning: skipping unreadable image x.jpg" in lines and "error: it broke" in lines, lines
