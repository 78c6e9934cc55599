"""What a run's model got wrong: python -m tl.report RUN --errors [--split val|test] [--top N].

The run's best.safetensors over its val (or test) images, streamed and evaluated as the run evaluated
(tl.inference.trained.probabilities), then analyse(): the highest-loss images, the most-confused class pairs, per-class
accuracy worst first. Written into the run dir as errors.html (self-contained: thumbnails inlined),
errors.png and errors.json. Nothing grows with the classes squared but a [C, C] count tensor (1000
classes: 8 MB), never drawn.
"""

import base64
import html
import io
import json
import math
import warnings
from pathlib import Path

import torch

from tl.core.errors import UserError
from tl.core.files import output_folder, write_atomic
from tl.core.stop import writing
from tl.data.loaders import ImageSet, check_workers_can_start, eval_loader
from tl.data.preprocess import Preprocess, to_pil
from tl.data.sources import DataSet, open_run_data
from tl.data.splits import Split, usable_cpus
from tl.inference.trained import load_model, output_of, probabilities, run_data
from tl.model.evaluation import balanced_scores, class_scores, confused_pairs, confusion_matrix
from tl.runs import rundir
from tl.runs.pictures import save_errors

PAIRS = 20  # confused pairs kept
THUMB = 128  # px, the longer side of an errors.html thumbnail
SHOWN = 16  # images in errors.png (errors.html has all --top)


def analyse(paths: list[str], targets, probs: torch.Tensor, classes: list[str], top: int = 16,
            pairs: int = PAIRS) -> dict:
    """Plain data on what a model got wrong, from each image's path, true class index and class
    probabilities [N, C] (rows summing to 1):

    - accuracy, correct, images, balanced_accuracy and macro_f1 (as a run's summary computes them), mean_loss;
    - top_losses: the `top` images of highest loss -log p(true class), highest first (ties: in file order),
      each with index, path, true, predicted, probability (of the predicted class), p_true, loss, correct;
    - confused_pairs: the `pairs` most frequent (true, predicted) mistakes, most first (ties: by class
      index), each with its count and share of the true class's images;
    - per_class: every class's accuracy (its recall), correct, images, precision, f1 and the class it is
      most often mistaken for, worst first (ties: by name); classes without images last, accuracy None.
    """
    targets = torch.as_tensor(targets, dtype=torch.long)
    n, c = probs.shape if probs.dim() == 2 else (len(probs), -1)
    if c != len(classes) or len(targets) != n or len(paths) != n:
        raise ValueError(f"{len(paths)} paths, {len(targets)} targets, probabilities {tuple(probs.shape)} and "
                         f"{len(classes)} classes do not agree")
    if n == 0:
        raise ValueError("no images to analyse")
    if int(targets.min()) < 0 or int(targets.max()) >= c:
        raise ValueError(f"a target outside the {c} classes: every image needs its true class")
    probs = probs.float()
    confidence, preds = probs.max(1)
    p_true = probs.gather(1, targets[:, None]).squeeze(1)
    loss = -p_true.double().clamp_min(torch.finfo(torch.float32).tiny).log()  # at most 87.3: JSON has no inf
    order = torch.sort(loss, descending=True, stable=True).indices[:max(0, top)].tolist()
    top_losses = [{"rank": rank, "index": i, "path": str(paths[i]), "true": classes[targets[i]],
                   "predicted": classes[preds[i]], "probability": confidence[i].item(), "p_true": p_true[i].item(),
                   "loss": loss[i].item(), "correct": bool(preds[i] == targets[i])}
                  for rank, i in enumerate(order, 1)]

    confusion = confusion_matrix(targets, preds, c)
    counts = confusion.sum(1)
    confused = [{"true": classes[t], "predicted": classes[p], "count": count, "share": count / int(counts[t])}
                for t, p, count in confused_pairs(confusion, pairs)]
    off = confusion.clone()
    off.fill_diagonal_(0)

    scores = class_scores(confusion, classes)
    worst_count, worst_as = off.max(1)
    per_class = [{"class": name, "accuracy": scores["per_class_acc"][name] if counts[k] else None,
                  "correct": int(confusion[k, k]), "images": int(counts[k]),
                  "precision": scores["per_class_precision"][name], "f1": scores["per_class_f1"][name],
                  "confused_with": classes[worst_as[k]] if worst_count[k] else None,
                  "confused_count": int(worst_count[k])}
                 for k, name in enumerate(classes)]
    per_class.sort(key=lambda r: (r["images"] == 0, r["accuracy"] or 0.0, r["class"]))
    correct, balanced = int(confusion.diag().sum()), balanced_scores(scores)
    return {"images": n, "correct": correct, "accuracy": correct / n, "balanced_accuracy": balanced["balanced_acc"],
            "macro_f1": balanced["macro_f1"], "mean_loss": loss.mean().item(), "classes": len(classes),
            "top_losses": top_losses, "confused_pairs": confused, "per_class": per_class}


def thumbnail(image: torch.Tensor, side: int = THUMB) -> bytes:
    """A uint8 CHW image as JPEG bytes, its longer side at most `side` px."""
    img = to_pil(image)
    img.thumbnail((side, side))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=85)
    return out.getvalue()


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0 2em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:middle}th{background:#f2f2f2}
td.n{text-align:right;font-variant-numeric:tabular-nums}tr.ok td{color:#2a7a2a}img{display:block}
.path{font-size:80%;color:#666;word-break:break-all;max-width:30em}"""


def html_page(result: dict, thumbnails: list[bytes], title: str, facts: list[str]) -> str:
    """errors.html: self-contained (each top-loss image a base64 JPEG data URI), three tables."""
    e = html.escape
    lines = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>{e(title)}</h1>",
             "<ul>" + "".join(f"<li>{e(f)}</li>" for f in facts) + "</ul>",
             f"<h2>The {len(result['top_losses'])} highest losses</h2>",
             "<p>Loss: -log p(true class). A correct prediction can be among them when its true class's "
             "probability is low (shown in green).</p>",
             "<table><tr><th>#</th><th>image</th><th>true</th><th>predicted</th><th>p(predicted)</th>"
             "<th>p(true)</th><th>loss</th><th>file</th></tr>"]
    for row, jpeg in zip(result["top_losses"], thumbnails):
        uri = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
        lines.append(f'<tr{" class=ok" if row["correct"] else ""}><td class=n>{row["rank"]}</td>'
                     f'<td><img src="{uri}" alt="{e(row["true"])}"></td><td>{e(row["true"])}</td>'
                     f'<td>{e(row["predicted"])}</td><td class=n>{row["probability"]:.4f}</td>'
                     f'<td class=n>{row["p_true"]:.4f}</td><td class=n>{row["loss"]:.3f}</td>'
                     f'<td class=path>{e(row["path"])}</td></tr>')
    lines += ["</table>", f"<h2>The most-confused pairs ({len(result['confused_pairs'])})</h2>",
              "<table><tr><th>true</th><th>predicted as</th><th>images</th><th>of the true class's</th></tr>"]
    lines += [f'<tr><td>{e(p["true"])}</td><td>{e(p["predicted"])}</td><td class=n>{p["count"]}</td>'
              f'<td class=n>{p["share"]:.1%}</td></tr>' for p in result["confused_pairs"]]
    if not result["confused_pairs"]:
        lines.append("<tr><td colspan=4>no mistakes</td></tr>")
    lines += ["</table>", f"<h2>Per class, worst first ({len(result['per_class'])})</h2>",
              "<table><tr><th>class</th><th>accuracy</th><th>correct</th><th>images</th><th>precision</th>"
              "<th>F1</th><th>most often predicted as</th></tr>"]
    for r in result["per_class"]:
        other = f'{e(r["confused_with"])} ({r["confused_count"]})' if r["confused_with"] else "-"
        lines.append(f'<tr><td>{e(r["class"])}</td><td class=n>{_pct(r["accuracy"])}</td>'
                     f'<td class=n>{r["correct"]}</td><td class=n>{r["images"]}</td>'
                     f'<td class=n>{r["precision"]:.4f}</td><td class=n>{r["f1"]:.4f}</td><td>{other}</td></tr>')
    lines += ["</table>", "</body></html>", ""]
    return "\n".join(lines)


def save_outputs(result: dict, images: list[torch.Tensor], out: Path, title: str, facts: list[str],
                 record: dict) -> dict[str, Path]:
    """errors.json (record + result), errors.html and errors.png in `out`, each written atomically;
    images: the top losses' uint8 CHW views, in result's order."""
    files = {name: out / f for name, f in rundir.ERRORS.items()}
    write_atomic(files["json"], (json.dumps(record | result, indent=1) + "\n").encode())
    write_atomic(files["html"], html_page(result, [thumbnail(img) for img in images], title, facts).encode())
    shown = result["top_losses"][:SHOWN]
    worst = [r for r in result["per_class"] if r["images"]]
    save_errors(images[:SHOWN], [r["true"] for r in shown], [r["predicted"] for r in shown],
                [r["probability"] for r in shown], [(r["class"], r["accuracy"], r["images"]) for r in worst],
                [(p["true"], p["predicted"], p["count"]) for p in result["confused_pairs"]], files["png"],
                "\n".join([title, "; ".join(facts[:2])]))
    return files


def open_split(data: DataSet, split: str, pre: Preprocess) -> Split:
    """The run's val or test images of its data set, streamed (checked now, decoded when read)."""
    if split == "test" and not data.listing.test:  # a pack holds none
        if data.pack:
            raise UserError(f"{data.path} is a pack, which holds no test split; use --split val, or pass --data-dir "
                            "the folder with the test/ the run was evaluated on")
        if data.label_file:
            raise UserError(f"{data.path} has no test rows, so the run was not evaluated on a test split; use "
                            "--split val")
        raise UserError(f"{data.path} has no test/ folder, so the run was not evaluated on a test split; use "
                        "--split val, or pass --data-dir a copy of the data set with its test/ folder")
    return data.split(split, pre)


def errors_report(run: str, split: str = "val", top: int = 16, weights: str | None = None,
                  data_dir: str | None = None, out: str | None = None) -> dict:
    """Evaluate RUN's best.safetensors on its val (or test) images and write errors.json, errors.html and
    errors.png into RUN (or `out`); print a short summary. Returns analyse()'s result and the files."""
    path = Path(run)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder; pass a run dir (the --output-dir of a run)")
    best = path / rundir.BEST
    if not best.is_file():
        held = [n for n in (rundir.CONFIG, rundir.METRICS, rundir.SUMMARY) if (path / n).is_file()]
        why = (f"it holds {', '.join(held)} but no epoch's weights yet" if held else
               "it is not a run dir; --errors takes one run dir, e.g. runs/sweep/s0, not a sweep")
        raise UserError(f"{path} has no {rundir.BEST}: {why}; pass the dir of a run that finished an epoch")
    target = output_folder(Path(out) if out else path)
    if (path / rundir.LOCK).exists():
        warnings.warn(f"{path} holds a lock ({rundir.LOCK}): a run may still be training there; these are the "
                      "mistakes of its best epoch so far", stacklevel=1)
    model, meta = load_model(best, weights)  # before the data: a wrong --weights fails fast
    classes, pre = meta["classes"], Preprocess.from_meta(meta)
    root, data_root, called = run_data(path, data_dir)
    data = open_run_data(root, meta, data_root, called, "pass --data-dir the data set the run trained on")
    images = open_split(data, split, pre)
    batch = meta.get("eval_batch_size", 32)
    workers = min(4, usable_cpus(), math.ceil(len(images.targets) / batch))
    check_workers_can_start(workers)
    loader = eval_loader(ImageSet(images), batch, workers, 0, 1)
    probs = probabilities(model, loader, meta)
    result = analyse(images.paths, images.targets, probs, classes, top)
    tta, temperature = output_of(meta)
    how = ([f"--tta {tta}"] if tta != "none" else []) + ([f"temperature {temperature:.3g}"] if "temperature" in meta
                                                          else [])
    title = f"What {path.name} got wrong on {split} ({rundir.BEST}, epoch {meta.get('epoch', '?')})"
    facts = [f"accuracy {result['accuracy']:.4f} ({result['correct']}/{result['images']}), balanced accuracy "
             f"{result['balanced_accuracy']:.4f}", f"{len(classes)} classes, mean loss {result['mean_loss']:.4f}"
             + (f", {', '.join(how)}" if how else ""), f"data: {root}"]
    if images.skipped:
        facts.append(f"{len(images.skipped)} unreadable image(s) left out, as the run left them out")
    record = {"run": str(path), "split": split, "checkpoint": str(best), "epoch": meta.get("epoch"),
              "data_dir": str(root), "tta": tta, "temperature": temperature, "skipped": images.skipped}
    with writing():  # the three files belong together: a stop signal waits for them
        files = save_outputs(result, [images.images[r["index"]] for r in result["top_losses"]], target, title,
                             facts, record)
    worst = [r for r in result["per_class"] if r["images"]][:5]
    print(f"{split}: accuracy {result['accuracy']:.4f} ({result['correct']}/{result['images']}), balanced accuracy "
          f"{result['balanced_accuracy']:.4f}, {len(classes)} classes")
    print("worst classes: " + ", ".join(f"{r['class']} {r['accuracy']:.3f} ({r['correct']}/{r['images']})"
                                        for r in worst))
    pairs = result["confused_pairs"][:5]
    print("most confused (true -> predicted): " + (", ".join(f"{p['true']} -> {p['predicted']} {p['count']}"
                                                             for p in pairs) or "none, no mistakes"))
    print(f"wrote {', '.join(f.name for f in files.values())} in {target}")
    return result | {"files": files, "record": record}
