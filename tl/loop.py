"""The training loop: one Accelerate-wrapped loop for both scenarios, one process or many.

`train` reads top to bottom: claim the output dir, check every input and build (`setup`), train
epoch by epoch (`run_epoch`, saved by the Checkpointer), finish (`finish`); cleanup runs on every
exit path. Only the main process writes files and prints.
"""

import dataclasses
import functools
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, gather_object, set_seed
from torch.utils.data import DataLoader
from tqdm import tqdm

from tl import checkpoint, provenance, shards
from tl import run as rundir
from tl.augment import DeviceAugment
from tl.augment import collate as padded_batches
from tl.checkpoint import Checkpointer, Identity, Progress
from tl.config import Config
from tl.data import (
    PAD,
    TUTORIAL,
    ImageSet,
    Preprocess,
    Split,
    center_view,
    choose_data_mode,
    ensure_data,
    eval_loader,
    list_images,
    load_split,
    make_loaders,
    skip_batches,
    stream_split,
    to_input,
    train_transform,
    usable_cpus,
)
from tl.errors import UserError
from tl.eval import class_scores, confusion_matrix, evaluate, top5_correct
from tl.features import FeatureRows, backbone_features, feature_loaders, remove_files
from tl.model import build_model, check_input_size, preprocess_for, set_frozen, weights_id
from tl.optim import build_optimizer, build_scheduler, describe, param_groups
from tl.pictures import pick_examples, save_confusion, save_curves, save_image_grid, save_predictions
from tl.run import RunDir
from tl.stop import Stopper, StopRequested
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


def on_main(accelerator: Accelerator, fn):
    """fn() on the main process only, its result (or its one-line error) shared with every process:
    one process lists and checks what every process would read alike (a million files hit a cluster
    file system once per run, not once per rank)."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except UserError as e:
            error = str(e)
    shared = [result, error]
    broadcast_object_list(shared)
    if shared[1]:
        raise UserError(shared[1])
    return shared[0]


def open_run(cfg: Config, accelerator: Accelerator) -> tuple[RunDir | None, Path, bool]:
    """The main process locks and checks the output dir; every process learns the outcome."""
    run = None

    def claim():
        nonlocal run  # the lock stays with the main process; the others learn the path
        run = RunDir.open(cfg.output_dir, cfg.mode, cfg.resume, cfg.overwrite)
        return str(run.path), run.resuming

    path, resuming = on_main(accelerator, claim)
    return run, Path(path), resuming


@dataclass
class Setup:
    """Everything a run trains with, built from its Config after every input was checked."""
    identity: Identity
    model: torch.nn.Module
    net: torch.nn.Module  # what trains and what DDP wraps: the model, or only its head on cached features
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_set: torch.utils.data.Dataset
    sampler: torch.utils.data.DistributedSampler
    train_loader: DataLoader
    val_loader: DataLoader
    val_targets: torch.Tensor
    shown: ImageSet  # what the model sees, before normalization (batch.png)
    device_augment: DeviceAugment | None  # crops, flips and normalizes batches on the device
    val_images: list[torch.Tensor]
    num_train: int
    skipped: list[str]
    frozen: bool
    cached: bool
    groups: list[dict] = dataclasses.field(default_factory=list)  # the optimizer's parameter groups, described
    open_test: Callable[[], Split] | None = None  # test/, read only at the end (evaluate_test)
    workers: int = 0  # DataLoader workers of image loaders
    record: dict = dataclasses.field(default_factory=dict)  # config.json's reproduction keys (main process only)
    pre: Preprocess = TUTORIAL  # sizes, interpolation, mean and std of the model's input
    pre_source: str = "the tutorial's preprocessing"


def setup(cfg: Config, accelerator: Accelerator, out: Path, resuming: bool) -> tuple[Setup, Checkpointer]:
    """Fast checks first (data listing, weights, the saved state), then the slow work (decoding)."""
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    with accelerator.local_main_process_first():  # one download per node
        root = ensure_data(cfg.data_dir, cfg.data_zip)
    if root.resolve() == out.resolve() or root.resolve() in out.resolve().parents:
        raise UserError(f"--output-dir {out} is inside --data-dir {root}: the run's pictures would become images "
                        "of the next run; pass an --output-dir outside the data set")
    pack = shards.open_pack(root) if shards.is_pack(root) else None  # a packed set (python -m tl.pack)
    if pack and cfg.val_split:
        raise UserError(f"--val-split holds out part of train/, but {root} is a pack, which holds its own val split; "
                        "drop --val-split, or pass the ImageFolder itself")
    listing = on_main(accelerator, lambda: pack.listing() if pack else list_images(root, val_split=cfg.val_split))
    frozen = cfg.mode == "feature-extract"
    if frozen and cfg.weights.lower() == "none" and main:
        warnings.warn("feature-extract with --weights none trains a head on a frozen random backbone, which "
                      "learns little; pass pretrained weights or use --mode finetune", stacklevel=1)
    set_seed(cfg.seed)  # the same new head on every process, and on resume
    with accelerator.local_main_process_first():  # one weights download per node
        model, head_name = build_model(cfg.model, cfg.weights, len(listing.classes), cfg.mode)
    pre, pre_source = preprocess_for(cfg.preprocess, cfg.model, cfg.weights, model, cfg.image_size, cfg.train_size)
    if pre_source.startswith("note:") and main:
        print(pre_source)
    check_input_size(model, cfg.model, pre)
    augment = cfg.augment if cfg.augment != "auto" else "device" if accelerator.device.type == "cuda" else "cpu"
    recipe = cfg.recipe() | {"train_size": pre.train_crop, "precision": accelerator.mixed_precision, "processes": world,
                             "augment": augment}
    identity = Identity(model=cfg.model, mode=cfg.mode, classes=listing.classes,
                        base_weights=weights_id(cfg.weights, cfg.model), weights=cfg.weights, head=head_name,
                        image_size=pre.crop, seed=cfg.seed, data=listing.fingerprint, recipe=recipe,
                        preprocessing=pre.meta())
    net = model.get_submodule(head_name) if frozen and cfg.feature_cache == "on" else model
    groups = param_groups(net, model.get_submodule(head_name), cfg)
    optimizer = build_optimizer(groups, cfg)
    scheduler = build_scheduler(optimizer, cfg)  # not prepared: Accelerate would step it once per process
    checkpointer = Checkpointer(None, identity, model, optimizer, scheduler, {})
    if resuming:  # before the slow decoding: a resume that cannot be exact is refused now
        checkpointer.check_resumable(out / rundir.STATE, cfg.epochs)

    node_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    mode, why = choose_data_mode(cfg.data_mode, listing, pre, node_processes)
    workers = cfg.num_workers if cfg.num_workers >= 0 else \
        0 if mode == "memory" else max(1, usable_cpus() // node_processes)
    accelerator.print(f"data: {mode} ({why}), {workers} DataLoader worker(s) per process")
    # Train images are kept big enough for both the train crop and the feature cache's center view.
    train_split = open_split(accelerator, root, pack, listing, "train", mode, pre, True, cfg.strict_images)
    val_split = open_split(accelerator, root, pack, listing, "val", mode, pre, False, cfg.strict_images)
    cached = net is not model
    on_device = augment == "device" and not cached
    device_augment = (DeviceAugment(pre.train_crop, accelerator.device, cfg.seed, rank, mean=pre.mean, std=pre.std)
                      if on_device else None)
    # On the device: the loader only pads each batch's uint8 images; crops come in one batched kernel.
    train_set = ImageSet(train_split, None if on_device else train_transform(pre), seed=cfg.seed)
    val_set = ImageSet(val_split)
    val_targets = torch.tensor(val_split.targets)
    train_loader, sampler, val_loader = make_loaders(train_set, val_set, cfg.batch_size, workers, cfg.seed, rank,
                                                     world, not frozen, padded_batches if on_device else None)
    model = model.to(memory_format=torch.channels_last)
    shown = train_set
    if cached:  # a frozen backbone always gives the same features: compute them once
        t0 = time.perf_counter()
        model.to(accelerator.device).eval()
        shown = ImageSet(train_split, lambda x: center_view(x, pre))
        parts = backbone_features(model, head_name, {"train": shown, "val": val_set}, val_loader.batch_size,
                                  accelerator, out / rundir.FEATURES, workers, pre)
        train_set = FeatureRows(parts["train"], torch.tensor(train_split.targets))
        own_val = FeatureRows([parts["val"][rank]], val_targets[rank::world])  # what this process evaluates
        train_loader, sampler, val_loader = feature_loaders(train_set, own_val, cfg.batch_size, val_loader.batch_size,
                                                            cfg.seed, accelerator)
        accelerator.print(f"feature cache: backbone features of {len(shown)} train (center view, no augmentation) "
                          f"and {len(val_split.images)} val images in {time.perf_counter() - t0:.1f}s, "
                          + (f"on {accelerator.device}" if train_loader.dataset.device.type == "cuda"
                             else f"memory-mapped from {out / rundir.FEATURES}"))
    checkpointer.best_meta = {"mixed_precision": accelerator.mixed_precision, "eval_batch_size": val_loader.batch_size}
    setup = Setup(identity, model, net, optimizer, scheduler, train_set, sampler, train_loader, val_loader, val_targets,
                  shown, device_augment, val_split.images, len(train_split.images),
                  train_split.skipped + val_split.skipped, frozen, cached, groups=describe(groups), workers=workers,
                  pre=pre, pre_source=pre_source)
    if listing.test:  # read at the end: its images are not held through training
        setup.open_test = functools.partial(open_split, accelerator, root, pack, listing, "test", mode, pre, False,
                                            cfg.strict_images)
    if main:
        setup.record = provenance.record(listing, pack)
    return setup, checkpointer


def open_split(accelerator: Accelerator, root: Path, pack, listing, split: str, mode: str, pre: Preprocess,
               train: bool, strict: bool):
    """One split of an ImageFolder or a pack: decoded into memory by every process, or checked for
    streaming by the main process for all."""
    main = accelerator.is_main_process
    if pack:
        load = shards.load_packed_split if mode == "memory" else shards.stream_packed_split
        return load(root, split, pre, train, main, strict, pack)
    samples = getattr(listing, split)
    if mode == "memory":
        return load_split(samples, pre, train, main, strict)
    return on_main(accelerator, lambda: stream_split(samples, pre, train, True, strict))


AGREE_EVERY = 16  # steps between the processes' one host sync: a stop signal, a non-finite loss
NO_BAD_STEP = -(1 << 40)


def train_epoch(model, loader, optimizer, accelerator, stopper: Stopper, epoch: int, epochs: int,
                augment: DeviceAugment | None = None, start: int = 0, partial=(0.0, 0, 0), save=None,
                save_every_s: float = 0.0, label_smoothing: float = 0.0, pre: Preprocess = TUTORIAL):
    """One pass over this process's shard; returns loss, accuracy and images over all processes.

    The steps queue work on the device without waiting for it: totals stay on the device, and every
    AGREE_EVERY steps (and at the last) the processes make their one host sync, agreeing on a stop
    signal and on a non-finite loss on any of them. A non-finite step reaches the weights, but the
    run stops before the epoch is saved, so nothing saved ever holds it.
    """
    device = accelerator.device
    loss_sum = torch.tensor(float(partial[0]), device=device)  # a resume inside the epoch goes on from its totals
    correct = torch.tensor(int(partial[1]), device=device, dtype=torch.long)
    bad = torch.full((), NO_BAD_STEP, device=device, dtype=torch.long)  # -(first non-finite step)
    images = torch.tensor(int(partial[2]), device=device, dtype=torch.long)
    last, saved_at = start + len(loader), time.monotonic()
    bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", disable=not accelerator.is_main_process, leave=False,
               initial=start, total=last)
    for step, (x, y) in enumerate(bar, start + 1):
        x, y = augment(*x) if augment else to_input(x, device, pre), y.to(device, non_blocking=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)  # the mean over all but PAD labels
        real = (y != PAD).sum()  # a batch of only repeated images: loss nan, gradient 0, counted as nothing
        bad = torch.where(torch.isfinite(loss) | (real == 0) | (bad != NO_BAD_STEP), bad, -step)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        loss_sum += torch.where(real > 0, loss.detach().float(), 0.0) * real
        correct += (logits.argmax(1) == y).sum()
        images += real
        if step % AGREE_EVERY == 0 or step == last:
            due = accelerator.is_main_process and 0 < save_every_s <= time.monotonic() - saved_at
            signum, first_bad, save_now = stopper.agree(bad, torch.tensor(int(due)))
            if first_bad != NO_BAD_STEP:
                raise UserError(f"the loss became non-finite (nan or inf) at epoch {epoch}, step {-first_bad}; lower "
                                "--lr, or look for broken images or labels; epochs before this one are saved "
                                "(--resume)")
            if step == last:
                break  # the epoch's end saves it; a stop signal is honoured after that
            if (signum or save_now) and save:
                save(step, [loss_sum.item(), int(correct.item()), int(images.item())])  # a host sync only when saving
                saved_at = time.monotonic()
            if signum:
                raise StopRequested(signum)
    totals = torch.stack([loss_sum, correct.float(), images.float()])
    loss_sum, correct, n = accelerator.reduce(totals, "sum").tolist()
    return loss_sum / n, int(correct) / int(n), int(n)


def generator_states(s: Setup) -> dict[str, torch.Tensor]:
    """This process's random generators in the middle of an epoch (dropout and the like, device crops)."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    if s.device_augment:
        states["augment"] = s.device_augment.generator.get_state()
    return states


def set_generator_states(s: Setup, states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])
    if "augment" in states:
        s.device_augment.generator.set_state(states["augment"])


def run_epoch(s: Setup, net, optimizer, accelerator, stopper: Stopper, epoch: int, cfg: Config,
              checkpointer: Checkpointer, started: float):
    """Train one epoch (or the rest of one saved in its middle), evaluate every val image once; the
    metrics row, predictions, probabilities."""
    t0, rank = time.perf_counter(), accelerator.process_index
    set_seed((cfg.seed * 10_000 + epoch) * 1_000 + rank)  # dropout and the like, per epoch
    s.sampler.set_epoch(epoch)
    if hasattr(s.train_set, "set_epoch"):
        s.train_set.set_epoch(epoch)  # each image's augmentation comes from (seed, epoch, index)
    if s.device_augment:
        s.device_augment.set_epoch(epoch)  # or, on the device, from (seed, epoch, rank)
    p, loader, partial = checkpointer.progress, s.train_loader, (0.0, 0, 0)
    start = p.step if p.epoch == epoch - 1 else 0
    if start:  # resuming inside this epoch: its first batches are done
        loader, partial = skip_batches(loader, s.sampler, start), p.partial[rank]
        set_generator_states(s, {k.split(".", 1)[1]: v for k, v in checkpointer.extra.items()
                                 if k.startswith(f"{rank}.")})

    def save(step: int, totals: list) -> None:
        gathered = gather_object([(totals, generator_states(s))])  # every process's, in rank order
        generators = {f"{r}.{name}": state for r, (_, states) in enumerate(gathered) for name, state in states.items()}
        checkpointer.save_step(step, [t for t, _ in gathered], generators, time.perf_counter() - started)

    lr = optimizer.param_groups[0]["lr"]
    frozen = s.frozen or epoch <= cfg.freeze_epochs  # --freeze-epochs: the first epochs as feature-extract
    if cfg.freeze_epochs:
        set_frozen(s.model, s.identity.head, frozen)  # from the epoch alone: a resume at any point agrees
    net.train(not frozen)  # frozen: BatchNorm statistics stay the base's
    train_loss, train_acc, n_train = train_epoch(net, loader, optimizer, accelerator, stopper, epoch, cfg.epochs,
                                                 s.device_augment, start, partial, save, cfg.save_every * 60,
                                                 cfg.label_smoothing, s.pre)
    train_seconds = time.perf_counter() - t0
    s.scheduler.step()
    net.eval()
    probs = evaluate(accelerator.unwrap_model(net), s.val_loader, accelerator, len(s.val_targets), s.pre)
    confidence, preds = probs.max(1)
    correct = int((preds == s.val_targets).sum())
    top5 = top5_correct(probs, s.val_targets)  # None up to 5 classes
    row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
           "val_loss": F.nll_loss(probs.clamp_min(1e-12).log(), s.val_targets).item(),
           "val_acc": correct / len(preds), **({"val_top5": top5 / len(preds)} if top5 is not None else {}),
           "lr": lr, "train_images": n_train, "val_images": len(preds),
           "train_images_per_s": n_train / train_seconds, "seconds": time.perf_counter() - t0}
    return row, preds.tolist(), [round(c, 4) for c in confidence.tolist()], correct


def stop_reason(p: Progress, cfg: Config) -> str | None:
    """Why training is over after p's epochs: "epochs" (all done), "patience" (val accuracy has not
    improved for --patience epochs: read from the saved progress, so a resume knows it too), or None."""
    if p.epoch >= cfg.epochs:
        return "epochs"
    if cfg.patience and p.epoch - p.best_epoch >= cfg.patience:
        return "patience"
    return None


def evaluate_test(s: Setup, accelerator: Accelerator, out: Path, batch_size: int) -> tuple[torch.Tensor, Split]:
    """The best epoch's weights on test/, once: every image counted once at any world size, evaluated
    as tl.predict evaluates best.safetensors (the whole model under the run's mixed precision)."""
    split = s.open_test()
    accelerator.wait_for_everyone()  # best.safetensors is the main process's write
    tensors, _ = checkpoint.load(out / rundir.BEST)
    s.model.load_state_dict(tensors, strict=not s.frozen)
    loader = eval_loader(ImageSet(split), batch_size, s.workers, accelerator.process_index, accelerator.num_processes)
    with accelerator.autocast():
        probs = evaluate(s.model.eval(), loader, accelerator, len(split.targets), s.pre)
    return probs, split


def finish(cfg: Config, s: Setup, p: Progress, run: RunDir | None, tracker: Tracker | None, started: float,
           test: tuple[torch.Tensor, Split] | None = None) -> dict:
    """The summary on every process; the main process draws the pictures and writes the summary."""
    classes = s.identity.classes
    confusion = confusion_matrix(s.val_targets, torch.tensor(p.best_preds), len(classes))
    correct = int(confusion.diag().sum())
    rows = p.history
    best_row = rows[p.best_epoch - 1]
    summary = {"best_val_acc": p.best_val_acc, "best_epoch": p.best_epoch, "val_correct": correct,
               **({"val_top5": best_row["val_top5"]} if "val_top5" in best_row else {}),
               "epochs": p.epoch, "stop_reason": stop_reason(p, cfg), "num_train": s.num_train,
               "num_val": len(s.val_targets), "classes": classes, **class_scores(confusion, classes),
               "skipped_images": s.skipped, "total_seconds": None,
               "train_images_per_s": sum(r["train_images"] for r in rows) / sum(
                   r["train_images"] / r["train_images_per_s"] for r in rows),
               "output_dir": str(run.path) if run else None}
    if test:
        probs, split = test
        targets = torch.tensor(split.targets)
        test_confusion = confusion_matrix(targets, probs.argmax(1), len(classes))
        test_correct, top5 = int(test_confusion.diag().sum()), top5_correct(probs, targets)
        summary |= {"test_acc": test_correct / len(targets), "test_correct": test_correct, "test_total": len(targets),
                    **({"test_top5": top5 / len(targets)} if top5 is not None else {}),
                    **class_scores(test_confusion, classes, "test_"), "skipped_images": s.skipped + split.skipped}
    if run is None:
        return summary
    truth = s.val_targets.tolist()
    shown = pick_examples(truth, p.best_preds, 16, cfg.seed)
    mistakes = sum(truth[i] != p.best_preds[i] for i in shown)
    save_predictions([s.val_images[i] for i in shown], [classes[truth[i]] for i in shown],
                     [classes[p.best_preds[i]] for i in shown], [p.best_confidence[i] for i in shown],
                     run.file(rundir.PICTURES["predictions"]),
                     f"val acc {p.best_val_acc:.4f} ({correct}/{len(truth)}), best epoch {p.best_epoch}; "
                     f"{len(shown)} shown, {mistakes} of them mistakes")
    save_curves(rows, run.file(rundir.PICTURES["curves"]), f"{cfg.mode} {cfg.model}: {run.path.name}")
    save_confusion(confusion, classes, run.file(rundir.PICTURES["confusion"]))
    pictures = {n: run.file(f) for n, f in rundir.PICTURES.items()}
    if test:
        pictures["test_confusion"] = run.file(rundir.TEST_CONFUSION)
        save_confusion(test_confusion, classes, pictures["test_confusion"], "test confusion matrix (best epoch)")
    summary["total_seconds"] = time.perf_counter() - started
    run.write_json(rundir.SUMMARY, summary)
    per_class = ", ".join(f"{c} {a:.3f}" for c, a in list(summary["per_class_acc"].items())[:10])
    more = f" (and {len(classes) - 10} more in summary.json)" if len(classes) > 10 else ""
    if summary["stop_reason"] == "patience":
        print(f"stopped early after epoch {p.epoch}: val accuracy has not improved for {p.epoch - p.best_epoch} epochs "
              f"(--patience {cfg.patience})")
    if test:
        print(f"test acc {summary['test_acc']:.4f} ({summary['test_correct']}/{summary['test_total']}) with the "
              f"best epoch's weights; per class in {rundir.SUMMARY}, {rundir.TEST_CONFUSION}")
    print(f"best val acc {p.best_val_acc:.4f} at epoch {p.best_epoch} ({correct}/{len(truth)}); per class: "
          f"{per_class}{more}\n{summary['total_seconds']:.1f} s wall, {summary['train_images_per_s']:.1f} train "
          f"images/s; outputs in {run.path}/: {rundir.BEST}, {', '.join(rundir.PICTURES.values())}, "
          f"{rundir.METRICS}, {rundir.SUMMARY}")
    if tracker:
        tracker.finish(summary, pictures, truth, p.best_preds, classes,
                       run.file(rundir.BEST) if cfg.wandb_log_model else None)
    return summary


def announce(cfg: Config, s: Setup, run: RunDir, net, accelerator, resumed_after: int | None) -> None:
    """What the run is about to do, in one line, and batch.png: the first batch as the model sees it."""
    s.sampler.set_epoch(1)
    s.shown.set_epoch(1)
    first = [s.shown[i] for i in list(s.sampler)[:8]]
    images = [x for x, _ in first]
    if s.device_augment:  # the crops of the device's kind (the same distribution as the epoch's)
        images = s.device_augment.preview(images, 1)
    save_image_grid(images, [s.identity.classes[y] for _, y in first], run.file(rundir.PICTURES["batch"]))
    print(f"{cfg.mode} {cfg.model} on {s.num_train} train / {len(s.val_targets)} val images "
          f"({s.pre.crop if s.cached else s.pre.train_crop} px train crops, {s.pre.crop} px val; {s.pre_source}), "
          f"classes {s.identity.classes}, {accelerator.num_processes} process(es) on {accelerator.device}, "
          f"precision {accelerator.mixed_precision}"
          + (f", resuming after epoch {resumed_after}" if resumed_after is not None else ""))
    if hasattr(net, "_get_ddp_logging_data"):  # what DDP itself reports it all-reduces
        synced = net._get_ddp_logging_data()
        print(f"DDP all-reduces {synced['num_parameter_tensors']} parameter tensors "
              f"({synced['total_parameter_size_bytes']:,} bytes) per step")


def stop_message(signum: int, p: Progress | None, run: RunDir | None) -> str:
    """Other processes than the main one have no RunDir: they print nothing anyway."""
    name = Stopper.name(signum)
    if run is None or not run.saved:
        return f"stopped by {name} before the first epoch was saved; nothing to keep: run the same command again"
    done, step = (p.epoch, p.step) if p else (0, 0)  # (0, 0): stopped while resuming, before the state was read
    if not done and not step:
        return f"stopped by {name} during start-up; the run in {run.path} is as it was: continue it with --resume"
    parts = ["epoch 1" if done == 1 else f"epochs 1-{done}"] if done else []
    parts += [f"epoch {done + 1} up to step {step}"] if step else []
    verb = "are" if len(parts) > 1 or done > 1 else "is"
    return (f"stopped by {name} during epoch {done + 1}; {' and '.join(parts)} {verb} saved in {run.path}, continue "
            "with the same command plus --resume")


def train(cfg: Config, stopper: Stopper | None = None) -> tuple[dict, torch.nn.Module]:
    """Run cfg from start (or its last saved epoch) to end; returns the summary and the model."""
    stopper = stopper or Stopper()  # train.py makes it before its imports: signals work from the first second
    started = time.perf_counter()
    frozen = cfg.mode == "feature-extract"
    # Frozen BatchNorm buffers are equal everywhere: no need to broadcast them every step. Gradients
    # as views of DDP's buckets save a copy and the memory of one gradient set.
    # --freeze-epochs: DDP wraps every layer, and while the backbone is frozen it finds it unused each step.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=not frozen, gradient_as_bucket_view=True,
                                        find_unused_parameters=cfg.freeze_epochs > 0)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=resolve_precision(cfg.precision),
                              kwargs_handlers=[ddp])
    torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest convolution once
    main = accelerator.is_main_process
    run, out, tracker, checkpointer, failed = None, None, None, None, True
    try:
        run, out, resuming = open_run(cfg, accelerator)
        s, checkpointer = setup(cfg, accelerator, out, resuming)
        checkpointer.run = run
        p = checkpointer.restore(out / rundir.STATE) if resuming else checkpointer.progress
        over = stop_reason(p, cfg)
        done = rundir.read_summary(out) if resuming and over else None
        if done and over == "patience":
            accelerator.print(f"nothing to do: {out} stopped early after epoch {p.epoch}, val accuracy not improved "
                              f"since epoch {p.best_epoch} (--patience {cfg.patience}; see {rundir.SUMMARY}); pass a "
                              "larger --patience, or 0, to train further")
        elif done:
            accelerator.print(f"nothing to do: {out} has trained all {p.epoch} epochs (see {rundir.SUMMARY}); "
                              f"pass --epochs {p.epoch + 1} or more to train further")
        if done:
            failed = False
            return done, s.model
        net, optimizer = accelerator.prepare(torch.compile(s.net) if cfg.compile else s.net, s.optimizer)
        if main:
            run.begin()  # every input is checked: only now is an earlier run's dir touched
            if resuming:  # rows of an epoch a kill cut short go; a damaged or deleted file comes back whole
                run.write_rows(p.history)
            config = dataclasses.asdict(cfg) | s.identity.meta() | {
                "output_dir": str(out), "mixed_precision": accelerator.mixed_precision,
                "num_processes": accelerator.num_processes, "device": str(accelerator.device), "param_groups": s.groups
            } | s.record
            run.write_json(rundir.CONFIG, config)
            tracker = Tracker(run, config, cfg.wandb, cfg.wandb_project, cfg.wandb_entity, cfg.wandb_name, resuming,
                              group=cfg.wandb_group)
            announce(cfg, s, run, net, accelerator, p.epoch if resuming else None)
        stopper.defer(accelerator)
        started -= p.seconds  # a resumed run's wall time includes the earlier attempts
        for epoch in range(p.epoch + 1, cfg.epochs + 1):
            if stop_reason(p, cfg):  # --patience: no improvement for that many epochs
                break
            row, preds, confidence, correct = run_epoch(s, net, optimizer, accelerator, stopper, epoch, cfg,
                                                        checkpointer, started)
            improved = checkpointer.end_epoch(row, preds, confidence, correct, time.perf_counter() - started)
            if main:
                tracker.log_epoch(row)
                print(f"epoch {epoch:>3}/{cfg.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
                      f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}  lr {row['lr']:.2g}  "
                      f"{row['seconds']:.1f}s{'  *best*' if improved else ''}")
            stopper.check()
        test = evaluate_test(s, accelerator, out, checkpointer.best_meta["eval_batch_size"]) if s.open_test else None
        summary = finish(cfg, s, p, run, tracker, started, test)
        failed = False
        return summary, s.model
    except StopRequested as e:
        if stopper.deferred:
            accelerator.wait_for_everyone()  # every process agreed to stop here
        raise UserError(stop_message(e.args[0], checkpointer.progress if checkpointer else None, run)) from None
    finally:
        stopper.restore()
        if tracker:
            tracker.close(exit_code=1 if failed else 0)
        if out:  # before the lock goes: a next run in the dir writes files of the same names
            remove_files(out / rundir.FEATURES, accelerator.process_index, accelerator.num_processes)
        if run:
            run.close(failed)
        accelerator.end_training()
