"""The training loop: one Accelerate-wrapped loop for both scenarios, one process or many.

`train` reads top to bottom: claim the output dir, check every input and build (tl.train.setup), train
epoch by epoch (`run_epoch`, saved by the Checkpointer), finish (tl.train.finish); cleanup runs on every
exit path. Only the main process writes files and prints.
"""

import contextlib
import dataclasses
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed
from tqdm import tqdm

from tl.core.config import Config
from tl.core.errors import UserError
from tl.core.stop import Stopped, Stopper, StopRequested
from tl.data.augment import DeviceAugment
from tl.data.features import remove_files
from tl.data.loaders import PAD, skip_batches
from tl.data.preprocess import TUTORIAL, Preprocess, to_input
from tl.model.evaluation import balanced_scores, class_scores, confusion_matrix, evaluate, top5_correct
from tl.model.network import set_frozen
from tl.runs import provenance, rundir
from tl.runs.checkpointer import Checkpointer
from tl.runs.checkpoints import Progress
from tl.runs.pictures import save_image_grid
from tl.runs.rundir import RunDir
from tl.runs.shards import is_sharded
from tl.runs.tracking import Tracker
from tl.train.ema import WeightEMA
from tl.train.finish import evaluate_best, finish, stop_message, stop_reason
from tl.train.setup import Setup, on_main, setup
from tl.train.sharding import no_sync
from tl.train.targets import BatchMix, loss_and_hits


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


def open_run(cfg: Config, accelerator: Accelerator) -> tuple[RunDir | None, Path, bool]:
    """The main process locks and checks the output dir; every process learns the outcome."""
    run = None

    def claim():
        nonlocal run  # the lock stays with the main process; the others learn the path
        run = RunDir.open(cfg.output_dir, cfg.mode, cfg.resume, cfg.overwrite)
        return str(run.path), run.resuming

    path, resuming = on_main(accelerator, claim)
    return run, Path(path), resuming


AGREE_EVERY = 16  # steps between the processes' one host sync: a stop signal, a non-finite loss
NO_BAD_STEP = -(1 << 40)


def train_epoch(model, loader, optimizer, accelerator, stopper: Stopper, epoch: int, epochs: int,
                augment: DeviceAugment | None = None, start: int = 0, partial=(0.0, 0, 0), save=None,
                save_every_s: float = 0.0, label_smoothing: float = 0.0, pre: Preprocess = TUTORIAL,
                mixer: BatchMix | None = None, class_weight: torch.Tensor | None = None, ema: WeightEMA | None = None,
                accumulate: int = 1):
    """One pass over this process's shard; returns loss, accuracy and images over all processes.

    The steps queue work on the device without waiting for it: totals stay on the device, and every
    AGREE_EVERY steps (and at the last) the processes make their one host sync, agreeing on a stop
    signal and on a non-finite loss on any of them. A non-finite step reaches the weights, but the
    run stops before the epoch is saved, so nothing saved ever holds it. With mixer (--mixup/--cutmix)
    the loss is on soft targets and accuracy counts each image's larger share (tl.train.targets).

    --accumulate N: the optimizer steps after every N micro-batches of the epoch (and after its last), each
    micro-batch's loss divided by its cycle's length, with DDP's all-reduce only on a cycle's last (no_sync on
    the others: DDP's, or a sharded model's). Accelerate's own `accumulate` counts its steps itself and ends a cycle
    at a loader's end only for loaders it prepared; tl's are its own (exact sharding and resume), so the cycles
    are counted here. Agreements, and so saves inside an epoch, fall on cycle ends: a resume starts a cycle.
    """
    device = accelerator.device
    loss_sum = torch.tensor(float(partial[0]), device=device)  # a resume inside the epoch goes on from its totals
    correct = torch.tensor(int(partial[1]), device=device, dtype=torch.long)
    bad = torch.full((), NO_BAD_STEP, device=device, dtype=torch.long)  # -(first non-finite step)
    images = torch.tensor(int(partial[2]), device=device, dtype=torch.long)
    last, saved_at = start + len(loader), time.monotonic()
    agree_every = -(-AGREE_EVERY // accumulate) * accumulate  # a multiple of the cycle: nothing half-accumulated
    bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", disable=not accelerator.is_main_process, leave=False,
               initial=start, total=last)
    for step, (x, y_host) in enumerate(bar, start + 1):
        x, y = augment(*x) if augment else to_input(x, device, pre), y_host.to(device, non_blocking=True)
        x, soft = mixer(x, y, y_host, epoch, step) if mixer else (x, None)
        first = (step - 1) // accumulate * accumulate + 1  # this cycle's first and last steps (an epoch's last
        cycle_end = min(first + accumulate - 1, last)      # cycle may be shorter)
        if step == first:
            optimizer.zero_grad(set_to_none=True)
        with contextlib.nullcontext() if step == cycle_end else no_sync(model, accelerator):
            logits = model(x)
            loss, hits = loss_and_hits(logits, y, soft, class_weight, label_smoothing)  # the mean over real images
            # each micro-batch's share of its cycle's mean
            accelerator.backward(loss if accumulate == 1 else loss / (cycle_end - first + 1))
        real = (y != PAD).sum()  # a batch of only repeated images: loss nan, gradient 0, counted as nothing
        bad = torch.where(torch.isfinite(loss) | (real == 0) | (bad != NO_BAD_STEP), bad, -step)
        if step == cycle_end:
            optimizer.step()
            if ema:
                ema.update()
        loss_sum += torch.where(real > 0, loss.detach().float(), 0.0) * real
        correct += hits
        images += real
        if step % agree_every == 0 or step == last:
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


def seed_epoch(s: Setup, seed: int, epoch: int, rank: int) -> None:
    """Every random source of an epoch's training, from (seed, epoch, rank) alone."""
    set_seed((seed * 10_000 + epoch) * 1_000 + rank)  # dropout and the like, per epoch
    s.sampler.set_epoch(epoch)
    if hasattr(s.train_set, "set_epoch"):
        s.train_set.set_epoch(epoch)  # each image's augmentation comes from (seed, epoch, index)
    if s.device_augment:
        s.device_augment.set_epoch(epoch)  # or, on the device, from (seed, epoch, rank)


def run_epoch(s: Setup, net, optimizer, accelerator, stopper: Stopper, epoch: int, cfg: Config,
              checkpointer: Checkpointer, started: float):
    """Train one epoch (or the rest of one saved in its middle), evaluate every val image once; the
    metrics row, predictions, probabilities."""
    t0, rank = time.perf_counter(), accelerator.process_index
    seed_epoch(s, cfg.seed, epoch, rank)
    p, loader, partial = checkpointer.progress, s.train_loader, (0.0, 0, 0)
    start = p.step if p.epoch == epoch - 1 else 0
    if start:  # resuming inside this epoch: its first batches are done
        loader, partial = skip_batches(loader, s.sampler, start), p.partial[rank]
        set_generator_states(s, {k.split(".", 1)[1]: v for k, v in checkpointer.extra.items()
                                 if k.startswith(f"{rank}.")})

    def save(step: int, totals: list) -> None:
        gathered = gather_object([(totals, generator_states(s))])  # every process's, in rank order
        generators = {f"{r}.{name}": state for r, (_, states) in enumerate(gathered) for name, state in states.items()}
        with stopper.saving():
            checkpointer.save_step(step, [t for t, _ in gathered], generators, time.perf_counter() - started)

    lr = optimizer.param_groups[0]["lr"]
    frozen = s.frozen or epoch <= cfg.freeze_epochs  # --freeze-epochs: the first epochs as feature-extract
    if cfg.freeze_epochs:
        set_frozen(s.model, s.identity.head, frozen)  # from the epoch alone: a resume at any point agrees
    net.train(not frozen)  # frozen: BatchNorm statistics stay the base's
    train_loss, train_acc, n_train = train_epoch(net, loader, optimizer, accelerator, stopper, epoch, cfg.epochs,
                                                 s.device_augment, start, partial, save, cfg.save_every * 60,
                                                 cfg.label_smoothing, s.pre, s.mixer, s.class_weight, s.ema,
                                                 cfg.accumulate)
    train_seconds = time.perf_counter() - t0
    s.scheduler.step()
    net.eval()
    evaluated = accelerator.unwrap_model(net)
    row, preds, confidence = val_scores(evaluate(evaluated, s.val_loader, accelerator, len(s.val_targets), s.pre),
                                        s.val_targets, len(s.identity.classes))
    row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, **row, "lr": lr,
           "train_images": n_train, "val_images": len(preds), "train_images_per_s": n_train / train_seconds}
    if s.ema:  # the averaged weights on the same images; the best epoch keeps whichever scores higher
        with s.ema.swapped_in(evaluated) as averaged:
            ema_row, ema_preds, ema_confidence = val_scores(
                evaluate(averaged, s.val_loader, accelerator, len(s.val_targets), s.pre), s.val_targets,
                len(s.identity.classes))
        row |= {f"ema_{k}": v for k, v in ema_row.items()}
        if ema_row["val_acc"] > row["val_acc"]:
            preds, confidence = ema_preds, ema_confidence
    row["seconds"] = time.perf_counter() - t0
    return row, preds.tolist(), [round(c, 4) for c in confidence.tolist()], int((preds == s.val_targets).sum())


def val_scores(probs: torch.Tensor, targets: torch.Tensor, num_classes: int):
    """An epoch's val figures (loss, accuracy, top-5, balanced accuracy, macro-F1), predictions and confidences."""
    confidence, preds = probs.max(1)
    top5 = top5_correct(probs, targets)  # None up to 5 classes
    per_class = class_scores(confusion_matrix(targets, preds, num_classes), list(range(num_classes)), "val_")
    row = {"val_loss": F.nll_loss(probs.clamp_min(1e-12).log(), targets).item(),
           "val_acc": int((preds == targets).sum()) / len(preds),
           **({"val_top5": top5 / len(preds)} if top5 is not None else {}), **balanced_scores(per_class, "val_")}
    return row, preds, confidence


def announce(cfg: Config, s: Setup, run: RunDir, net, accelerator, resumed: Progress | None) -> None:
    """What the run is about to do, in one line, and batch.png: the first batch as the model sees it."""
    s.sampler.set_epoch(1)
    s.shown.set_epoch(1)
    first = [s.shown[i] for i in list(s.sampler)[:8]]
    images = [x for x, _ in first]
    if s.device_augment:  # the crops of the device's kind (the same distribution as the epoch's)
        images = s.device_augment.preview(images, 1)
    crop = s.pre.crop if s.cached else s.pre.train_crop
    how = "center views: the feature cache's" if s.cached else "augmented" + (" on the device" if s.device_augment
                                                                             else "")
    save_image_grid(images, [s.identity.classes[y] for _, y in first], run.file(rundir.PICTURES["batch"]),
                    title=f"{len(images)} train images as the model sees them ({crop} px, {how}; before normalization)")
    print(f"{cfg.mode} {cfg.model} on {s.num_train} train / {len(s.val_targets)} val images "
          f"({s.pre.crop if s.cached else s.pre.train_crop} px train crops, {s.pre.crop} px val; {s.pre_source}), "
          f"classes {s.identity.classes}, {accelerator.num_processes} process(es) on {accelerator.device}, "
          f"precision {accelerator.mixed_precision}"
          + ("" if resumed is None else f", resuming epoch {resumed.epoch + 1} at step {resumed.step}" if resumed.step
             else f", resuming after epoch {resumed.epoch}"))
    if hasattr(net, "_get_ddp_logging_data"):  # what DDP itself reports it all-reduces
        synced = net._get_ddp_logging_data()
        print(f"DDP all-reduces {synced['num_parameter_tensors']} parameter tensors "
              f"({synced['total_parameter_size_bytes']:,} bytes) per step")


def train(cfg: Config, stopper: Stopper | None = None) -> tuple[dict, torch.nn.Module]:
    """Run cfg from start (or its last saved epoch) to end; returns the summary and the model."""
    stopper = stopper or Stopper()  # train.py makes it before its imports: signals work from the first second
    started = time.perf_counter()
    # Gradients as views of DDP's buckets save a copy and the memory of one gradient set. --freeze-epochs: DDP
    # wraps every layer, and while the backbone is frozen it finds it unused each step. (Buffers are
    # broadcast as DDP does by default: torch deprecates broadcast_buffers, and its replacement is not one of
    # Accelerate's DDP options; a frozen backbone's BatchNorm buffers are a few KB, equal everywhere.)
    ddp = DistributedDataParallelKwargs(gradient_as_bucket_view=True, find_unused_parameters=cfg.freeze_epochs > 0)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=resolve_precision(cfg.precision),
                              kwargs_handlers=[ddp])
    torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest convolution once
    main = accelerator.is_main_process
    run, out, tracker, checkpointer, failed = None, None, None, None, True
    try:
        run, out, resuming = open_run(cfg, accelerator)
        s, checkpointer = setup(cfg, accelerator, run, out, resuming)
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
        if is_sharded(s.net):  # sharded already (tl.train.sharding): Accelerate would put DDP around it
            net, optimizer = s.net, accelerator.prepare(s.optimizer)
        else:
            net, optimizer = accelerator.prepare(torch.compile(s.net) if cfg.compile else s.net, s.optimizer)
        if main:
            run.begin()  # every input is checked: only now is an earlier run's dir touched
            if resuming:  # rows of an epoch a kill cut short go; a damaged or deleted file comes back whole
                run.write_rows(p.history)
                provenance.check_versions(run.file(rundir.CONFIG))  # before config.json records this process's
            config = dataclasses.asdict(cfg) | s.identity.meta() | {
                "output_dir": str(out), "mixed_precision": accelerator.mixed_precision,
                "num_processes": accelerator.num_processes, "device": str(accelerator.device), "param_groups": s.groups
            } | s.record
            run.write_json(rundir.CONFIG, config)
            if not resuming or not run.file(rundir.LISTING).exists():  # what a resume's data set is compared with
                provenance.write_listing(run.file(rundir.LISTING), s.data)
            tracker = Tracker(run, config, cfg.wandb, cfg.wandb_project, cfg.wandb_entity, cfg.wandb_name, resuming,
                              group=cfg.wandb_group)
            announce(cfg, s, run, net, accelerator, p if resuming else None)
        stopper.defer(accelerator)
        started -= p.seconds  # a resumed run's wall time includes the earlier attempts
        for epoch in range(p.epoch + 1, cfg.epochs + 1):
            if stop_reason(p, cfg):  # --patience: no improvement for that many epochs
                break
            row, preds, confidence, correct = run_epoch(s, net, optimizer, accelerator, stopper, epoch, cfg,
                                                        checkpointer, started)
            with stopper.saving():  # a second stop signal waits for the epoch's files and its W&B row
                improved = checkpointer.end_epoch(row, preds, confidence, correct, time.perf_counter() - started)
                if main:
                    tracker.log_epoch(row)
                    mixed = " (of mixed targets)" if s.mixer else ""  # --mixup/--cutmix: each image's larger share
                    print(f"epoch {epoch:>3}/{cfg.epochs}  train loss {row['train_loss']:.4f} "
                          f"acc {row['train_acc']:.4f}{mixed}  "
                          f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}  "
                          + (f"ema acc {row['ema_val_acc']:.4f}  " if "ema_val_acc" in row else "") +
                          f"lr {row['lr']:.2g}  "
                          f"{row['seconds']:.1f}s{'  *best*' if improved else ''}")
            stopper.check()
        found = evaluate_best(cfg, s, accelerator, out, checkpointer.best_meta["eval_batch_size"])
        summary = finish(cfg, s, p, run, tracker, started, found)
        failed = False
        return summary, s.model
    except StopRequested as e:
        if stopper.deferred:
            accelerator.wait_for_everyone()  # every process agreed to stop here
        raise Stopped(e.args[0], stop_message(e.args[0], checkpointer.progress if checkpointer else None, run, cfg)) \
            from None
    finally:
        stopper.restore()
        if tracker:
            tracker.close(exit_code=1 if failed else 0)
        if out:  # before the lock goes: a next run in the dir writes files of the same names
            remove_files(out / rundir.FEATURES, accelerator.process_index, accelerator.num_processes)
        if run:
            run.close(failed)
        accelerator.end_training()
