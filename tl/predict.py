"""Classify images with a tl checkpoint or export: a few printed, or any number written to a file.

    python -m tl.predict --checkpoint runs/X/best.safetensors IMAGE_OR_DIR... [--png out.png]
    python -m tl.predict --checkpoint runs/X/best.safetensors DIR_OR_PACK --out predictions.csv
    python -m tl.predict --checkpoint runs/X/best.safetensors --data-file labels.csv [--split test] --out p.csv

Images are decoded one at a time in DataLoader workers, never all in memory. With --out, each
process (torchrun/accelerate launch ranks, SLURM array tasks, or --shard K/N) predicts its own
contiguous slice of whole batches into a part file, committed every few seconds: a rerun of the
same command goes on where a kill stopped it, and the last process to finish merges the parts into
OUT, identical to what one process writes. With labels (class folders, a pack, a label file) it prints accuracy,
balanced accuracy and the confusion matrix.

A feature-extract checkpoint holds only the head (a lora one the head and the adapters): the backbone is
rebuilt from the base weights it names (the torchvision weights, or the local file passed with --weights,
checked by sha256).
--checkpoint may also be a model written by tl.export (ONNX or TorchScript), recognized by its content.
"""

import os
import re
import sys
import time
import warnings
from array import array
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from tl.core.cli import Parser, number
from tl.core.errors import UserError, is_main_rank, run_cli
from tl.core.files import write_atomic
from tl.core.stop import Stopped, Stopper, StopRequested, ignore_in_worker
from tl.data.loaders import check_workers_can_start
from tl.data.preprocess import Preprocess
from tl.data.sources import Source, open_source
from tl.data.splits import UNREADABLE, usable_cpus
from tl.inference.exported import open_exported
from tl.inference.predictions import FORMATS, Output, encode_rows, format_of, job_identity, read_rows
from tl.inference.trained import batch_probabilities, load_model
from tl.model.evaluation import balanced_scores, class_scores, confused_pairs
from tl.runs.pictures import pick_examples, save_predictions

COMMIT_SECONDS = 5.0  # between commits of a part (and after its first batch): what a kill can cost
CONFUSION_TABLE_CLASSES = 20  # up to this many classes the confusion matrix is printed, else written to a file


def predict(checkpoint_path, paths: list[str], weights: str | None = None, png: str | None = None,
            batch_size: int | None = None, val_of: str | None = None, *, out=None, fmt: str | None = None,
            top_k: int | None = None, shard: str | None = None, workers: int | None = None, split: str | None = None,
            overwrite: bool = False, data_file: str | None = None, data_root: str | None = None) -> dict:
    """Without `out`: print each image's class and probability, and with labelled folders (class/img.jpg)
    the accuracy. With `out`: this process's share of the images into OUT's parts, then OUT when it
    finishes last. The checkpoint may also be a model written by tl.export. With val_of (a data dir)
    the images are the run's val images of it (tl.data.sources.open_run_data); with data_file, a label file's."""
    if sum(map(bool, (paths, val_of, data_file))) != 1:  # before loading anything
        raise UserError("pass image files or folders, --data-file LABELS for a label file's images, or --val-of "
                        "DATA_DIR for a run's val images (one of them)")
    k, n, local = shard_of(shard)
    if out is None and n > 1:
        raise UserError(f"{n} processes share this prediction: pass --out FILE (each process writes its part, the "
                        "last to finish merges them)")
    probs_of, meta = open_model(checkpoint_path, weights)
    classes, pre = meta["classes"], Preprocess.from_meta(meta)
    source = open_source(paths, val_of, meta, split, data_file, data_root)
    batch_size = batch_size or meta.get("eval_batch_size", 32)
    top_k = top_k or min(5, len(classes))
    if top_k > len(classes):
        raise UserError(f"--top-k {top_k} is more than the model's {len(classes)} classes; pass at most {len(classes)}")
    workers = max(1, usable_cpus() // local) if workers is None else workers
    check_workers_can_start(workers, ", or pass --num-workers 0")
    if out is None:
        return print_predictions(source, probs_of, classes, pre, batch_size, workers, png)
    if "OMP_NUM_THREADS" not in os.environ:  # the launcher's or the user's choice wins
        torch.set_num_threads(max(1, usable_cpus() // local))
    out = Path(out)
    fmt = format_of(out, fmt)
    job = job_identity(checkpoint_path, source.names, source.labels, top_k=top_k, format=fmt, batch_size=batch_size)
    output = Output(out, job, fmt)
    result = {"out": str(out), "part": k, "parts": n}
    record = output.finished()
    if record:
        print(f"{out} is complete for this job ({record['rows']} rows): nothing to do; delete it to predict again")
    else:
        output.check(k, n, overwrite)
        start, stop = shard_range(len(source.names), batch_size, k, n)
        write_part(output, source, probs_of, classes, pre, batch_size, workers, top_k, k, n, start, stop)
        record = output.merge(n, top_k, source.labelled, lambda f: summarize(f, fmt, classes, source.labelled, output))
        if record is None and output.finished():
            print(f"part {k} of {n} done, but another process (of this job, or a job of the same images with another "
                  f"number of processes) has written {out} meanwhile; it is complete")
            return {**result, "merged": False}
        if record is None:
            print(f"part {k} of {n} done; the last process to finish writes {out}")
            return {**result, "merged": False}
        print(f"wrote {out}: {record['rows']} rows" +
              (f", {record['skipped']} unreadable images skipped (listed in {output.skipped})"
               if record["skipped"] else ""))
    print_metrics(record, classes, output)
    if png:
        draw(out, fmt, source, classes, pre, png, record)
    return {**result, "merged": True, **record}


def open_model(path, weights: str | None):
    """(fn: uint8 batch -> float32 probabilities, metadata) of a checkpoint or an exported file."""
    exported = open_exported(path)
    if exported is not None:
        if weights is not None:
            warnings.warn(f"--weights is not needed: {path} holds the whole model; ignoring it", stacklevel=2)
        return exported, exported.meta
    model, meta = load_model(path, weights)
    return batch_probabilities(model, meta), meta


def shard_of(arg: str | None) -> tuple[int, int, int]:
    """(this process's index k, the number of processes n, processes on this node): from --shard K/N, else
    torchrun/accelerate launch (RANK, WORLD_SIZE), else a SLURM array task, else 0 of 1."""
    env = os.environ
    if arg is not None:
        m = re.fullmatch(r"(\d+)/(\d+)", arg.strip())
        if not m or not int(m[1]) < int(m[2]):
            raise UserError(f"--shard {arg}: pass K/N with 0 <= K < N, e.g. --shard 0/4 for the first of 4 processes")
        return int(m[1]), int(m[2]), 1
    if "WORLD_SIZE" in env:
        return int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_WORLD_SIZE", 1))
    if env.get("SLURM_ARRAY_TASK_ID"):
        task, low, count = (int(env.get(v, 0)) for v in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN",
                                                          "SLURM_ARRAY_TASK_COUNT"))
        step = int(env.get("SLURM_ARRAY_TASK_STEP") or 1)
        if (task - low) % step or not 0 <= (task - low) // step < count:
            raise UserError(f"SLURM array task {task} is not one of {count} evenly spaced tasks from {low}; submit "
                            f"the prediction as --array=0-{count - 1}, or pass --shard K/N")
        return (task - low) // step, count, 1
    return 0, 1, 1


def shard_range(images: int, batch_size: int, k: int, n: int) -> tuple[int, int]:
    """Process k's images [start, stop): a contiguous run of whole batches, so that every batch holds the
    same images at any number of processes (and gives the same probabilities)."""
    batches = -(-images // batch_size)
    return min(images, k * batches // n * batch_size), min(images, (k + 1) * batches // n * batch_size)


class Images(Dataset):
    """Images [start, stop) of a source, decoded on access: (index, image), or (index, None) when unreadable."""

    def __init__(self, source: Source, pre: Preprocess, start: int, stop: int):
        self.source, self.pre, self.start, self.stop = source, pre, start, stop

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, j):
        i = self.start + j
        try:
            return i, self.source.read(i, self.pre)
        except UNREADABLE:
            return i, None


def _collate(items):
    """(indices, readable indices, their images stacked or None)."""
    good = [(i, x) for i, x in items if x is not None]
    return [i for i, _ in items], [i for i, _ in good], torch.stack([x for _, x in good]) if good else None


def batches(source: Source, pre: Preprocess, probs_of, start: int, stop: int, batch_size: int, workers: int):
    """(indices, readable indices, their probabilities or None) per batch of images [start, stop)."""
    loader = DataLoader(Images(source, pre, start, stop), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate, worker_init_fn=ignore_in_worker)
    for indices, good, x in loader:
        yield indices, good, (probs_of(x) if x is not None else None)


def ranked(probs: torch.Tensor, top_k: int) -> tuple[list[list[int]], list[list[float]]]:
    """The top_k classes of each row, most probable first; ties in class order, as argmax breaks them."""
    order = probs.argsort(dim=1, descending=True, stable=True)[:, :top_k]
    return order.tolist(), probs.gather(1, order).tolist()


def print_predictions(source: Source, probs_of, classes, pre, batch_size: int, workers: int, png) -> dict:
    """A few images: `path<TAB>class<TAB>probability` lines, the accuracy when every label is known."""
    names, truth, predicted, confidence, skipped = [], [], [], [], []
    for indices, good, probs in batches(source, pre, probs_of, 0, len(source.names), batch_size, workers):
        skipped += [source.names[i] for i in sorted(set(indices) - set(good))]
        if probs is None:
            continue
        top, p = ranked(probs, 1)
        for i, (c,), (q,) in zip(good, top, p):
            print(f"{source.names[i]}\t{classes[c]}\t{q:.4f}")
            names.append(source.names[i])
            truth.append(source.labels[i])
            predicted.append(c)
            confidence.append(q)
    for name in skipped:
        warnings.warn(f"skipping unreadable image {name}", stacklevel=1)
    if not names:
        raise UserError(f"none of the {len(source.names)} files is a readable image ({source.names[0]}, ...); "
                        "check the files")
    result = {"predictions": [classes[c] for c in predicted], "skipped": skipped}
    if source.labelled:
        correct = sum(t == c for t, c in zip(truth, predicted))
        result["accuracy"] = correct / len(truth)
        print(f"accuracy {result['accuracy']:.4f} ({correct}/{len(truth)})")
    if png:  # a sample across the classes, mistakes included, not the first files in sorted order
        shown = pick_examples(truth, predicted, 16)
        title = (f"accuracy {result['accuracy']:.4f} ({correct}/{len(truth)}); " if "accuracy" in result else "") + \
            f"{len(shown)} of {len(truth)} images"
        save_predictions([source.read_name(names[i], pre) for i in shown],
                         [classes[truth[i]] if truth[i] >= 0 else None for i in shown],
                         [classes[predicted[i]] for i in shown], [confidence[i] for i in shown], png, title)
        print(f"wrote {png}")
    return result


def write_part(output: Output, source: Source, probs_of, classes, pre, batch_size: int, workers: int, top_k: int,
               k: int, n: int, start: int, stop: int) -> None:
    """This process's images into its part, committed after the first batch, every COMMIT_SECONDS and at
    the end; a stop signal commits what is done and ends with how to continue."""
    part = output.open_part(k, n)
    stopper = Stopper()
    stopper.defer(None)  # a signal is seen between batches, after a whole batch's rows; a second one stops at once
    bar = tqdm(total=stop - start, initial=part.images, unit="img", disable=not is_main_rank(), leave=False,
               desc=f"predict {k + 1}/{n}" if n > 1 else "predict")
    try:
        if part.done:
            return
        began, seen, last = time.perf_counter(), 0, None
        for indices, good, probs in batches(source, pre, probs_of, start + part.images, stop, batch_size, workers):
            rows = b""
            if probs is not None:
                top, p = ranked(probs, top_k)
                rows = encode_rows(output.fmt, [source.names[i] for i in good], [[classes[c] for c in t] for t in top],
                                   p, [classes[source.labels[i]] for i in good] if source.labelled else None)
            part.append(rows, len(indices), [source.names[i] for i in sorted(set(indices) - set(good))])
            seen += len(indices)
            bar.update(len(indices))
            if last is None or time.perf_counter() - last >= COMMIT_SECONDS:
                part.commit()
                last = time.perf_counter()
            if stopper.signum:
                raise StopRequested(stopper.signum)
        part.commit(done=True)
        seconds = time.perf_counter() - began
        bar.close()
        print(f"part {k} of {n}: {seen} images in {seconds:.2f} s ({seen / max(seconds, 1e-9):.1f} images/s)",
              file=sys.stderr)
    except StopRequested as e:
        part.commit()
        raise Stopped(e.args[0], f"stopped by {Stopper.name(e.args[0])}: {part.images} of {stop - start} images of "
                      f"part {k} of {n} are saved in {output.parts}; run the same command again to continue") from None
    finally:
        bar.close()
        part.close()
        stopper.restore()


def summarize(path, fmt: str, classes: list[str], labelled: bool, output: Output) -> dict:
    """Counts and, with labels, metrics of a merged file, streamed over its rows: accuracy, balanced accuracy,
    macro F1 and the confusion matrix (many classes: written to output.confusion)."""
    index, c = {name: i for i, name in enumerate(classes)}, len(classes)
    counts, rows = array("q", bytes(8 * c * c)) if labelled else None, 0
    for _, pred, _, label in read_rows(path, fmt):
        rows += 1
        if labelled:
            counts[index[label] * c + index[pred]] += 1
    if not labelled or not rows:
        return {"rows": rows}
    confusion = torch.tensor(counts, dtype=torch.long).view(c, c)
    correct = int(confusion.diag().sum())
    per_class = class_scores(confusion, classes)
    record = {"rows": rows, "correct": correct, "accuracy": correct / rows, **balanced_scores(per_class), **per_class}
    if c <= CONFUSION_TABLE_CLASSES:
        record["confusion"] = confusion.tolist()
    else:
        text = ",".join(["true\\predicted", *classes]) + "\n" + "".join(
            ",".join([classes[t], *map(str, confusion[t].tolist())]) + "\n" for t in range(c))
        write_atomic(output.confusion, text.encode())
        record["most_confused"] = [[classes[t], classes[p], v] for t, p, v in confused_pairs(confusion, 10)]
    return record


def print_metrics(record: dict, classes: list[str], output: Output) -> None:
    if "accuracy" not in record:
        return
    print(f"accuracy {record['accuracy']:.4f} ({record['correct']}/{record['rows']})")
    print(f"balanced accuracy {record['balanced_acc']:.4f}, macro F1 {record['macro_f1']:.4f}")
    if "confusion" in record:
        width = max(6, *(len(name) for name in classes))
        print("confusion matrix (rows: true class, columns: predicted):")
        print(" " * width + "".join(f" {name:>{width}}" for name in classes))
        for name, row in zip(classes, record["confusion"]):
            print(f"{name:<{width}}" + "".join(f" {v:>{width}}" for v in row))
    else:
        print(f"most confused (true -> predicted: images); the whole matrix is in {output.confusion}:")
        for true, pred, v in record["most_confused"]:
            print(f"  {true} -> {pred}: {v}")


def draw(out: Path, fmt: str, source: Source, classes: list[str], pre: Preprocess, png, record: dict) -> None:
    """--png from the written file: 16 rows across the classes, mistakes included; only those decoded."""
    index = {name: i for i, name in enumerate(classes)}
    truth, predicted = array("i"), array("i")
    for _, pred, _, label in read_rows(out, fmt):
        truth.append(index.get(label, -1) if label is not None else -1)
        predicted.append(index[pred])
    shown = set(pick_examples(truth.tolist(), predicted.tolist(), 16))
    rows = [row for j, row in enumerate(read_rows(out, fmt)) if j in shown]
    title = (f"accuracy {record['accuracy']:.4f} ({record['correct']}/{record['rows']}); "
             if "accuracy" in record else "") + f"{len(rows)} of {len(truth)} images"
    save_predictions([source.read_name(name, pre) for name, _, _, _ in rows], [label for _, _, _, label in rows],
                     [pred for _, pred, _, _ in rows], [p for _, _, p, _ in rows], png, title)
    print(f"wrote {png}")


def main(argv=None):
    parser = Parser(prog="python -m tl.predict", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a run's best.safetensors, or a .onnx / "
                        ".torchscript.pt file written by python -m tl.export")
    parser.add_argument("--weights", help="the base weights file a feature-extract or lora run used, when it "
                        "was a local file (torchvision weights are found by name)")
    parser.add_argument("--out", metavar="FILE", help="write the predictions to FILE (CSV, or JSON lines for "
                        ".jsonl) instead of printing them: any number of images, several processes, resumable")
    parser.add_argument("--format", choices=FORMATS, help="of --out; default: from its suffix (.jsonl: jsonl, "
                        "else csv)")
    parser.add_argument("--top-k", type=number(int, 1), help="classes per row in --out (default: 5, or fewer classes)")
    parser.add_argument("--shard", metavar="K/N", help="be process K (from 0) of N, each writing its part of --out; "
                        "default: from torchrun/accelerate launch (RANK, WORLD_SIZE) or a SLURM array task, else 0/1")
    parser.add_argument("--overwrite", action="store_true", help="replace what another prediction (another model, "
                        "images or settings) left at --out")
    parser.add_argument("--png", help="also write a picture of 16 of the images (across the classes, "
                        "mistakes included) titled with their predictions")
    parser.add_argument("--batch-size", type=number(int, 1), help="default: the run's evaluation batch size")
    parser.add_argument("--num-workers", type=number(int, 0), help="DataLoader processes decoding images (default: "
                        "the usable cores shared among this node's processes)")
    parser.add_argument("--split", choices=("train", "val", "test"), help="the rows of a pack (default: val) or of "
                        "a label file (default: all) to classify")
    parser.add_argument("--data-file", metavar="LABELS", help="instead of images: the rows of a label file (CSV or "
                        "JSONL with a path column; label and split columns optional, see docs/label-files.md)")
    parser.add_argument("--data-root", help="the folder a label file's relative paths start from (default: its "
                        "folder)")
    parser.add_argument("--val-of", metavar="DATA", help="instead of images: the run's val images of this data "
                        "set (its val/ folder, what the run's --val-split held out of train/, or a label file's)")
    parser.add_argument("images", nargs="*", help="image files or folders (searched recursively), or one pack folder "
                        "(python -m tl.pack)")

    def go():
        args = parser.parse_args(argv)
        if args.out is None and (args.format or args.top_k or args.shard or args.overwrite):
            raise UserError("--format, --top-k, --shard and --overwrite are for --out FILE; add --out")
        return predict(args.checkpoint, args.images, args.weights, args.png, args.batch_size, args.val_of,
                       out=args.out, fmt=args.format, top_k=args.top_k, shard=args.shard, workers=args.num_workers,
                       split=args.split, overwrite=args.overwrite, data_file=args.data_file,
                       data_root=args.data_root)

    run_cli(go)


if __name__ == "__main__":
    main()
