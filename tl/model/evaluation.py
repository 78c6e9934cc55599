"""Exact distributed evaluation: every item of a set counted once, at any number of processes."""

import math

import torch
from accelerate.utils import gather_object
from torch.distributed.fsdp import FSDPModule

from tl.data.preprocess import TUTORIAL, Preprocess, to_input


@torch.inference_mode()
def gather_in_order(fn, loader, accelerator, total: int, pre: Preprocess = TUTORIAL,
                    lockstep: bool = False) -> torch.Tensor:
    """fn(batch) for every item of a set, as float32 rows in set order on the CPU of every process.

    `loader` holds this process's strided shard of the set (items rank, rank+world, ...) with no
    padding, possibly none at all, so each item counts exactly once at any world size. lockstep (a
    sharded model, whose every forward gathers parameters with all processes): a process with fewer
    batches than another runs fn on a blank image as often as it lacks one, its result dropped.
    """
    rows = [fn(to_input(x, accelerator.device, pre)).float().cpu() for x, _ in loader]
    if lockstep:
        world, size = accelerator.num_processes, loader.batch_size
        largest = math.ceil(total / world)
        most = math.ceil(largest / size)  # the batches of the largest shard
        for _ in range(most - len(rows)):
            fn(torch.zeros(1, 3, pre.crop, pre.crop, device=accelerator.device))
    shards = gather_object([torch.cat(rows) if rows else None])  # one entry per process, in rank order
    world = len(shards)
    order = [i for rank, shard in enumerate(shards) if shard is not None
             for i in range(rank, total, world)]
    out = torch.cat([shard for shard in shards if shard is not None])
    assert len(out) == total == len(order), (len(out), total)
    return out[torch.tensor(order).argsort()]


def evaluate(model, loader, accelerator, total: int, pre: Preprocess = TUTORIAL, tta: str = "none",
             temperature: float = 1.0) -> torch.Tensor:
    """Class probabilities for every image of the set, in order, on every process (predict_probs).

    Pass the unwrapped model: DDP's forward may talk to the other processes, and shards of
    different lengths make different numbers of forward calls.
    """
    return gather_in_order(lambda x: predict_probs(model, x, tta, temperature), loader, accelerator, total, pre,
                           isinstance(model, FSDPModule))


CROP = 7 / 8  # --tta crops: the corner crops' side, of the image's


def tta_views(x: torch.Tensor, tta: str = "none") -> list[torch.Tensor]:
    """The batch as --tta sees it: itself; flip: and its mirror images; crops: and those, and the four
    corner crops of 7/8 its side resized back to its size (bilinear), all from the input the model
    takes (the center view), so an exported model computes them in its graph."""
    views = [x]
    if tta in ("flip", "crops"):
        views.append(x.flip(-1))
    if tta == "crops":
        h, w = (int(side) for side in x.shape[-2:])  # constants in an export: its input size is fixed
        ch, cw = round(h * CROP), round(w * CROP)
        for top, left in ((0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw)):
            views.append(torch.nn.functional.interpolate(x[..., top:top + ch, left:left + cw], size=(h, w),
                                                         mode="bilinear", align_corners=False))
    return views


def view_logits(model, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """[N, views, classes] float32 logits of the batch's tta_views."""
    return torch.stack([model(v).float() for v in tta_views(x, tta)], 1)


def view_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Class probabilities from view_logits: each view's softmax (of the logits divided by the
    --calibrate temperature), averaged over the views."""
    return (logits if temperature == 1.0 else logits / temperature).softmax(2).mean(1)


def predict_probs(model, x: torch.Tensor, tta: str = "none", temperature: float = 1.0) -> torch.Tensor:
    """What a run's model outputs for a batch: the same numbers in a run's evaluation, tl.predict and an export."""
    return view_probs(view_logits(model, x, tta), temperature)


def confusion_matrix(targets: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts, true class by row, predicted class by column."""
    counts = torch.bincount(targets * num_classes + preds, minlength=num_classes ** 2)
    return counts.view(num_classes, num_classes)


def confused_pairs(confusion: torch.Tensor, k: int) -> list[tuple[int, int, int]]:
    """The k most frequent mistakes of a confusion matrix, (true, predicted, count), most first; ties in
    (true, predicted) order. Only the counts are read: nothing grows with the classes squared but them."""
    c = confusion.shape[0]
    flat = confusion.flatten().clone()
    flat[:: c + 1] = 0  # the diagonal: the right answers
    wrong = flat.nonzero().squeeze(1)  # in (true, predicted) order: a stable sort keeps it for ties
    ranked = wrong[torch.sort(flat[wrong], descending=True, stable=True).indices[:max(0, k)]].tolist()
    return [(i // c, i % c, int(flat[i])) for i in ranked]


def top5_correct(probs: torch.Tensor, targets: torch.Tensor) -> int | None:
    """Images whose class is among their 5 most probable; None up to 5 classes, where every one is."""
    if probs.shape[1] <= 5:
        return None
    return int((probs.topk(5, dim=1).indices == targets[:, None]).any(1).sum())


def class_scores(confusion: torch.Tensor, classes: list[str], prefix: str = "") -> dict[str, dict[str, float]]:
    """Per class: accuracy (its recall), precision, recall and F1 from a confusion matrix; 0 where a
    class has no image or no prediction."""
    confusion = confusion.double()  # exact counts: a/b rounds as Python's int division does
    hits = confusion.diag()
    recall = hits / confusion.sum(1).clamp_min(1)
    precision = hits / confusion.sum(0).clamp_min(1)
    f1 = torch.where(hits > 0, 2 * precision * recall / (precision + recall), 0.0)
    return {f"{prefix}per_class_{name}": dict(zip(classes, values.tolist()))
            for name, values in (("acc", recall), ("precision", precision), ("recall", recall), ("f1", f1))}


def balanced_scores(per_class: dict, prefix: str = "") -> dict[str, float]:
    """Balanced accuracy (the mean of the classes' recalls) and macro-F1, from class_scores(..., prefix)."""
    recall, f1 = per_class[f"{prefix}per_class_recall"], per_class[f"{prefix}per_class_f1"]
    return {f"{prefix}balanced_acc": sum(recall.values()) / len(recall),
            f"{prefix}macro_f1": sum(f1.values()) / len(f1)}
