"""Best val accuracy on hymenoptera of named tl configurations over seeds.

    .venv/bin/python bench/seeds.py --out bench/results-modes.md \
        --config "memory=--data-mode memory" --config "stream=--data-mode stream" \
        --config "packed=--data-dir {pack} --data-mode stream"          (make bench-modes)

Every configuration gets `--weights` (the stand-in weights in ../shared/weights unless given),
`--epochs`, `--seed` and `--tl-args`; `{data}` and `{pack}` stand for the extracted set and its
tl.pack. The table: best val acc per seed, mean, range, the (train, val) image counts the epochs
saw, wall time, and whether configurations gave the same curves (the data modes should, bit for bit).
The stand-in weights are not ImageNet weights: the figures compare configurations, nothing more.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


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
    args = p.parse_args()
    configs = dict(c.split("=", 1) for c in args.config)
    for need in (args.data_zip, args.weights):
        if not Path(need).is_file():
            sys.exit(f"error: {need} does not exist; pass --data-zip and --weights")
    work = Path(tempfile.mkdtemp(prefix="tl-seeds-"))
    subprocess.run(["unzip", "-q", args.data_zip, "-d", str(work)], check=True)
    paths = {"data": work / "hymenoptera_data", "pack": work / "pack"}
    if any("{pack}" in c for c in configs.values()):
        subprocess.run([sys.executable, "-m", "tl.pack", str(paths["data"]), str(paths["pack"])], cwd=ROOT,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results: dict[str, dict[int, dict]] = {name: {} for name in configs}
    for seed in args.seeds:
        for name, extra in configs.items():
            out = work / f"{name}-{seed}"
            t0 = time.time()
            cmd = [sys.executable, "train.py", "--data-dir", str(paths["data"]), "--weights", args.weights,
                   "--epochs", str(args.epochs), "--seed", str(seed), "--output-dir", str(out),
                   *args.tl_args.split(), *extra.format(**paths).split()]
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            summary = json.loads((out / "summary.json").read_text())
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            results[name][seed] = {"best": summary["best_val_acc"], "wall": time.time() - t0,
                                   "counts": sorted({(r["train_images"], r["val_images"]) for r in rows}),
                                   "curve": [(r["train_loss"], r["val_acc"]) for r in rows]}
            print(f"seed {seed} {name}: best val acc {summary['best_val_acc']:.4f}", flush=True)
    lines = [f"# hymenoptera: {args.title}", "",
             f"`bench/seeds.py --epochs {args.epochs} --seeds {' '.join(map(str, args.seeds))}`, weights "
             f"{Path(args.weights).name}, `{args.tl_args}`; {time.strftime('%Y-%m-%d')}. The stand-in weights are "
             "not ImageNet weights: these figures compare configurations, not the tutorial's accuracy. Wall "
             "times are only comparable within one quiet run.", "",
             "| config | train.py args | " + " | ".join(f"seed {s}" for s in args.seeds) +
             " | mean | min-max | (train, val) images | wall s |",
             "|---|---|" + "---:|" * (len(args.seeds) + 2) + "---|---:|"]
    for name, by_seed in results.items():
        best = [by_seed[s]["best"] for s in args.seeds]
        counts = sorted({c for s in args.seeds for c in by_seed[s]["counts"]})
        lines.append(f"| {name} | `{configs[name]}` | " + " | ".join(f"{b:.4f}" for b in best) +
                     f" | {statistics.mean(best):.4f} | {min(best):.4f}-{max(best):.4f} | {counts} | "
                     f"{sum(by_seed[s]['wall'] for s in args.seeds):.0f} |")
    first = next(iter(results))
    same = [name for name in results if all(results[name][s]["curve"] == results[first][s]["curve"]
                                            for s in args.seeds)]
    lines += ["", f"Configurations whose every epoch (train loss, val accuracy) equals `{first}`'s for every seed: "
              f"{', '.join(same)}.", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
