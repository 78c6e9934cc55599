"""Shared fixtures: a tiny generated ImageFolder set, the real one when ../shared has it."""

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two test files at once (pytest-xdist): one thread each fills the two cores, where two
    # threads each would spin against each other. Set before torch is imported, and inherited by every run.
    os.environ["OMP_NUM_THREADS"] = "1"

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
os.environ.setdefault("PYTHONFAULTHANDLER", "1")  # a hung command's stacks on SIGABRT (run_cli's timeout)
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
def sixty_four(tmp_path_factory) -> Path:
    """64 train images in 2 classes: two optimizer steps of batch 32 (gradient accumulation's tests)."""
    return make_imagefolder(tmp_path_factory.mktemp("acc") / "d", n_train=32, n_val=4, size=48)


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


class Forked:
    """A command running in a child of the fork server: the parts of subprocess.Popen the tests use."""

    def __init__(self, out: Path, err: Path, argv: list[str]):
        self.out, self.err, self.args = out, err, argv
        self.pid, self.returncode = None, None
        self.started, self.done = threading.Event(), threading.Event()

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        if not self.done.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig):
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def stderr_text(self) -> str:
        return self.err.read_text(errors="replace")

    def communicate(self, timeout=None) -> tuple[str, str]:
        self.wait(timeout)
        return self.out.read_text(errors="replace"), self.stderr_text()


class ForkServer:
    """tests/forkserver.py, started once per test session: it forks each train.py or tl.X command."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "forkserver.py")], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        assert "ready" in json.loads(self.proc.stdout.readline()), "the fork server did not start"
        self.dir = Path(tempfile.mkdtemp(prefix="tl-forks-"))
        self.lock, self.waiting, self.count = threading.Lock(), {}, 0
        threading.Thread(target=self._replies, daemon=True).start()
        atexit.register(self.close)

    def close(self):
        self.proc.stdin.close()  # the server kills what still runs and exits
        self.proc.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _replies(self):
        for line in self.proc.stdout:
            reply = json.loads(line)
            forked = self.waiting[reply["id"]]
            if "pid" in reply:
                forked.pid = reply["pid"]
                forked.started.set()
            else:
                forked.returncode = reply["returncode"]
                del self.waiting[reply["id"]]
                forked.done.set()

    def start(self, argv: list[str], module: str | None, cwd: Path, env: dict) -> Forked:
        with self.lock:
            self.count += 1
            i = self.count
            forked = Forked(self.dir / f"{i}.out", self.dir / f"{i}.err", argv)
            self.waiting[i] = forked
            request = {"id": i, "argv": argv, "module": module, "cwd": str(cwd), "env": env,
                       "stdout": str(forked.out), "stderr": str(forked.err)}
            self.proc.stdin.write(json.dumps(request) + "\n")
        assert forked.started.wait(60), "the fork server did not answer"
        return forked


_server: ForkServer | None = None


def spawn(*args, env=None, cwd=ROOT) -> "Forked | subprocess.Popen":
    """Start a command line as a user would, output to files (Forked.communicate reads them). train.py,
    a bench/*.py script and `-m tl.X` fork from the fork server (a real process, without 4 s of imports);
    anything else (torchrun, accelerate launch, -c) is a new process."""
    global _server
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    args = [str(a) for a in args]
    if args[0].endswith(".py") or (args[0] == "-m" and args[1].startswith("tl.")):
        if _server is None or _server.proc.poll() is not None:
            _server = ForkServer()
        if args[0] == "-m":
            return _server.start([args[1], *args[2:]], args[1], cwd, full_env)
        script = str(ROOT / "train.py") if args[0] == "train.py" else args[0]
        return _server.start([script, *args[1:]], None, cwd, full_env)
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_cli(*args, env=None, cwd=ROOT, timeout=600) -> subprocess.CompletedProcess:
    """Run a command line as a user would (see spawn); returns the finished process, output captured. A
    command still running after `timeout` s has hung: the failure shows every process's Python stacks."""
    proc = spawn(*args, env=env, cwd=cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stacks = hung_stacks(proc)
        raise AssertionError(f"{' '.join(map(str, args))} hung for {timeout} s; the Python stacks of its processes "
                             f"(faulthandler, on SIGABRT):\n{stacks}") from None
    return subprocess.CompletedProcess(list(args), proc.returncode, out, err)


def hung_stacks(proc) -> str:
    """SIGABRT to a hung command and every process under it (PYTHONFAULTHANDLER, set above, makes each
    print its threads' stacks), then SIGKILL; the end of what they printed."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        procs = []
    for p in reversed(procs):  # the workers first: a launcher may kill them once it sees a child die
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGABRT)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=30)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    return (err or "")[-20000:]


def one_line_stop(proc: subprocess.CompletedProcess, signum: int, *phrases: str) -> None:
    """A stop signal honoured as the command line shows it: exit status 128 + signum, one `stopped by` line
    holding every phrase, no `error:` line, no traceback."""
    assert proc.returncode == 128 + signum, (proc.stdout + proc.stderr)[-2000:]
    lines = proc.stderr.replace("\r", "\n").splitlines()
    stops = [line for line in lines if line.startswith(("stopped by ", "sweep stopped by "))]
    assert len(stops) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not [line for line in lines if line.startswith("error: ")], proc.stderr[-2000:]
    for phrase in phrases:
        assert phrase in stops[0], stops[0]


def one_line_error(proc: subprocess.CompletedProcess, *phrases: str) -> None:
    """A user error as the command line shows it: exit status 2, one `error:` line holding every phrase, no
    traceback (lines before it, such as progress bars and warnings, are allowed)."""
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-2000:]
    errors = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
