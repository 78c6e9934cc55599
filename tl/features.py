"""The feature cache: a frozen backbone gives the same features every epoch, so compute them once."""

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from tl.eval import gather_in_order


def backbone_features(model, head_name: str, images: Dataset, batch_size: int, accelerator,
                      num_workers: int = 0) -> torch.Tensor:
    """What the frozen backbone feeds the head, for every image, computed once (each process a share)."""
    head = model.get_submodule(head_name)
    model.set_submodule(head_name, torch.nn.Identity())
    rank, world = accelerator.process_index, accelerator.num_processes
    loader = DataLoader(Subset(images, range(rank, len(images), world)), batch_size=batch_size,
                        num_workers=num_workers)
    try:
        with accelerator.autocast():
            return gather_in_order(model, loader, accelerator, len(images))
    finally:
        model.set_submodule(head_name, head)
