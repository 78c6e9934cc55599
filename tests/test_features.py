"""The feature cache: per-process files on disk, mapped by every process, gone when the run ends."""

import contextlib
import copy
import json
import re
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from accelerate import Accelerator
from conftest import FAST, ROOT, run_cli
from torch.utils.data import TensorDataset

from tl.core.config import parse_args
from tl.core.errors import UserError
from tl.core.stop import Stopped, StopRequested
from tl.data import features
from tl.data.features import FeatureRows, backbone_features, feature_loaders, part_path, remove_files
from tl.data.loaders import PAD, ImageSet, make_loaders
from tl.data.preprocess import to_input
from tl.data.splits import Split
from tl.model.network import build_model
from tl.runs.rundir import FEATURES
from tl.train import setup as tl_setup
from tl.train.loop import train


class Rank:
    """An Accelerator's part that the feature cache uses, for one of several processes (threads here)."""

    def __init__(self, rank: int, world: int, barrier: threading.Barrier):
        self.process_index, self.num_processes, self.barrier = rank, world, barrier
        self.is_main_process, self.device = rank == 0, torch.device("cpu")

    def wait_for_everyone(self):
        self.barrier.wait(timeout=60)

    def autocast(self):
        return contextlib.nullcontext()


def as_processes(world: int, fn) -> list:
    """fn(accelerator) as `world` processes would run it: one thread each, meeting at the barriers."""
    if world == 1:
        return [fn(Accelerator(cpu=True))]
    barrier, results, errors = threading.Barrier(world), [None] * world, []

    def one(rank):
        try:
            results[rank] = fn(Rank(rank, world, barrier))
        except BaseException as e:  # noqa: B036 - shown by the test
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=one, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.fixture(scope="module")
def images(tiny_data):
    """The tiny set's val images as uint8 CHW tensors (what ImageSet gives), with their labels."""
    def to_uint8(im):
        return torch.from_numpy(np.array(im.convert("RGB").resize((64, 64)))).permute(2, 0, 1).contiguous()

    folder = torchvision.datasets.ImageFolder(tiny_data / "val", transform=to_uint8)
    xs, ys = zip(*[folder[i] for i in range(len(folder))])
    return TensorDataset(torch.stack(xs), torch.tensor(ys))


@pytest.fixture(scope="module")
def backbone(base_weights):
    model, head = build_model("resnet18", str(base_weights), 2, "feature-extract")
    return model.eval(), head


def forward(model, head, x):
    """A direct pass of the backbone alone (the head replaced by Identity)."""
    model = copy.deepcopy(model)
    model.set_submodule(head, torch.nn.Identity())
    with torch.inference_mode():
        return model(to_input(x, torch.device("cpu"))).float()


@pytest.mark.parametrize("world, n", [(1, 12), (2, 12), (2, 7), (3, 2)])  # (3, 2): one process has no image
def test_each_process_writes_its_rows_and_maps_everyones(tmp_path, images, backbone, world, n):
    model, head = backbone
    subset = torch.utils.data.Subset(images, range(n))
    folder = tmp_path / FEATURES

    def compute(acc):
        return backbone_features(copy.deepcopy(model), head, {"train": subset, "val": subset}, 32, acc, folder)

    every = as_processes(world, compute)
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(f"{s}-rank{r}-of-{world}.npy" for s in ("train", "val") for r in range(world))
    x = images.tensors[0][:n]
    for r in range(world):  # process r holds rows r, r+world, ...: one batch each here, as in the run
        rows = np.load(part_path(folder, "train", r, world))
        assert rows.dtype == np.float32 and len(rows) == len(range(r, n, world))
        if len(rows):
            assert torch.equal(torch.from_numpy(rows), forward(model, head, x[r::world]))
    for parts in every:  # every process maps every part: row i of the split is row i // world of part i % world
        rows = FeatureRows(parts["train"], images.tensors[1][:n])
        got, labels = rows.__getitems__(list(range(n)))
        assert got.shape == (n, 512) and torch.equal(labels, images.tensors[1][:n])
        for i in range(n):
            assert torch.equal(got[i], parts["train"][i % world][i // world])
        assert torch.equal(got[::world], forward(model, head, x[::world]))
    for r in range(world):
        remove_files(folder, r, world)
    assert not folder.exists()  # the last process out removes the folder


def test_a_batch_is_one_fetch_with_the_image_sets_batches(monkeypatch):
    """FeatureRows over per-process parts gives, batch by batch, what a plain dataset over all rows
    gives through make_loaders, the padding ShardSampler repeats included."""
    n, world, dim = 23, 2, 5  # 23 rows over 2 processes: one repeated, with the PAD label
    full, targets = torch.randn(n, dim), torch.randint(0, 3, (n,))
    plain = ImageSet(Split(list(full), targets.tolist(), [str(i) for i in range(n)]))
    parts = [full[r::world].clone() for r in range(world)]
    calls = []
    monkeypatch.setattr(FeatureRows, "__getitem__", lambda self, i: calls.append(i))
    pads = 0
    for rank in range(world):
        own = FeatureRows([parts[rank]], targets[rank::world])
        loader, sampler, val = feature_loaders(FeatureRows(parts, targets), own, 4, 32, 7, Rank(rank, world, None))
        ref, ref_sampler, ref_val = make_loaders(plain, plain, 4, 0, 7, rank, world)
        for epoch in (1, 2):
            sampler.set_epoch(epoch)
            ref_sampler.set_epoch(epoch)
            got, want = list(loader), list(ref)
            assert len(got) == len(want) == 3
            for (x, y), (x0, y0) in zip(got, want):
                assert torch.equal(x, x0) and torch.equal(y, y0)
                pads += int((y == PAD).sum())
        (x, y), = list(val)  # this process's own strided rows, in order
        (x0, y0), = list(ref_val)
        assert val.batch_size == ref_val.batch_size and torch.equal(x, x0) and torch.equal(y, y0)
    assert pads == 2  # one repeat per epoch
    assert calls == []  # never row by row


def test_stale_or_truncated_leftovers_are_recomputed(tmp_path, images, backbone):
    model, head = backbone
    folder = tmp_path / FEATURES
    folder.mkdir()
    np.save(part_path(folder, "train", 0, 1), np.zeros((len(images), 512), np.float32))  # looks complete
    part_path(folder, "val", 0, 1).write_bytes(part_path(folder, "train", 0, 1).read_bytes()[:300])  # truncated
    np.save(part_path(folder, "train", 1, 2), np.zeros((6, 512), np.float32))  # of a run with another world size
    parts = backbone_features(model, head, {"train": images, "val": images}, 32, Accelerator(cpu=True), folder)
    want = forward(model, head, images.tensors[0])
    assert torch.equal(parts["train"][0], want) and torch.equal(parts["val"][0], want)
    assert sorted(p.name for p in folder.iterdir()) == ["train-rank0-of-1.npy", "val-rank0-of-1.npy"]


def test_a_part_another_process_cannot_see_is_one_line(tmp_path):
    path = tmp_path / "train-rank1-of-2.npy"
    with pytest.raises(UserError, match="file system every node shares"):
        features.read_part(path, 3)
    np.save(path, np.zeros((3, 4), np.float32))
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(UserError, match="file system every node shares"):
        features.read_part(path, 3)
    np.save(path, np.zeros((2, 4), np.float32))
    with pytest.raises(UserError, match="not 3 float32 rows"):
        features.read_part(path, 3)


# float32: bf16 features, where the CPU has it, would differ in their last bits with the batch's make-up
RUN = ["--mode", "feature-extract", "--epochs", "3", "--precision", "no"]


def config(tiny_data, base_weights, out, *extra):
    return parse_args([*RUN, "--data-dir", str(tiny_data), "--weights", str(base_weights), "--output-dir", str(out),
                       *FAST, *extra])


def rows(out):
    return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "train_images_per_s")}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tiny_data, base_weights, tmp_path_factory):
    """A clean one-process run."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    out = tmp_path_factory.mktemp("features") / "ref"
    train(config(tiny_data, base_weights, out))
    AcceleratorState._reset_state(reset_partial_state=True)
    return out


def test_a_run_leaves_no_folder_and_trusts_no_leftover(tmp_path, tiny_data, base_weights, reference):
    assert not (reference / FEATURES).exists()
    out = tmp_path / "run"
    (out / FEATURES).mkdir(parents=True)  # a SIGKILLed start's: complete-looking, wrong
    np.save(part_path(out / FEATURES, "train", 0, 1), np.zeros((24, 512), np.float32))
    np.save(part_path(out / FEATURES, "val", 0, 1), np.zeros((12, 512), np.float32))
    train(config(tiny_data, base_weights, out))
    assert rows(out) == rows(reference)
    assert (out / "best.safetensors").read_bytes() == (reference / "best.safetensors").read_bytes()
    assert not (out / FEATURES).exists()


@pytest.mark.parametrize("error", [RuntimeError("boom"), StopRequested(15)])
def test_a_failing_run_removes_its_files(tmp_path, tiny_data, base_weights, monkeypatch, error):
    seen = []

    def fail(train_set, *args):
        folder = tmp_path / "run" / FEATURES
        seen.extend(sorted(p.name for p in folder.iterdir()))
        assert all(len(part) for part in train_set.parts)
        raise error

    monkeypatch.setattr(tl_setup, "feature_loaders", fail)
    out = tmp_path / "run"
    out.mkdir()  # a dir the run did not create stays; only the run's own files go
    with pytest.raises((RuntimeError, Stopped)):  # a stop signal is a stop, not a user error
        train(config(tiny_data, base_weights, out))
    assert seen == ["train-rank0-of-1.npy", "val-rank0-of-1.npy"]  # there while the run was
    assert out.exists() and not (out / FEATURES).exists()


def test_two_processes_compute_the_features_one_does(tmp_path, tiny_data, base_weights, reference):
    """2 processes of batch 4 take the same global batches as 1 of batch 8: equal up to float summation."""
    out = tmp_path / "two"
    args = [*FAST[:-1], "4"]
    proc = run_cli(str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", str(ROOT / "train.py"),
                   *RUN, "--data-dir", str(tiny_data), "--weights", str(base_weights), "--output-dir", str(out),
                   *args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "memory-mapped from" in proc.stdout and not (out / FEATURES).exists()
    warned = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert "broadcast_buffers" not in proc.stderr and len(warned) == len(set(warned)), warned  # each once, by rank 0
    bars = re.findall(r"feature cache (train|val):\s+\d+%", proc.stderr)  # the main process's, no other's
    assert set(bars) == {"train", "val"} and proc.stderr.count("feature cache train:   0%") == 1, proc.stderr[-3000:]
    two, one = rows(out), rows(reference)
    assert [(r["train_images"], r["val_images"], r["val_acc"]) for r in two] == \
        [(r["train_images"], r["val_images"], r["val_acc"]) for r in one] == [(24, 12, r["val_acc"]) for r in one]
    for a, b in zip(two, one):
        for key in ("train_loss", "val_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
