"""Shared fixtures: a tiny generated ImageFolder set, the real one when ../shared has it."""

import os
import subprocess
import sys
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
