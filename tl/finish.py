"""A run's end: why training is over, the best weights on test/, the summary and pictures, the message after a stop."""

import time
from pathlib import Path

import torch
from accelerate import Accelerator

from tl import checkpoint
from tl import run as rundir
from tl.checkpoint import Progress
from tl.config import Config
from tl.eval import class_scores, confusion_matrix, evaluate, top5_correct
from tl.loaders import ImageSet, eval_loader
from tl.pictures import pick_examples, save_confusion, save_curves, save_predictions
from tl.run import RunDir
from tl.setup import Setup
from tl.splits import Split
from tl.stop import Stopper
from tl.tracking import Tracker


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
