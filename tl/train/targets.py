"""What the training loss compares the model's output with: class weights, MixUp/CutMix soft targets.

Without --mixup, --cutmix and --class-weights the loss is the tutorial's cross-entropy on the
labels, computed exactly as before. Mixing uses torchvision's v2.MixUp and v2.CutMix on the
device batch (BatchMix).
"""

import hashlib

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from tl.data.loaders import PAD


def class_weights(targets: list[int], num_classes: int) -> torch.Tensor:
    """--class-weights auto: N / (classes * count) per class, 1 for every class of a balanced set."""
    counts = torch.bincount(torch.tensor(targets), minlength=num_classes).double()
    return (len(targets) / (num_classes * counts)).float()


class BatchMix:
    """v2.MixUp, v2.CutMix, or one of them at random per batch (timm's switch with probability 1/2).

    Their draws come from the CPU generator, reseeded for every batch from (seed, epoch, rank, step)
    and put back afterwards: a batch mixes the same way whatever ran before it, so a run resumed in
    the middle of an epoch mixes its next batch exactly as the uninterrupted run did.
    """

    def __init__(self, mixup: float, cutmix: float, num_classes: int, seed: int, rank: int):
        mixes = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup else []) + \
            ([v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix else [])
        self.transform = mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
        self.seed, self.rank = seed, rank

    def __call__(self, x: torch.Tensor, y: torch.Tensor, y_host: torch.Tensor, epoch: int,
                 step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch mixed and its soft targets. A repeated image (label PAD, left out of the loss) first
        takes the pixels and label of the batch's first real image, so that no real image is mixed with
        a label it cannot know; y_host (the labels on the CPU) decides that without waiting for the device."""
        pad = y_host == PAD
        if pad.all():  # nothing to learn from: the loss counts nothing, the step changes nothing
            return x, None
        if pad.any():
            first = int((~pad).nonzero()[0])
            rows = pad.nonzero().flatten().to(x.device)
            x, y = x.clone(), y.clone()
            x[rows], y[rows] = x[first].clone(), y[first].clone()
        digest = hashlib.sha256(f"mix {self.seed} {epoch} {self.rank} {step}".encode()).digest()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int.from_bytes(digest[:8], "little"))
            return self.transform(x, y)


def batch_mix(mixup: float, cutmix: float, num_classes: int, seed: int, rank: int) -> BatchMix | None:
    return BatchMix(mixup, cutmix, num_classes, seed, rank) if mixup or cutmix else None


def loss_and_hits(logits: torch.Tensor, y: torch.Tensor, soft: torch.Tensor | None, weight: torch.Tensor | None,
                  label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's mean training loss over its real images (weighted by class when `weight` is given),
    and how many real images the model got right: against the label, or with soft targets, against
    each image's larger share."""
    real = y != PAD
    if soft is None:
        loss = F.cross_entropy(logits, y, weight=weight, label_smoothing=label_smoothing)
        return loss, (logits.argmax(1) == y).sum()
    per_image = F.cross_entropy(logits, soft, weight=weight, label_smoothing=label_smoothing, reduction="none")
    share = (soft * weight).sum(1) if weight is not None else torch.ones_like(per_image)  # as the weighted mean
    share = share * real
    loss = (per_image * real).sum() / share.sum().clamp_min(torch.finfo(share.dtype).tiny)
    return loss, ((logits.argmax(1) == soft.argmax(1)) & real).sum()
