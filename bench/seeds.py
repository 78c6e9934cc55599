"""Best val accuracy on hymenoptera of named tl configurations over seeds.

    .venv/bin/python bench/seeds.py --out bench/results-modes.md \
        --config "memory=--data-mode memory" --config "stream=--data-mode stream" \
        --config "packed=--data-dir {pack} --data-mode stream"          (make bench-modes)

Every configuration gets `--weights` (the stand-in weights in ../shared/weights unless given),
`--epochs`, `--seed` and `--tl-args`; `{data}`, `{pack}` and `{imbalanced}` stand for the extracted
set, its tl.pack, and a copy whose train/bees keeps only every 5th image (val untouched). The table:
best val acc per seed, mean, range, the best epoch's balanced accuracy and, for runs with --tta,
the flipped figure; the (train, val) image counts the epochs saw, wall time, and whether
configurations gave the same curves (the data modes should, bit for bit).

With --results FILE.json, each finished (configuration, seed) is kept there as it ends and skipped
when the same command runs again: a long benchmark goes on where it stopped (another day, another
session), and the table marks what has not run yet. The stand-in weights are not ImageNet weights:
the figures compare configurations, nothing more.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
IMBALANCED_KEEP = 5  # {imbalanced}: train/bees keeps every 5th image


def imbalanced_copy(data: Path, dst: Path) -> Path:
    """The set with train/bees cut to every IMBALANCED_KEEP-th file (sorted), by hard links; val as it is."""
    shutil.copytree(data, dst, copy_function=os.link)
    for i, f in enumerate(sorted((dst / "train" / "bees").iterdir())):
        if i % IMBALANCED_KEEP:
            f.unlink()
    return dst


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ({min(values):.4f}-{max(values):.4f})" if values else "-"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", required=True, help="NAME=TRAIN_ARGS (repeat)")
    p.add_argument("--data-zip", default=str(SHARED / "data" / "hymenoptera_data.zip"))
    p.add_argument("--weights", default=str(SHARED / "weights" / "resnet18-catsdogs-proxy.pth"))
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tl-args", default="--wandb disabled", help="more train.py options for every configuration")
    p.add_argument("--title", default="best val accuracy over seeds")
    p.add_argument("--out", required=True, help="the markdown file to write")
    p.add_argument("--results", help="a JSON file keeping every finished run; runs already in it are not repeated")
    p.add_argument("--note", action="append", default=[], help="a paragraph for the end of the markdown (repeat)")
    p.add_argument("--table-only", action="store_true", help="train nothing: write the table of what --results holds")
    p.add_argument("--short", action="append", default=[], metavar="NAME=ARGS",
                   help="in the table, write NAME for these train.py args (repeat), e.g. RECIPE=\"--mode ...\"")
    args = p.parse_args()
    configs = dict(c.split("=", 1) for c in args.config)
    for need in (args.data_zip, args.weights):
        if not Path(need).is_file():
            sys.exit(f"error: {need} does not exist; pass --data-zip and --weights")
    store = Path(args.results) if args.results else None
    done = json.loads(store.read_text()) if store and store.exists() else {}
    work = Path(tempfile.mkdtemp(prefix="tl-seeds-"))
    paths = {"data": work / "hymenoptera_data", "pack": work / "pack", "imbalanced": work / "imbalanced"}
    if not args.table_only:
        subprocess.run(["unzip", "-q", args.data_zip, "-d", str(work)], check=True)
        if any("{pack}" in c for c in configs.values()):
            subprocess.run([sys.executable, "-m", "tl.pack", str(paths["data"]), str(paths["pack"])], cwd=ROOT,
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if any("{imbalanced}" in c for c in configs.values()):
            imbalanced_copy(paths["data"], paths["imbalanced"])

    def key(name, seed):
        return f"{name} | {configs[name]} | {args.tl_args} | epochs {args.epochs} | seed {seed}"

    for seed in args.seeds:  # every configuration's first seed before any second one
        for name, extra in configs.items():
            if key(name, seed) in done or args.table_only:
                continue
            out = work / f"{name}-{seed}"
            t0 = time.time()
            cmd = [sys.executable, "train.py", "--data-dir", str(paths["data"]), "--weights", args.weights,
                   "--epochs", str(args.epochs), "--seed", str(seed), "--output-dir", str(out),
                   *args.tl_args.split(), *extra.format(**paths).split()]
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            summary = json.loads((out / "summary.json").read_text())
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            done[key(name, seed)] = {
                "best": summary["best_val_acc"], "balanced": summary.get("val_balanced_acc"),
                "tta": summary.get("val_acc_tta"), "wall": time.time() - t0, "date": time.strftime("%Y-%m-%d"),
                "counts": sorted({(r["train_images"], r["val_images"]) for r in rows}),
                "curve": [(r["train_loss"], r["val_acc"]) for r in rows]}
            if store:  # as each run ends: a stop loses at most the run under way
                tmp = store.with_suffix(".tmp")
                tmp.write_text(json.dumps(done, indent=1) + "\n")
                os.replace(tmp, store)
            print(f"seed {seed} {name}: best val acc {summary['best_val_acc']:.4f}", flush=True)
    results = {name: {s: done[key(name, s)] for s in args.seeds if key(name, s) in done} for name in configs}
    dates = sorted({r["date"] for by_seed in results.values() for r in by_seed.values()})
    lines = [f"# hymenoptera: {args.title}", "",
             f"`bench/seeds.py --epochs {args.epochs} --seeds {' '.join(map(str, args.seeds))}`, weights "
             f"{Path(args.weights).name}, `{args.tl_args}`; measured {', '.join(dates)}. The stand-in weights are "
             "not ImageNet weights: these figures compare configurations, not the tutorial's accuracy. Wall "
             "times are only comparable within one quiet run. `{imbalanced}`: train/bees cut to every "
             f"{IMBALANCED_KEEP}th image, val untouched.", "",
             "| config | train.py args | " + " | ".join(f"seed {s}" for s in args.seeds) +
             " | mean | min-max | balanced acc | with --tta | (train, val) images | wall s |",
             "|---|---|" + "---:|" * (len(args.seeds) + 2) + "---:|---:|---|---:|"]
    shorts = [pair.split("=", 1) for pair in args.short]

    def shown(extra: str) -> str:
        for alias, text in shorts:
            extra = extra.replace(text, alias)
        return extra

    for name, by_seed in results.items():
        best = [r["best"] for r in by_seed.values()]
        cells = [f"{by_seed[s]['best']:.4f}" if s in by_seed else "not yet" for s in args.seeds]
        counts = sorted({tuple(c) for r in by_seed.values() for c in r["counts"]})
        balanced = [r["balanced"] for r in by_seed.values() if r.get("balanced") is not None]
        tta = [r["tta"] for r in by_seed.values() if r.get("tta") is not None]
        lines.append(f"| {name} | `{shown(configs[name])}` | " + " | ".join(cells) +
                     (f" | {statistics.mean(best):.4f} | {min(best):.4f}-{max(best):.4f}" if best else " | - | -") +
                     f" | {spread(balanced)} | {spread(tta)} | {counts} | "
                     f"{sum(r['wall'] for r in by_seed.values()):.0f} |")
    # Curves: None for a result carried over from a table written before they were kept.
    first = next(iter(results))
    same = [name for name in results if results[name] and results[name].keys() == results[first].keys() and
            all(results[name][s]["curve"] is not None and results[name][s]["curve"] == results[first][s]["curve"]
                for s in results[name])]
    lines += ["", f"Configurations whose every epoch (train loss, val accuracy) equals `{first}`'s for every seed: "
              f"{', '.join(same) or 'none'}.", "", *[f"`{alias}`: `{text}`.\n" for alias, text in shorts],
              *[f"{note}\n" for note in args.note]]
    Path(args.out).write_text("\n".join(lines).rstrip("\n") + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
