"""Shared fixtures: a tiny generated ImageFolder set, the real one when ../shared has it."""

import contextlib
import gc
import importlib
import io
import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from accelerate.state import AcceleratorState
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
HYMENOPTERA_ZIP = SHARED / "data" / "hymenoptera_data.zip"
PROXY_WEIGHTS = SHARED / "weights" / "resnet18-catsdogs-proxy.pth"
# Small and fast: 64 px crops keep a resnet18 epoch on a few dozen images well under a second.
os.environ.setdefault("WANDB_MODE", "disabled")  # tests that check W&B turn it on
FAST = ["--model", "resnet18", "--image-size", "64", "--batch-size", "8"]


def make_imagefolder(root: Path, classes=("blue", "red"), n_train=12, n_val=6, size=80, seed=0, n_test=0) -> Path:
    """Two classes a small CNN tells apart in a few epochs: reddish vs bluish noisy photos (with
    more classes, the other classes' images are alike); a test/ folder with n_test."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val), *((("test", n_test),) if n_test else ())):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 90, (size, size + 16, 3), dtype=np.uint8)
                img[..., 2 if c == 0 else 0] += 150  # blue or red dominant
                Image.fromarray(img).save(root / split / name / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="session")
def hymenoptera(tmp_path_factory) -> Path:
    if not HYMENOPTERA_ZIP.is_file():
        pytest.skip(f"{HYMENOPTERA_ZIP} not present")
    out = tmp_path_factory.mktemp("hym")
    with zipfile.ZipFile(HYMENOPTERA_ZIP) as z:
        z.extractall(out)
    return out / "hymenoptera_data"


@pytest.fixture(scope="session")
def base_weights(tmp_path_factory) -> Path:
    """A resnet18 state dict in torchvision's format (random init, seeded) to start runs from."""
    path = tmp_path_factory.mktemp("weights") / "resnet18-base.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator, as a fresh process would."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def run_cli(*args, env=None, cwd=ROOT, timeout=600) -> subprocess.CompletedProcess:
    """Run a command line as a user would; returns the finished process (output captured)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, *(str(ROOT / a) if a == "train.py" else a for a in args)]
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def run_here(entry: str, *args, env=None) -> subprocess.CompletedProcess:
    """run_cli's twin in this process, seconds faster than a new Python: `entry` is train.py or a module
    (tl.predict, ...), run through its own main() and tl.errors.run_cli; exit status and output captured.
    Tests of what only a process shows (signals, exit codes of the launcher, start-up) use run_cli."""
    from unittest import mock

    argv = [str(a) for a in args]
    if entry == "train.py":  # what train.py does, without importing the script
        from tl.config import parse_args
        from tl.errors import run_cli as tl_run_cli
        from tl.loop import train
        from tl.stop import Stopper

        def main(argv):
            stopper = Stopper()
            try:
                tl_run_cli(lambda: train(parse_args(argv), stopper))
            finally:
                stopper.restore()
    else:
        main = importlib.import_module(entry).main
    out, err, code, shown = io.StringIO(), io.StringIO(), 0, warnings.showwarning
    with mock.patch.dict(os.environ, env or {}), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result = main(argv)
            code = result if isinstance(result, int) else 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        finally:
            warnings.showwarning = shown  # run_cli's one-line warnings are for a process of its own
            gc.unfreeze()
            AcceleratorState._reset_state(reset_partial_state=True)
    return subprocess.CompletedProcess([entry, *argv], code, out.getvalue(), err.getvalue())
