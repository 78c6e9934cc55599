"""Exact distributed evaluation: every item of a set counted once, at any number of processes."""

import torch
from accelerate.utils import gather_object

from tl.data import to_input


@torch.inference_mode()
def gather_in_order(fn, loader, accelerator, total: int) -> torch.Tensor:
    """fn(batch) for every item of a set, as float32 rows in set order on the CPU of every process.

    `loader` holds this process's strided shard of the set (items rank, rank+world, ...) with no
    padding, possibly none at all, so each item counts exactly once at any world size.
    """
    rows = [fn(to_input(x, accelerator.device)).float().cpu() for x, _ in loader]
    shards = gather_object([torch.cat(rows) if rows else None])  # one entry per process, in rank order
    world = len(shards)
    order = [i for rank, shard in enumerate(shards) if shard is not None
             for i in range(rank, total, world)]
    out = torch.cat([shard for shard in shards if shard is not None])
    assert len(out) == total == len(order), (len(out), total)
    return out[torch.tensor(order).argsort()]


def evaluate(model, loader, accelerator, total: int) -> torch.Tensor:
    """Class probabilities for every image of the set, in order, on every process.

    Pass the unwrapped model: DDP's forward may talk to the other processes, and shards of
    different lengths make different numbers of forward calls.
    """
    return gather_in_order(lambda x: model(x).float().softmax(1), loader, accelerator, total)
