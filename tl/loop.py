"""The training loop: one Accelerate-wrapped loop for both scenarios, one process or many."""

import dataclasses
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from tqdm import tqdm

from tl import checkpoint
from tl.config import Config
from tl.data import ensure_data, find_classes, load_split, make_loaders, to_input
from tl.errors import UserError
from tl.model import build_model, head_state, weights_id
from tl.pictures import save_predictions
from tl.tracking import RunLog


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str) -> str | None:
    """auto: what the accelerate config asked for if it names bf16/fp16, else bf16 where fast."""
    if precision != "auto":
        return precision
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "no") != "no":
        return None  # Accelerator reads the launcher's choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_bf16() else "no"


def resolve_output_dir(cfg: Config, accelerator: Accelerator) -> Path:
    out = [cfg.output_dir or f"runs/{cfg.mode}-{time.strftime('%Y%m%d-%H%M%S')}"]
    broadcast_object_list(out)  # every process agrees on the main process's timestamp
    out = Path(out[0])
    if accelerator.is_main_process:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create output dir {out} ({e.strerror}); pass --output-dir "
                            "with a writable location") from None
    return out


def train_epoch(model, loader, optimizer, accelerator, desc: str) -> tuple[float, float, int]:
    """One pass over this process's shard; returns loss, accuracy and images over all processes."""
    totals = torch.zeros(3, device=accelerator.device)  # loss sum, correct, images
    for x, y in tqdm(loader, desc=desc, disable=not accelerator.is_main_process, leave=False):
        x, y = to_input(x, accelerator.device), y.to(accelerator.device)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        totals += torch.stack([loss.detach().float() * len(y), (logits.argmax(1) == y).sum(),
                               torch.tensor(len(y), device=y.device)])
    loss_sum, correct, n = accelerator.reduce(totals, "sum").tolist()
    return loss_sum / n, correct / n, int(n)


@torch.inference_mode()
def evaluate(model, loader, accelerator, num_val: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image predicted class and loss for the whole val set, in val order, on every process.

    Each process evaluates its own strided shard (no padding); the shards are padded only for
    the gather and the padding dropped again, so each image counts exactly once.
    """
    rows = []  # (val index, predicted class, loss)
    rank, world = accelerator.process_index, accelerator.num_processes
    seen = 0
    for x, y in loader:
        x, y = to_input(x, accelerator.device), y.to(accelerator.device)
        logits = model(x)
        idx = torch.arange(seen, seen + len(y), device=y.device) * world + rank
        seen += len(y)
        rows.append(torch.stack([idx.double(), logits.argmax(1).double(),
                                 F.cross_entropy(logits.float(), y, reduction="none").double()], 1))
    local = torch.cat(rows) if rows else torch.zeros(0, 3, device=accelerator.device, dtype=torch.double)
    gathered = accelerator.gather(accelerator.pad_across_processes(local, dim=0, pad_index=-1))
    gathered = gathered[gathered[:, 0] >= 0]
    gathered = gathered[gathered[:, 0].argsort()].cpu()
    assert len(gathered) == num_val, (len(gathered), num_val)
    return gathered[:, 1].long(), gathered[:, 2].float()


def train(cfg: Config) -> tuple[dict, torch.nn.Module]:
    """Run cfg from start to end; returns the summary and the trained model (last epoch)."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              mixed_precision=resolve_precision(cfg.precision))
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    out = resolve_output_dir(cfg, accelerator)

    with accelerator.local_main_process_first():  # one download per node
        root = ensure_data(cfg.data_dir, cfg.data_zip)
    classes, folders = find_classes(root)
    train_split = load_split(folders["train"], cfg.image_size, train=True, show_progress=main)
    val_split = load_split(folders["val"], cfg.image_size, train=False, show_progress=main)
    train_loader, sampler, val_loader = make_loaders(
        train_split, val_split, cfg.batch_size, cfg.num_workers, cfg.image_size, cfg.seed, rank, world)
    val_targets = torch.tensor(val_split.targets)

    set_seed(cfg.seed)  # the same new head on every process
    with accelerator.local_main_process_first():  # one weights download per node
        model, head_name = build_model(cfg.model, cfg.weights, len(classes), cfg.mode)
    base = weights_id(cfg.weights, cfg.model)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                lr=cfg.lr, momentum=cfg.momentum)
    # Not prepared: Accelerate would step an epoch scheduler once per process.
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    model, optimizer = accelerator.prepare(model, optimizer)

    log = RunLog(out) if main else None
    if main:
        log.write_json("config.json", dataclasses.asdict(cfg) | {
            "output_dir": str(out), "mixed_precision": accelerator.mixed_precision,
            "num_processes": world, "device": str(accelerator.device), "base_weights": base})
        accelerator.print(f"{cfg.mode} {cfg.model} on {len(train_split.images)} train / "
                          f"{len(val_split.images)} val images, classes {classes}, {world} "
                          f"process(es) on {accelerator.device}, precision {accelerator.mixed_precision}")

    best_acc, best_epoch, best_preds = -1.0, 0, None
    started = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        set_seed((cfg.seed * 10_000 + epoch) * 1_000 + rank)  # augmentation and dropout per epoch
        sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        model.train(cfg.mode == "finetune")  # feature-extract: frozen BatchNorm statistics too
        train_loss, train_acc, n_train = train_epoch(model, train_loader, optimizer, accelerator,
                                                     f"epoch {epoch}/{cfg.epochs}")
        train_seconds = time.perf_counter() - t0
        scheduler.step()
        model.eval()
        preds, losses = evaluate(model, val_loader, accelerator, len(val_split.images))
        val_acc = (preds == val_targets).float().mean().item()
        metrics = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                   "val_loss": losses.mean().item(), "val_acc": val_acc, "lr": lr,
                   "train_images_per_s": n_train / train_seconds,
                   "seconds": time.perf_counter() - t0}
        improved = val_acc > best_acc
        if improved:
            best_acc, best_epoch, best_preds = val_acc, epoch, preds
        if main:
            log.log_epoch(metrics)
            if improved:
                net = accelerator.unwrap_model(model)
                checkpoint.save(out / "best.safetensors",
                                head_state(net, head_name) if cfg.mode == "feature-extract"
                                else net.state_dict(),
                                {"model": cfg.model, "mode": cfg.mode, "classes": classes,
                                 "base_weights": base, "head": head_name, "epoch": epoch,
                                 "val_acc": val_acc, "image_size": cfg.image_size})
            accelerator.print(
                f"epoch {epoch:>3}/{cfg.epochs}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
                f"val loss {metrics['val_loss']:.4f} acc {val_acc:.4f}  lr {lr:.2g}  "
                f"{metrics['seconds']:.1f}s{'  *best*' if improved else ''}")

    summary = {"best_val_acc": best_acc, "best_epoch": best_epoch, "epochs": cfg.epochs,
               "num_train": len(train_split.images), "num_val": len(val_split.images),
               "classes": classes, "skipped_images": train_split.skipped + val_split.skipped,
               "total_seconds": time.perf_counter() - started, "output_dir": str(out)}
    if main:
        log.write_json("summary.json", summary)
        shown = torch.linspace(0, len(val_split.images) - 1, 8).round().long().unique().tolist()
        save_predictions([val_split.images[i] for i in shown],
                         [f"predicted: {classes[best_preds[i]]}" for i in shown],
                         [bool(best_preds[i] == val_targets[i]) for i in shown],
                         out / "predictions.png")
        accelerator.print(f"best val acc {best_acc:.4f} at epoch {best_epoch}; outputs in {out}")
    accelerator.end_training()
    return summary, accelerator.unwrap_model(model)

