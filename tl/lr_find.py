"""The learning-rate range test on a run's own model and data: the loss as the learning rate grows.

    python -m tl.lr_find [--start-lr 1e-7] [--end-lr 10] [--steps 100] [--out lr_find.png] [train.py's options]

The model, optimizer and data are built exactly as train.py builds them (tl.train.setup), then trained for
--steps batches while every parameter group's learning rate grows exponentially (the groups keep their
ratios; the head's goes from --start-lr to --end-lr). The exponentially smoothed loss (beta 0.98,
bias-corrected) gives the suggestion: the learning rate where it falls fastest. One process; it writes
only the plot, never a run directory, and the trained weights are thrown away.
"""

import contextlib
import io
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm import tqdm

from tl.core.cli import Parser, number
from tl.core.config import Config, parse_args
from tl.core.errors import UserError, run_cli
from tl.data.preprocess import to_input
from tl.model.network import set_frozen
from tl.runs.pictures import save_lr_range
from tl.train.loop import resolve_precision, seed_epoch
from tl.train.setup import Setup, setup
from tl.train.targets import loss_and_hits

BETA = 0.98  # the loss's exponential smoothing
DIVERGED = 4.0  # stop once the smoothed loss passes this many times its minimum


def lr_at(step: int, steps: int, start_lr: float, end_lr: float) -> float:
    """The head's learning rate at step 0..steps-1: start_lr to end_lr, evenly spaced in log."""
    return start_lr * (end_lr / start_lr) ** (step / (steps - 1))


def set_lrs(optimizer: torch.optim.Optimizer, lr: float, ratios: list[float]) -> None:
    """Each group at lr times its ratio to the head's (--backbone-lr-scale keeps its meaning)."""
    for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
        group["lr"] = lr * ratio


def smoothed(losses: list[float], beta: float = BETA) -> list[float]:
    """The exponential moving average of the losses, bias-corrected (the first value is the first loss)."""
    avg, out = 0.0, []
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def window(n: int) -> tuple[int, int]:
    """The points the suggestion reads, [first, last): the first tenth (at most 10: the average has
    seen few losses) and the last twentieth (at most 5: the climb towards divergence) are left out."""
    return min(10, n // 10), n - min(5, n // 20)


def suggest(lrs: list[float], losses: list[float]) -> dict:
    """The steepest descent of the smoothed loss against log lr, and the lr of its minimum."""
    first, last = window(len(losses))
    lr, loss = np.log(np.asarray(lrs[first:last])), np.asarray(losses[first:last])
    slope = np.gradient(loss, lr)
    steep, low = first + int(slope.argmin()), first + int(loss.argmin())
    return {"suggested": lrs[steep], "minimum": lrs[low], "steep_index": steep, "min_index": low,
            "falling": bool(slope.min() < 0), "window": (first, last)}


def lr_ratios(optimizer: torch.optim.Optimizer) -> list[float]:
    """Each group's learning rate over the head's (the first group's), as the recipe set them: from
    initial_lr where a schedule has already moved lr (a warmup starts below it)."""
    base = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
    return [lr / base[0] for lr in base]


def batches(s: Setup, cfg: Config, rank: int) -> Iterator:
    """The train loader's batches epoch after epoch, each epoch seeded as the loop seeds it."""
    if len(s.train_loader) == 0:
        raise UserError("the train loader has no batches; add train images or lower --batch-size")
    epoch = 0
    while True:
        epoch += 1
        seed_epoch(s, cfg.seed, epoch, rank)  # as the run's epochs are
        yield from s.train_loader


def range_test(s: Setup, net, optimizer, accelerator: Accelerator, cfg: Config, start_lr: float, end_lr: float,
               steps: int) -> dict:
    """Train `steps` batches at growing learning rates; the lrs and smoothed losses up to divergence."""
    ratios = lr_ratios(optimizer)
    frozen = s.frozen or cfg.freeze_epochs > 0  # as the run's first epoch
    if cfg.freeze_epochs:
        set_frozen(s.model, s.identity.head, True)
    net.train(not frozen)  # frozen: BatchNorm statistics stay the base's
    device, source = accelerator.device, batches(s, cfg, accelerator.process_index)
    lrs, losses, avg, best, stop = [], [], 0.0, math.inf, None
    bar = tqdm(range(steps), desc="lr find", leave=False, disable=not accelerator.is_main_process)
    for step in bar:
        lr = lr_at(step, steps, start_lr, end_lr)
        set_lrs(optimizer, lr, ratios)
        x, y_host = next(source)
        x, y = s.device_augment(*x) if s.device_augment else to_input(x, device, s.pre), y_host.to(device)
        x, soft = s.mixer(x, y, y_host, 0, step) if s.mixer else (x, None)  # the run's loss: train_epoch's
        loss, _ = loss_and_hits(net(x), y, soft, s.class_weight, cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        avg = BETA * avg + (1 - BETA) * loss.item()
        value = avg / (1 - BETA ** (step + 1))
        if not math.isfinite(value) or value > DIVERGED * best:
            stop = {"step": step + 1, "lr": lr, "finite": math.isfinite(value)}
            break
        best = min(best, value)
        lrs.append(lr)
        losses.append(value)
        bar.set_postfix_str(f"lr {lr:.1e} loss {value:.4f}")
    bar.close()
    return {"lrs": lrs, "losses": losses, "stop": stop}


def lr_find(cfg: Config, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 100,
            out: str | Path = "lr_find.png") -> dict:
    """Build the run's model, optimizer and data (nothing of a run written), run the range test, plot it,
    print the suggestion; returns the lrs, smoothed losses and the suggestion."""
    out = Path(out)
    check_output(cfg, out)
    check_one_process(int(os.environ.get("WORLD_SIZE", "1")))  # before a process group is set up
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=resolve_precision(cfg.precision))
    torch.backends.cudnn.benchmark = True
    try:
        check_one_process(accelerator.num_processes)
        # setup's feature cache (feature-extract) goes into a temporary folder, gone at the end.
        with tempfile.TemporaryDirectory(prefix="tl-lr-find-") as tmp:
            s, _ = setup(cfg, accelerator, None, Path(tmp), resuming=False)
            net, optimizer = accelerator.prepare(torch.compile(s.net) if cfg.compile else s.net, s.optimizer)
            ratios = lr_ratios(optimizer)
            others = "" if set(ratios) == {1.0} else f", the backbone's at {ratios[-1]:g}x"
            print(f"lr find: {cfg.mode} {cfg.model} on {s.num_train} train images, {steps} batches of "
                  f"{cfg.batch_size}, lr from {start_lr:.1e} to {end_lr:.1e} (the head's{others}), {cfg.optimizer}, "
                  f"on {accelerator.device}, precision {accelerator.mixed_precision}")
            result = range_test(s, net, optimizer, accelerator, cfg, start_lr, end_lr, steps)
            del s, net, optimizer  # before the feature cache's files go
    finally:
        accelerator.end_training()
    lrs, losses, stop = result["lrs"], result["losses"], result["stop"]
    if stop:
        why = "became non-finite" if not stop["finite"] else f"passed {DIVERGED:g}x its minimum"
        print(f"stopped after {stop['step']} of {steps} steps: the smoothed loss {why} at lr {stop['lr']:.1e}")
    if len(losses) < 5:
        raise UserError(f"the loss diverged within {len(losses) + 1} steps, at lr {stop['lr']:.1e}: too few points "
                        "to suggest from; lower --start-lr or --end-lr, or pass more --steps")
    found = suggest(lrs, losses)
    if not found["falling"]:
        print("note: the smoothed loss never fell over the range; the suggestion means little: lower --start-lr, "
              "or check the data and --weights")
    save_lr_range(lrs, losses, found["window"], found["steep_index"], found["min_index"], out,
                  f"lr range test: {cfg.mode} {cfg.model}, {cfg.optimizer}, batch {cfg.batch_size}, "
                  f"{len(losses)} of {steps} steps recorded")
    print(f"suggested --lr {found['suggested']:.1e} (steepest descent; minimum loss at {found['minimum']:.1e}, "
          f"/10: {found['minimum'] / 10:.1e}); plot in {out}")
    return result | found


def check_one_process(world: int) -> None:
    if world > 1:
        raise UserError(f"python -m tl.lr_find runs on one process, not {world}: start it with python, not "
                        "torchrun or accelerate launch with several processes")


def check_output(cfg: Config, out: Path) -> None:
    """Before any slow work: nothing of a run, and a plot path that can be written outside the data."""
    for flag, given in (("--output-dir", cfg.output_dir is not None), ("--resume", cfg.resume),
                        ("--overwrite", cfg.overwrite)):
        if given:
            raise UserError(f"{flag} does not apply: python -m tl.lr_find writes no run directory (only --out, the "
                            "plot) and starts from --weights; drop it")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; pass a file name, e.g. {out / 'lr_find.png'}")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: the folder {out.parent} does not exist; create it or write elsewhere")
    data = Path(cfg.data_dir).resolve()
    if data in out.resolve().parents:
        raise UserError(f"--out {out} is inside --data-dir {cfg.data_dir}: the plot would become an image of the "
                        "data set; write it elsewhere")


def help_text(own: Parser) -> str:
    """lr_find's own options, then train.py's (tl.core.config's parser prints them and exits)."""
    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
        parse_args(["--help"])
    options = re.split(r"^options:\n", text.getvalue(), maxsplit=1, flags=re.M)[-1]
    options = re.sub(r"^  -h, --help .*\n", "", options, flags=re.M)  # lr_find's own --help is above
    return own.format_help() + "\ntrain.py's options (the run whose model, optimizer and data are tested):\n" + options


def main(argv=None):
    own = Parser(prog="python -m tl.lr_find", description=__doc__.split("\n")[0], add_help=False,
                 allow_abbrev=False,  # an abbreviated train.py option must not be taken for one of these
                 usage="python -m tl.lr_find [--start-lr LR] [--end-lr LR] [--steps N] [--out PNG] "
                       "[train.py's options]")
    own.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    own.add_argument("--start-lr", type=number(float, 0, above=True), default=1e-7, metavar="LR",
                     help="the head's first learning rate (default: 1e-7)")
    own.add_argument("--end-lr", type=number(float, 0, above=True), default=10.0, metavar="LR",
                     help="the head's last learning rate, above --start-lr (default: 10)")
    own.add_argument("--steps", type=number(int, 5), default=100, metavar="N",
                     help="batches to train, one learning rate each; the train set repeats if it has fewer "
                     "(default: 100)")
    own.add_argument("--out", default="lr_find.png", metavar="PNG",
                     help="the plot to write (default: lr_find.png in the current folder)")

    def go():
        args, rest = own.parse_known_args(sys.argv[1:] if argv is None else argv)
        if args.help:
            print(help_text(own), end="")
            return None
        if args.end_lr <= args.start_lr:
            raise UserError(f"--end-lr {args.end_lr:g} must be above --start-lr {args.start_lr:g}")
        return lr_find(parse_args(rest), args.start_lr, args.end_lr, args.steps, args.out)

    run_cli(go)


if __name__ == "__main__":
    main()
