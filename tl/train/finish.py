"""A run's end: why training is over, the best weights on test/, the summary and pictures, the message after a stop."""

import time
from pathlib import Path

import torch
from accelerate import Accelerator

from tl.core.config import Config
from tl.core.stop import Stopper
from tl.data.loaders import ImageSet, eval_loader
from tl.data.splits import Split
from tl.model.calibration import T_RANGE, calibrate, reliability
from tl.model.evaluation import (
    balanced_scores,
    class_scores,
    confusion_matrix,
    gather_in_order,
    top5_correct,
    view_logits,
    view_probs,
)
from tl.runs import checkpoints, rundir
from tl.runs.checkpoints import Progress
from tl.runs.pictures import pick_examples, save_confusion, save_curves, save_predictions, save_reliability
from tl.runs.rundir import RunDir
from tl.runs.shards import is_sharded, load_full_state
from tl.runs.tracking import Tracker
from tl.train.setup import Setup


def stop_reason(p: Progress, cfg: Config) -> str | None:
    """Why training is over after p's epochs: "epochs" (all done), "patience" (val accuracy has not
    improved for --patience epochs: read from the saved progress, so a resume knows it too), or None."""
    if p.epoch >= cfg.epochs:
        return "epochs"
    if cfg.patience and p.epoch - p.best_epoch >= cfg.patience:
        return "patience"
    return None


def evaluate_best(cfg: Config, s: Setup, accelerator: Accelerator, out: Path,
                  batch_size: int) -> dict[str, tuple[torch.Tensor, Split]]:
    """The best epoch's weights once the epochs are done, on test/ when there is one, and on val again
    with --tta or --calibrate: {split: (logits [images, views, classes], Split)}. Every image counted
    once at any world size, evaluated as tl.predict evaluates best.safetensors (the whole model under
    the run's mixed precision)."""
    splits = {"test": s.open_test()} if s.open_test else {}
    if cfg.tta != "none" or cfg.calibrate:
        splits["val"] = s.val_split
    if not splits:
        return {}
    accelerator.wait_for_everyone()  # best.safetensors is the main process's write
    tensors, _ = checkpoints.load(out / rundir.BEST)
    load_full_state(s.model, tensors, strict=s.identity.mode == "finetune")
    model, found = s.model.eval(), {}
    for name, split in splits.items():
        loader = eval_loader(ImageSet(split), batch_size, s.workers, accelerator.process_index,
                             accelerator.num_processes)
        with accelerator.autocast():
            logits = gather_in_order(lambda x: view_logits(model, x, cfg.tta), loader, accelerator,
                                     len(split.targets), s.pre, is_sharded(model))
        found[name] = logits, split
    return found


def scores(probs: torch.Tensor, targets: torch.Tensor, classes: list[str], prefix: str) -> dict:
    """Accuracy, correct, total, top-5, balanced accuracy, macro-F1 and per-class scores of a split."""
    confusion = confusion_matrix(targets, probs.argmax(1), len(classes))
    correct, top5 = int(confusion.diag().sum()), top5_correct(probs, targets)
    per_class = class_scores(confusion, classes, prefix)
    return {f"{prefix}acc": correct / len(targets), f"{prefix}correct": correct, f"{prefix}total": len(targets),
            **({f"{prefix}top5": top5 / len(targets)} if top5 is not None else {}),
            **balanced_scores(per_class, prefix), **per_class}


def final_figures(cfg: Config, s: Setup, found: dict, classes: list[str]) -> tuple[dict, dict]:
    """The summary's figures of evaluate_best: test/, --tta beside the plain ones, --calibrate's
    temperature and ECE; and what best.safetensors records of them for tl.predict and tl.export."""
    figures, recorded = {}, {}
    temperature = 1.0
    if cfg.calibrate:
        logits, split = found["val"]
        calibration, before, after = calibrate(logits, torch.tensor(split.targets))
        temperature = calibration["temperature"]
        figures["calibration"], figures["reliability"] = calibration, (before, after)
        recorded["temperature"] = temperature
    if cfg.tta != "none":
        logits, split = found["val"]
        tta = scores(view_probs(logits, temperature), torch.tensor(split.targets), classes, "")  # T: as predict
        figures |= {"tta": cfg.tta, "val_acc_tta": tta["acc"], "val_correct_tta": tta["correct"],
                    "val_balanced_acc_tta": tta["balanced_acc"]}
        recorded |= {"tta_val_acc": tta["acc"], "tta_val_correct": tta["correct"]}
    if "test" in found:
        logits, split = found["test"]
        targets = torch.tensor(split.targets)
        figures |= scores(view_probs(logits[:, :1]), targets, classes, "test_")
        figures["skipped_images"] = s.skipped + split.skipped
        if cfg.tta != "none":
            figures |= {"test_acc_tta": scores(view_probs(logits, temperature), targets, classes, "")["acc"]}
        if cfg.calibrate:
            figures["calibration"] |= {"test_ece_before": reliability(view_probs(logits, 1.0), targets)["ece"],
                                       "test_ece_after": reliability(view_probs(logits, temperature), targets)["ece"]}
    return figures, recorded


def finish(cfg: Config, s: Setup, p: Progress, run: RunDir | None, tracker: Tracker | None, started: float,
           found: dict | None = None) -> dict:
    """The summary on every process; the main process records --tta's and --calibrate's figures in
    best.safetensors, draws the pictures, writes the summary, says where it all is, and ends the tracker."""
    found = found or {}
    confusion = confusion_matrix(s.val_targets, torch.tensor(p.best_preds), len(s.identity.classes))  # the best epoch
    summary, recorded, reliability_bins = summarize(cfg, s, p, run, found, confusion)
    if run is None:
        return summary
    if recorded:
        record_in_best(run, recorded)
    pictures = draw_pictures(cfg, s, p, run, found, reliability_bins, summary, confusion)
    summary["total_seconds"] = time.perf_counter() - started
    run.write_json(rundir.SUMMARY, summary)
    outputs = [rundir.BEST, *(f.name for f in pictures.values()), rundir.METRICS, rundir.SUMMARY]
    print_end(cfg, p, summary, run, outputs)
    if tracker:
        tracker.finish(summary, pictures, s.val_targets.tolist(), p.best_preds, s.identity.classes,
                       run.file(rundir.BEST) if cfg.wandb_log_model else None)
    return summary


def summarize(cfg: Config, s: Setup, p: Progress, run: RunDir | None, found: dict,
              confusion: torch.Tensor) -> tuple[dict, dict, tuple | None]:
    """summary.json's figures (total_seconds still None), what best.safetensors should record of them, and
    --calibrate's reliability bins (before, after) for its picture."""
    classes = s.identity.classes
    rows = p.history
    best_row = rows[p.best_epoch - 1]
    ema_won = best_row.get("ema_val_acc", -1.0) > best_row["val_acc"]  # --ema: the best epoch's averaged weights
    top5 = best_row.get("ema_val_top5" if ema_won else "val_top5")
    summary = {"best_val_acc": p.best_val_acc, "best_epoch": p.best_epoch, "val_correct": int(confusion.diag().sum()),
               **({"val_top5": top5} if top5 is not None else {}),
               "epochs": p.epoch, "stop_reason": stop_reason(p, cfg), "num_train": s.num_train,
               "num_val": len(s.val_targets), "classes": classes,
               **balanced_scores(class_scores(confusion, classes, "val_"), "val_"), **class_scores(confusion, classes),
               "skipped_images": s.skipped, "total_seconds": None,
               "train_images_per_s": sum(r["train_images"] for r in rows) / sum(
                   r["train_images"] / r["train_images_per_s"] for r in rows),
               "output_dir": str(run.path) if run else None}
    if s.ema:
        summary["best_weights"] = "ema" if ema_won else "model"
    figures, recorded = final_figures(cfg, s, found, classes)
    reliability_bins = figures.pop("reliability", None)
    return summary | figures, recorded, reliability_bins


def record_in_best(run: RunDir, recorded: dict) -> None:
    """Same tensors, more metadata (--tta's and --calibrate's figures, for tl.predict and tl.export): a kill
    leaves the old file or the new one."""
    tensors, meta = checkpoints.load(run.file(rundir.BEST))
    checkpoints.save(run.file(rundir.BEST), tensors, {k: v for k, v in meta.items() if k not in
                                                     ("format", "format_version")} | recorded)


def draw_pictures(cfg: Config, s: Setup, p: Progress, run: RunDir, found: dict, reliability_bins: tuple | None,
                  summary: dict, confusion: torch.Tensor) -> dict[str, Path]:
    """The end's pictures, and batch.png (drawn at the start): {name: file} of every picture the run holds."""
    classes, truth = s.identity.classes, s.val_targets.tolist()
    shown = pick_examples(truth, p.best_preds, 16, cfg.seed)
    mistakes = sum(truth[i] != p.best_preds[i] for i in shown)
    pictures = {n: run.file(f) for n, f in rundir.PICTURES.items()}
    save_predictions([s.val_split.images[i] for i in shown], [classes[truth[i]] for i in shown],
                     [classes[p.best_preds[i]] for i in shown], [p.best_confidence[i] for i in shown],
                     pictures["predictions"],
                     f"val acc {p.best_val_acc:.4f} ({summary['val_correct']}/{len(truth)}), best epoch "
                     f"{p.best_epoch}; {len(shown)} shown, {mistakes} of them mistakes")
    save_curves(p.history, pictures["curves"], f"{cfg.mode} {cfg.model}: {run.path.name}")
    save_confusion(confusion, classes, pictures["confusion"])
    if "test" in found:
        logits, split = found["test"]
        pictures["test_confusion"] = run.file(rundir.TEST_CONFUSION)
        save_confusion(confusion_matrix(torch.tensor(split.targets), logits[:, 0].argmax(1), len(classes)), classes,
                       pictures["test_confusion"], "test confusion matrix (best epoch)")
    if reliability_bins:
        pictures["reliability"] = run.file(rundir.RELIABILITY)
        save_reliability(*reliability_bins, summary["calibration"]["temperature"], pictures["reliability"])
    return pictures


def print_end(cfg: Config, p: Progress, summary: dict, run: RunDir, outputs: list[str]) -> None:
    """The end's lines: why it stopped early, test/, --tta, --calibrate, the best epoch, where the files are."""
    classes, total = summary["classes"], summary["num_val"]
    per_class = ", ".join(f"{c} {a:.3f}" for c, a in list(summary["per_class_acc"].items())[:10])
    more = f" (and {len(classes) - 10} more in summary.json)" if len(classes) > 10 else ""
    if summary["stop_reason"] == "patience":
        print(f"stopped early after epoch {p.epoch}: val accuracy has not improved for {p.epoch - p.best_epoch} epochs "
              f"(--patience {cfg.patience})")
    if "test_acc" in summary:
        print(f"test acc {summary['test_acc']:.4f} ({summary['test_correct']}/{summary['test_total']}) with the "
              f"best epoch's weights; per class in {rundir.SUMMARY}, {rundir.TEST_CONFUSION}")
    if "val_acc_tta" in summary:
        also = f", test {summary['test_acc_tta']:.4f}" if "test_acc_tta" in summary else ""
        print(f"with --tta {cfg.tta}: val acc {summary['val_acc_tta']:.4f} ({summary['val_correct_tta']}/{total})"
              f"{also}; tl.predict and tl.export apply it too")
    if "calibration" in summary:
        c = summary["calibration"]
        print(f"calibration: temperature {c['temperature']:.3f} fitted on val, ECE {c['val_ece_before']:.4f} -> "
              f"{c['val_ece_after']:.4f} ({rundir.RELIABILITY}); tl.predict and tl.export output calibrated "
              "probabilities")
        if c["at_bound"]:
            print(f"note: the temperature stopped at the end of its range {T_RANGE}: the model gets (nearly) every "
                  "val image right, or wrong, so val says little about its calibration; use a larger val set")
    print(f"best val acc {p.best_val_acc:.4f} at epoch {p.best_epoch} ({summary['val_correct']}/{total}); per class: "
          f"{per_class}{more}\n{summary['total_seconds']:.1f} s wall, {summary['train_images_per_s']:.1f} train "
          f"images/s; outputs in {run.path}/: {', '.join(outputs)}")


def stop_message(signum: int, p: Progress | None, run: RunDir | None, cfg: Config | None = None) -> str:
    """Other processes than the main one have no RunDir: they print nothing anyway."""
    name = Stopper.name(signum)
    if run is None or not run.saved:
        return f"stopped by {name} before the first epoch was saved; nothing to keep: run the same command again"
    done, step = (p.epoch, p.step) if p else (0, 0)  # (0, 0): stopped while resuming, before the state was read
    if cfg is not None and done and stop_reason(p, cfg):  # the epochs are over: the end's work was cut short
        return (f"stopped by {name} while finishing (after epoch {done}: the final evaluation, pictures, summary); "
                f"every epoch is saved in {run.path}, finish it with the same command plus --resume")
    if not done and not step:
        return f"stopped by {name} during start-up; the run in {run.path} is as it was: continue it with --resume"
    parts = ["epoch 1" if done == 1 else f"epochs 1-{done}"] if done else []
    parts += [f"epoch {done + 1} up to step {step}"] if step else []
    verb = "are" if len(parts) > 1 or done > 1 else "is"
    return (f"stopped by {name} during epoch {done + 1}; {' and '.join(parts)} {verb} saved in {run.path}, continue "
            "with the same command plus --resume")
