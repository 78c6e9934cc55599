"""The training loop: one Accelerate-wrapped loop for both scenarios, one process or many."""

import dataclasses
import os
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, gather_object, set_seed
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from tqdm import tqdm

from tl import checkpoint
from tl.config import Config
from tl.data import (
    ImageSet,
    center_view,
    ensure_data,
    find_classes,
    load_split,
    make_loaders,
    to_input,
    train_transform,
)
from tl.errors import UserError
from tl.model import build_model, head_state, weights_id
from tl.pictures import save_confusion, save_curves, save_image_grid, save_predictions
from tl.tracking import Tracker


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


RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "best.safetensors", "state.safetensors",
             "predictions.png", "curves.png", "confusion.png", "batch.png", "wandb_run_id", "wandb")


def prepare_output_dir(cfg: Config, accelerator: Accelerator) -> tuple[Path, bool]:
    """Agree on the output dir; refuse to mix two runs in one unless told to resume or overwrite.

    Returns the dir and whether there is a saved state to resume from.
    """
    out = [cfg.output_dir or f"runs/{cfg.mode}-{time.strftime('%Y%m%d-%H%M%S')}"]
    broadcast_object_list(out)  # every process takes the main process's timestamp
    out = Path(out[0])
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not (cfg.resume or cfg.overwrite):
        raise UserError(f"{out} already holds a run ({', '.join(existing)}); pass --resume to continue "
                        "it, --overwrite to replace it, or another --output-dir")
    if cfg.resume and not existing:
        raise UserError(f"nothing to resume in {out}: it holds no run; check --output-dir or drop --resume")
    # A run stopped before its first epoch ended left nothing worth keeping: --resume starts afresh.
    fresh = cfg.overwrite or "state.safetensors" not in existing
    accelerator.wait_for_everyone()  # all checked before the main process changes anything
    if accelerator.is_main_process:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create output dir {out} ({e.strerror}); pass --output-dir "
                            "with a writable location") from None
        # A kill during an atomic write leaves its temporary file behind (ours: .NAME.tmp;
        # safetensors' own: .tmpXXXXXX); the file it was replacing is intact.
        for leftover in [*out.glob(".*.tmp"), *out.glob(".tmp*")]:
            if leftover.is_file():
                leftover.unlink()
        if fresh:
            for name in existing:
                shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    return out, not fresh


class StopSignal(Exception):
    """Raised on every process when any of them got SIGINT, SIGTERM or SIGUSR1 (SLURM's warning)."""


class StopWatch:
    """Remembers a stop signal; `requested()` makes all processes agree before anyone stops."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, accelerator: Accelerator):
        self.accelerator, self.signum = accelerator, 0
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum

    def check(self) -> None:
        flag = torch.tensor([self.signum], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, "max")
        if flag.item():
            raise StopSignal(int(flag.item()))


def train_epoch(model, loader, optimizer, accelerator, stop: StopWatch, epoch: int, epochs: int):
    """One pass over this process's shard; returns loss, accuracy and images over all processes."""
    totals = torch.zeros(3, device=accelerator.device)  # loss sum, correct, images
    bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", disable=not accelerator.is_main_process, leave=False)
    for step, (x, y) in enumerate(bar, 1):
        stop.check()
        x, y = to_input(x, accelerator.device), y.to(accelerator.device)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if not torch.isfinite(loss):  # stop before the optimizer spreads it into every weight
            raise UserError(f"the loss became {loss.item()} at epoch {epoch}, step {step}; lower --lr, or look "
                            "for broken images or labels; epochs before this one are saved (--resume)")
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        totals += torch.stack([loss.detach().float() * len(y), (logits.argmax(1) == y).sum(),
                               torch.tensor(len(y), device=y.device)])
    loss_sum, correct, n = accelerator.reduce(totals, "sum").tolist()
    return loss_sum / n, correct / n, int(n)


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
    """Class probabilities for every image of the set, in order, on every process."""
    return gather_in_order(lambda x: model(x).float().softmax(1), loader, accelerator, total)


def backbone_features(model, head_name: str, images: Dataset, batch_size: int, accelerator) -> torch.Tensor:
    """What the frozen backbone feeds the head, for every image, computed once (each process a share)."""
    head = model.get_submodule(head_name)
    model.set_submodule(head_name, torch.nn.Identity())
    rank, world = accelerator.process_index, accelerator.num_processes
    loader = DataLoader(Subset(images, range(rank, len(images), world)), batch_size=batch_size)
    try:
        with accelerator.autocast():
            return gather_in_order(model, loader, accelerator, len(images))
    finally:
        model.set_submodule(head_name, head)


def train(cfg: Config) -> tuple[dict, torch.nn.Module]:
    """Run cfg from start (or its last saved epoch) to end; returns the summary and the model."""
    frozen = cfg.mode == "feature-extract"
    # Frozen BatchNorm buffers are equal everywhere: no need to broadcast them every step.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=not frozen)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=resolve_precision(cfg.precision),
                              kwargs_handlers=[ddp])
    started = time.perf_counter()
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    stop = StopWatch(accelerator)
    out, resuming = prepare_output_dir(cfg, accelerator)

    with accelerator.local_main_process_first():  # one download per node
        root = ensure_data(cfg.data_dir, cfg.data_zip)
    classes, folders = find_classes(root)
    train_size = cfg.train_size or cfg.image_size
    # Train images are kept big enough for both the train crop and the feature cache's center view.
    train_split = load_split(folders["train"].samples, max(cfg.image_size, train_size), True, main,
                             cfg.strict_images)
    val_split = load_split(folders["val"].samples, cfg.image_size, False, main, cfg.strict_images)
    train_images = ImageSet(train_split, train_transform(train_size))
    train_loader, sampler, val_loader = make_loaders(train_images, ImageSet(val_split), cfg.batch_size,
                                                     cfg.num_workers, cfg.seed, rank, world, not frozen)
    val_targets = torch.tensor(val_split.targets)

    set_seed(cfg.seed)  # the same new head on every process, and on resume
    with accelerator.local_main_process_first():  # one weights download per node
        model, head_name = build_model(cfg.model, cfg.weights, len(classes), cfg.mode)
    identity = {"model": cfg.model, "mode": cfg.mode, "classes": classes,
                "base_weights": weights_id(cfg.weights, cfg.model), "head": head_name,
                "image_size": cfg.image_size, "seed": cfg.seed}
    model = model.to(memory_format=torch.channels_last)
    cached = frozen and cfg.feature_cache == "on"
    if cached:  # a frozen backbone always gives the same features: compute them once
        t0 = time.perf_counter()
        model.to(accelerator.device).eval()
        train_view = ImageSet(train_split, lambda x: center_view(x, cfg.image_size))
        features = [backbone_features(model, head_name, images, val_loader.batch_size, accelerator)
                    for images in (train_view, ImageSet(val_split))]
        train_loader, sampler, val_loader = make_loaders(
            TensorDataset(features[0], torch.tensor(train_split.targets)), TensorDataset(features[1], val_targets),
            cfg.batch_size, 0, cfg.seed, rank, world)
        accelerator.print(f"feature cache: backbone features of {len(train_view)} train (center view, no "
                          f"augmentation) and {len(val_split.images)} val images in {time.perf_counter() - t0:.1f}s")
    net = model.get_submodule(head_name) if cached else model  # what trains, and what DDP wraps
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=cfg.lr, momentum=cfg.momentum)
    # Not prepared: Accelerate would step an epoch scheduler once per process.
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)

    progress = {"epoch": 0, "best_val_acc": -1.0, "best_epoch": 0, "best_preds": [], "seconds": 0.0}
    state_path = out / "state.safetensors"
    if resuming:
        tensors, optimizer_state, scheduler_state, meta = checkpoint.load_state(state_path)
        checkpoint.check_matches(state_path, meta, identity)
        model.load_state_dict(tensors, strict=not frozen)  # frozen: the head; the rest is the base
        scheduler.load_state_dict(scheduler_state)
        progress = {k: meta[k] for k in progress}
    net, optimizer = accelerator.prepare(net, optimizer)
    if resuming:
        optimizer.load_state_dict(optimizer_state)
    tracker = None
    if main:
        config = dataclasses.asdict(cfg) | identity | {
            "output_dir": str(out), "mixed_precision": accelerator.mixed_precision,
            "num_processes": world, "device": str(accelerator.device)}
        tracker = Tracker(out, config, cfg.wandb, cfg.wandb_project, cfg.wandb_entity, cfg.wandb_name, resuming)
        tracker.write_json("config.json", config)
        tracker.keep_epochs(progress["epoch"])  # drop rows of an epoch that was cut short
        seen = train_view if cached else train_images  # what the model sees, before normalization
        shown = [seen[i] for i in list(sampler)[:8]]
        save_image_grid([x for x, _ in shown], [classes[y] for _, y in shown], out / "batch.png")
        accelerator.print(f"{cfg.mode} {cfg.model} on {len(train_split.images)} train / "
                          f"{len(val_split.images)} val images ({cfg.image_size if cached else train_size} px "
                          f"train crops, {cfg.image_size} px val), classes {classes}, {world} "
                          f"process(es) on {accelerator.device}, precision {accelerator.mixed_precision}"
                          + (f", resuming after epoch {progress['epoch']}" if resuming else ""))
        if hasattr(net, "_get_ddp_logging_data"):  # what DDP itself reports it all-reduces
            synced = net._get_ddp_logging_data()
            accelerator.print(f"DDP all-reduces {synced['num_parameter_tensors']} parameter tensors "
                              f"({synced['total_parameter_size_bytes']:,} bytes) per step")
    started -= progress["seconds"]  # a resumed run's wall time includes the earlier attempts
    try:
        for epoch in range(progress["epoch"] + 1, cfg.epochs + 1):
            t0 = time.perf_counter()
            set_seed((cfg.seed * 10_000 + epoch) * 1_000 + rank)  # augmentation and dropout per epoch
            sampler.set_epoch(epoch)
            lr = optimizer.param_groups[0]["lr"]
            net.train(not frozen)  # frozen: BatchNorm statistics stay the base's
            train_loss, train_acc, n_train = train_epoch(net, train_loader, optimizer, accelerator, stop,
                                                         epoch, cfg.epochs)
            train_seconds = time.perf_counter() - t0
            scheduler.step()
            net.eval()
            # Without the DDP wrapper: its forward may talk to the other processes, and shards of
            # different lengths make different numbers of forward calls.
            probs = evaluate(accelerator.unwrap_model(net), val_loader, accelerator, len(val_split.images))
            preds = probs.argmax(1)
            val_acc = (preds == val_targets).float().mean().item()
            val_loss = F.nll_loss(probs.clamp_min(1e-12).log(), val_targets).item()
            metrics = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                       "val_loss": val_loss, "val_acc": val_acc, "lr": lr,
                       "train_images": n_train, "val_images": len(probs),
                       "train_images_per_s": n_train / train_seconds,
                       "seconds": time.perf_counter() - t0}
            improved = val_acc > progress["best_val_acc"]
            progress["epoch"] = epoch
            progress["seconds"] = time.perf_counter() - started
            if improved:
                progress |= {"best_val_acc": val_acc, "best_epoch": epoch, "best_preds": preds.tolist()}
            if main:
                # Order matters for a kill at any moment: the row, then best, then the state that
                # says the epoch is done (a resume drops rows and redoes work past the state).
                tracker.log_epoch(metrics)
                trained = head_state(model, head_name) if frozen else model.state_dict()
                if improved:
                    checkpoint.save(out / "best.safetensors", trained, identity | {
                        "epoch": epoch, "val_acc": val_acc, "mixed_precision": accelerator.mixed_precision,
                        "eval_batch_size": val_loader.batch_size})
                checkpoint.save_state(state_path, trained, optimizer, scheduler, identity | progress)
                accelerator.print(
                    f"epoch {epoch:>3}/{cfg.epochs}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
                    f"val loss {metrics['val_loss']:.4f} acc {val_acc:.4f}  lr {lr:.2g}  "
                    f"{metrics['seconds']:.1f}s{'  *best*' if improved else ''}")
            stop.check()
    except StopSignal as e:
        accelerator.wait_for_everyone()
        raise UserError(f"stopped by {signal.Signals(e.args[0]).name} during epoch {progress['epoch'] + 1}; "
                        f"epochs 1-{progress['epoch']} are saved in {out}, continue with the same "
                        "command plus --resume") from None

    best_preds = torch.tensor(progress["best_preds"])
    confusion = torch.bincount(val_targets * len(classes) + best_preds, minlength=len(classes) ** 2)
    confusion = confusion.view(len(classes), len(classes))
    wall = time.perf_counter() - started
    summary = {"best_val_acc": progress["best_val_acc"], "best_epoch": progress["best_epoch"],
               "epochs": cfg.epochs, "num_train": len(train_split.images), "num_val": len(val_split.images),
               "classes": classes, "per_class_acc": {c: (confusion[i, i] / confusion[i].sum().clamp_min(1)).item()
                                                     for i, c in enumerate(classes)},
               "skipped_images": train_split.skipped + val_split.skipped, "total_seconds": wall,
               "train_images_per_s": None, "output_dir": str(out)}
    if main:
        rows = tracker.epochs()
        summary["train_images_per_s"] = sum(r["train_images"] for r in rows) / sum(
            r["train_images"] / r["train_images_per_s"] for r in rows)
        shown = torch.linspace(0, len(val_split.images) - 1, 8).round().long().unique().tolist()
        save_predictions([val_split.images[i] for i in shown], [classes[best_preds[i]] for i in shown],
                         [bool(best_preds[i] == val_targets[i]) for i in shown], out / "predictions.png")
        save_curves(rows, out / "curves.png")
        save_confusion(confusion, classes, out / "confusion.png")
        pictures = {name: out / f"{name}.png" for name in ("predictions", "curves", "confusion", "batch")}
        per_class = ", ".join(f"{c} {a:.3f}" for c, a in summary["per_class_acc"].items())
        accelerator.print(
            f"best val acc {summary['best_val_acc']:.4f} at epoch {summary['best_epoch']} "
            f"({int(confusion.diag().sum())}/{len(val_split.images)}); per class: {per_class}\n"
            f"{wall:.1f} s wall, {summary['train_images_per_s']:.1f} train images/s; outputs in {out}/: "
            "best.safetensors, predictions.png, curves.png, confusion.png, batch.png, metrics.jsonl, summary.json")
        tracker.finish(summary, pictures, val_split.targets, best_preds.tolist(), classes,
                       out / "best.safetensors" if cfg.wandb_log_model else None)
    accelerator.end_training()
    return summary, model
