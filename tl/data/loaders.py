"""Batches: a decoded split as a seeded Dataset, sharded per process with marked padding, in DataLoaders."""

import hashlib
import os
import tempfile

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from tl.core.errors import UserError
from tl.core.stop import ignore_in_worker
from tl.data.splits import Split

SOCKET_PATH = 107  # bytes: a Unix socket's path (sun_path is 108 on Linux, with the closing NUL)
SOCKET_UNDER_TMPDIR = "pymp-12345678/listener-12345678"  # where multiprocessing puts a worker's socket


class ImageSet(Dataset):
    """A decoded split as a Dataset. The transform's randomness comes from (seed, epoch, index) alone,
    so image i's crop and flip at epoch e are the same with 0 or N workers, in any worker order, and
    after a resume; call set_epoch before each epoch's pass."""

    def __init__(self, split: Split, transform=None, seed: int = 0):
        self.split, self.transform, self.seed, self.epoch = split, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.split.images)

    def __getitem__(self, i):
        if i < 0:  # ShardSampler's repeat of image -1 - i: the same pixels, a label the loss ignores
            return self[-1 - i][0], PAD
        x = self.split.images[i]
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):  # the caller's RNG stays as it was
                # The CPU generator only: torch.manual_seed would also reseed (and leave reseeded) the GPUs'.
                torch.default_generator.manual_seed(item_seed(self.seed, self.epoch, int(i)))
                x = self.transform(x)
        return x, self.split.targets[i]


def item_seed(seed: int, epoch: int, i: int) -> int:
    """A 64-bit seed for one image at one epoch; hashed, so nearby (seed, epoch, i) never share streams."""
    return int.from_bytes(hashlib.sha256(f"{seed} {epoch} {i}".encode()).digest()[:8], "little")


PAD = -100  # the label of a repeated image: F.cross_entropy's default ignore_index, never counted


class ShardSampler(DistributedSampler):
    """DistributedSampler (shuffled, every process the same number of images, so the same number of
    steps) whose padding is marked: a repeated image comes as index -1 - i, which datasets return
    with the PAD label, so an epoch trains on and counts each image exactly once at any world size."""

    def __iter__(self):
        n, world = len(self.dataset), self.num_replicas
        return iter(i if self.rank + k * world < n else -1 - i for k, i in enumerate(super().__iter__()))


class BalancedSampler(ShardSampler):
    """--sampler balanced: each epoch len(dataset) draws with replacement, every class equally likely
    (torch.multinomial from a generator seeded by seed + epoch, as DistributedSampler seeds its
    shuffle), then padded, marked and sharded as ShardSampler does. The order depends on (seed, epoch)
    alone: every process draws the same list, and a resume inside an epoch skips into the same list."""

    def __init__(self, dataset, targets: list[int], **kw):
        super().__init__(dataset, shuffle=True, **kw)
        counts = torch.bincount(torch.tensor(targets))
        self.weights = 1.0 / counts[torch.tensor(targets)].double()

    def __iter__(self):
        n, world = len(self.dataset), self.num_replicas
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        indices = torch.multinomial(self.weights, n, replacement=True, generator=g).tolist()
        indices += (indices * (self.total_size // n + 1))[: self.total_size - n]  # DistributedSampler's padding
        mine = indices[self.rank:self.total_size:world]
        return iter(i if self.rank + k * world < n else -1 - i for k, i in enumerate(mine))


def train_sampler(dataset, targets: list[int], balanced: bool, seed: int, rank: int, world: int) -> ShardSampler:
    if balanced:
        return BalancedSampler(dataset, targets, num_replicas=world, rank=rank, seed=seed)
    return ShardSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)


def make_loaders(train_set: Dataset, val_set: Dataset, batch_size: int, num_workers: int, seed: int,
                 rank: int, world: int, batchnorm_training: bool = False, collate_fn=None, balanced: bool = False):
    """Train: shuffled (or --sampler balanced) and sharded (call set_epoch on the sampler and on an
    ImageSet every epoch). Val: a strided shard per process with no padding, so every image counts once."""
    sampler = train_sampler(train_set, train_set.split.targets, balanced, seed, rank, world)
    # BatchNorm cannot train on a batch of one image: then leave out the odd one (a different one each epoch).
    drop_last = batchnorm_training and len(sampler) % batch_size == 1 and len(sampler) > 1
    # No persistent workers: fresh ones each epoch get the dataset's new epoch (set_epoch). Its own
    # generator: starting an epoch's iterator draws a seed, which must not come from the global
    # generator (dropout's), or a resume inside an epoch would draw it once more than the epoch did.
    train_loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                              drop_last=drop_last, pin_memory=torch.cuda.is_available(), collate_fn=collate_fn,
                              generator=torch.Generator().manual_seed(seed), worker_init_fn=ignore_in_worker)
    return train_loader, sampler, eval_loader(val_set, max(batch_size, 32), num_workers, rank, world)


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, rank: int, world: int) -> DataLoader:
    """This process's strided shard of a set to evaluate (tl.model.evaluation.gather_in_order): no padding."""
    return DataLoader(Subset(dataset, range(rank, len(dataset), world)), batch_size=batch_size,
                      num_workers=num_workers, worker_init_fn=ignore_in_worker)


def skip_batches(loader: DataLoader, sampler, batches: int) -> DataLoader:
    """The same epoch's loader without its first `batches` batches (a resume inside an epoch): the
    sampler's order for the epoch and the per-image seeds make the rest exactly what it would be."""
    indices = list(sampler)[batches * loader.batch_size:]
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=indices, num_workers=loader.num_workers,
                      drop_last=loader.drop_last, pin_memory=loader.pin_memory, collate_fn=loader.collate_fn,
                      generator=loader.generator, worker_init_fn=loader.worker_init_fn)


def check_workers_can_start(workers: int, fix: str = "") -> None:
    """DataLoader workers hand each batch's memory over through a Unix socket that multiprocessing makes
    under TMPDIR (pymp-XXXXXXXX/listener-XXXXXXXX). Under a long TMPDIR the socket cannot bind: the worker
    only prints a traceback, and the loader waits for its batch forever. Refused here instead."""
    folder = tempfile.gettempdir()
    longest = SOCKET_PATH - len("/" + SOCKET_UNDER_TMPDIR)
    if workers > 0 and len(os.fsencode(folder)) > longest:
        raise UserError(f"TMPDIR {folder} is too long ({len(os.fsencode(folder))} bytes) for DataLoader worker "
                        f"processes: they pass batches through a socket under it, whose path must stay within "
                        f"{SOCKET_PATH} bytes (TMPDIR at most {longest}); set TMPDIR to a shorter folder (e.g. "
                        f"export TMPDIR=/tmp){fix}")
