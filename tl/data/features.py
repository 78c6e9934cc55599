"""The feature cache: a frozen backbone gives the same features every epoch, so compute them once.

Each process computes the features of its strided part of a split (rows rank, rank+world, ...)
and writes them to its own .npy file in the run dir's FEATURES folder; then every process
memory-maps every file: row i of a split is row i // world of file i % world. Nothing is gathered
through the process group, the OS page cache holds one copy per node that its processes share, and
a set larger than memory is paged from disk. So --output-dir must be one file system for every
node, as a resume already needs (every process reads the saved state). On a GPU, features that fit
in half its free memory are copied there once and batches are indexed there.

Files are never trusted across runs: a run clears the folder and computes them afresh, and each
process removes its own files when the run ends, however it ends (`remove_files`).
"""

import contextlib
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from tl.core.errors import UserError
from tl.data.loaders import PAD, ShardSampler, eval_loader, train_sampler
from tl.data.preprocess import TUTORIAL, Preprocess, to_input


def part_path(folder: Path, split: str, rank: int, world: int) -> Path:
    return folder / f"{split}-rank{rank}-of-{world}.npy"


def backbone_features(model, head_name: str, splits: dict[str, Dataset], batch_size: int, accelerator,
                      folder: Path, num_workers: int = 0, pre: Preprocess = TUTORIAL) -> dict[str, list[torch.Tensor]]:
    """What the frozen backbone feeds the head, for every image of each split, computed once: this
    process writes its parts, then maps every process's (float32 rows, split order as above)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)  # a killed run's leftovers
    accelerator.wait_for_everyone()
    try:
        folder.mkdir(exist_ok=True)
    except FileNotFoundError:  # the main process made the run dir, on another file system
        raise UserError(f"{folder.parent} does not exist on this node: the feature cache needs --output-dir on a "
                        "file system every node shares (a resume needs it too); use one, or pass "
                        "--feature-cache off") from None
    head = model.get_submodule(head_name)
    model.set_submodule(head_name, torch.nn.Identity())
    try:
        for split, images in splits.items():
            loader = eval_loader(images, batch_size, num_workers, rank, world)
            # minutes on a CPU for the tutorial's set: the main process shows its share's progress
            with tqdm(total=len(loader.dataset), unit="img", desc=f"feature cache {split}", leave=False,
                      disable=not accelerator.is_main_process) as bar:
                write_part(model, loader, accelerator, part_path(folder, split, rank, world), pre, bar.update)
    finally:
        model.set_submodule(head_name, head)
    accelerator.wait_for_everyone()  # every part is complete
    return {split: [read_part(part_path(folder, split, r, world), len(range(r, len(images), world)))
                    for r in range(world)] for split, images in splits.items()}


@torch.inference_mode()
def write_part(model, loader: DataLoader, accelerator, path: Path, pre: Preprocess = TUTORIAL,
               progress=lambda n: None) -> None:
    """This process's rows, streamed to an .npy file under a temporary name until complete; progress(images)
    after each batch."""
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as f, accelerator.autocast():
            dim = 0
            for x, _ in loader:
                rows = model(to_input(x, accelerator.device, pre)).float().cpu()
                if not dim:  # the header needs the width, known from the first batch
                    dim = rows.shape[1]
                    write_header(f, len(loader.dataset), dim)
                f.write(rows.numpy().tobytes())
                progress(len(rows))
            if not dim:  # more processes than images: an empty part
                write_header(f, 0, 0)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write the feature cache {tmp} ({e.strerror or e}); free disk space in "
                        f"{path.parent.parent} or pass --feature-cache off") from None


def write_header(f, rows: int, dim: int) -> None:
    np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (rows, dim)})


def read_part(path: Path, rows: int) -> torch.Tensor:
    """A part, memory-mapped copy-on-write (it is never written, so its pages stay the page cache's)."""
    try:
        part = np.load(path, mmap_mode="c")
    except (OSError, ValueError) as e:
        raise UserError(not_shared(path, e)) from None
    if part.dtype != np.float32 or part.ndim != 2 or len(part) != rows:
        raise UserError(not_shared(path, f"{part.dtype} {part.shape}, not {rows} float32 rows"))
    return torch.from_numpy(part)


def not_shared(path: Path, why) -> str:
    return (f"cannot read {path}, which another process has just written ({why}): the feature cache needs "
            "--output-dir on a file system every node shares; use one, or pass --feature-cache off")


def remove_files(folder: Path, rank: int, world: int) -> None:
    """This process's files, temporary ones included; the last process to leave removes the folder."""
    for path in folder.glob(f"*-rank{rank}-of-{world}.*"):
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()  # refused while another process's files remain: that process removes it


class FeatureRows(Dataset):
    """Feature rows and their labels; row i is parts[i % len(parts)][i // len(parts)]. DataLoader
    fetches a batch with one __getitems__ call: one fancy-index per part, not one call per row."""

    def __init__(self, parts: list[torch.Tensor], targets: torch.Tensor):
        self.dim = max(p.shape[1] for p in parts)
        self.parts = [p if len(p) else p.new_empty(0, self.dim) for p in parts]  # an empty part's .npy is 0x0
        self.targets = targets
        self.device = targets.device

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.as_tensor(indices)
        if self.device.type == "cuda":  # pinned, asynchronous: the loop's queued steps are not waited for
            i = i.pin_memory().to(self.device, non_blocking=True)
        repeat = i < 0  # ShardSampler's repeat of row -1 - i: the same features, a label the loss ignores
        i = torch.where(repeat, -1 - i, i)
        y = torch.where(repeat, PAD, self.targets[i])
        world = len(self.parts)
        if world == 1:  # one gather; a boolean mask would also wait for the device
            return self.parts[0][i], y
        x = torch.empty(len(i), self.dim, device=self.device)
        for r, part in enumerate(self.parts):
            mine = i % world == r
            x[mine] = part[i[mine] // world]
        return x, y

    def nbytes(self) -> int:
        return len(self) * self.dim * 4

    def to(self, device: torch.device) -> "FeatureRows":
        """All rows in one tensor on the device, in order."""
        rows = torch.empty(len(self), self.dim, device=device)
        for r, part in enumerate(self.parts):
            rows[r::len(self.parts)] = part.to(device)
        return FeatureRows([rows], self.targets.to(device))


def as_batch(batch):
    """The collate for FeatureRows: __getitems__ already returns the batch."""
    return batch


def feature_loaders(train: FeatureRows, val: FeatureRows, batch_size: int, val_batch_size: int, seed: int,
                    accelerator, balanced: bool = False) -> tuple[DataLoader, ShardSampler, DataLoader]:
    """As make_loaders: train shuffled and sharded by ShardSampler; `val` is this process's own
    strided part (its own file), in order. On a GPU with room, both move there first."""
    device = accelerator.device
    if device.type == "cuda" and train.nbytes() + val.nbytes() <= torch.cuda.mem_get_info(device)[0] / 2:
        train, val = train.to(device), val.to(device)
    pin = train.device.type == "cpu" and torch.cuda.is_available()  # device tensors cannot be pinned
    sampler = train_sampler(train, train.targets.tolist(), balanced, seed, accelerator.process_index,
                            accelerator.num_processes)
    train_loader = DataLoader(train, batch_size=batch_size, sampler=sampler, pin_memory=pin, collate_fn=as_batch,
                              generator=torch.Generator().manual_seed(seed))  # as make_loaders
    val_loader = DataLoader(val, batch_size=val_batch_size, pin_memory=pin, collate_fn=as_batch)
    return train_loader, sampler, val_loader
