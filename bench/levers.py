"""What the accuracy levers cost, measured in one run on this machine (docs/levers.md).

    .venv/bin/python bench/levers.py                 (make bench-levers: ~10 min on 2 cores)
    .venv/bin/python bench/levers.py --quick         (a smoke test on a generated set, under a minute)

1. Epoch time: train.py on hymenoptera (stand-in weights, finetune, 224 px, the tutorial's batch 4)
   for 2 epochs, plain and with --ema, --mixup, --cutmix, both; the second epoch's train seconds
   (the first warms up), each configuration run --repeats times, interleaved, the median taken.
   Target: at most 10% over plain.
2. Loader throughput per worker: one process decodes every hymenoptera train image from its file
   and applies the train transform (tl.data.preprocess.train_transform: crop + flip, then the policy /
   erasing), as a stream-mode DataLoader worker does; images/s, each transform --repeats times,
   interleaved, the median taken. Target: each policy at least 80% of plain.
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
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"

from tl.data.listing import list_images  # noqa: E402
from tl.data.preprocess import Preprocess, decode, train_transform  # noqa: E402

TRAIN = {"plain": [], "ema 0.99": ["--ema", "0.99"], "mixup 0.8": ["--mixup", "0.8"], "cutmix 1.0": ["--cutmix", "1.0"],
         "mixup + cutmix": ["--mixup", "0.8", "--cutmix", "1.0"]}
LOADER = {"plain": (None, 0.0), "randaugment": ("randaugment", 0.0), "trivialaugment": ("trivialaugment", 0.0),
          "autoaugment": ("autoaugment", 0.0), "trivialaugment + erasing 0.25": ("trivialaugment", 0.25)}


def epoch_seconds(data: Path, weights: str, extra: list[str], work: Path, args) -> float:
    out = Path(tempfile.mkdtemp(dir=work))
    cmd = [sys.executable, "train.py", "--data-dir", str(data), "--weights", weights, "--epochs", "2",
           "--output-dir", str(out / "run"), "--wandb", "disabled", "--data-mode", "memory", *args.train_args.split(),
           *extra]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    row = json.loads((out / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    return row["train_images"] / row["train_images_per_s"]


def loader_rate(paths: list[str], pre: Preprocess, policy, erasing: float) -> float:
    transform = train_transform(pre, policy, erasing)
    t0 = time.perf_counter()
    for path in paths:
        transform(decode(path, pre, True))
    return len(paths) / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-zip", default=str(SHARED / "data" / "hymenoptera_data.zip"))
    p.add_argument("--weights", default=str(SHARED / "weights" / "resnet18-catsdogs-proxy.pth"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-args", default="", help="more train.py options for every epoch-time run")
    p.add_argument("--parts", nargs="+", choices=("loader", "epoch"), default=["loader", "epoch"],
                   help="what to measure (default: both)")
    p.add_argument("--quick", action="store_true", help="a generated 40-image set, 64 px, 1 repeat: a smoke test")
    p.add_argument("--out", default=str(ROOT / "bench" / "results-levers-cost.md"))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tl-levers-"))
    if args.quick:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import make_imagefolder

        data, weights = make_imagefolder(work / "d", n_train=20, n_val=4, size=160), "none"
        args.repeats, args.train_args = 1, args.train_args + " --image-size 64 --batch-size 8"
    else:
        for need in (args.data_zip, args.weights):
            if not Path(need).is_file():
                sys.exit(f"error: {need} does not exist; pass --data-zip and --weights, or --quick")
        subprocess.run(["unzip", "-q", args.data_zip, "-d", str(work)], check=True)
        data, weights = work / "hymenoptera_data", args.weights
    pre = Preprocess.tutorial(64 if args.quick else 224)
    paths = [path for path, _ in list_images(data).train]
    paths = [path for path in paths if not path.endswith(".gif")]
    rates: dict[str, list[float]] = {name: [] for name in LOADER}
    seconds: dict[str, list[float]] = {name: [] for name in TRAIN}
    if "loader" not in args.parts:
        rates = {}
    if "epoch" not in args.parts:
        seconds = {}
    for r in range(args.repeats if rates else 0):
        for name, (policy, erasing) in LOADER.items():
            rates[name].append(loader_rate(paths, pre, policy, erasing))
            print(f"repeat {r}: loader {name}: {rates[name][-1]:.1f} images/s", flush=True)
    for r in range(args.repeats if seconds else 0):
        for name, extra in TRAIN.items():
            seconds[name].append(epoch_seconds(data, weights, extra, work, args))
            print(f"repeat {r}: epoch {name}: {seconds[name][-1]:.2f} s", flush=True)
    base_rate = statistics.median(rates["plain"]) if rates else None
    base_s = statistics.median(seconds["plain"]) if seconds else None
    quick, where = (" --quick", "a generated set") if args.quick else ("", "hymenoptera")
    lines = ["# What the accuracy levers cost", "",
             f"`bench/levers.py{quick} --repeats {args.repeats}`, {time.strftime('%Y-%m-%d')}, {len(paths)} train "
             f"images of {where}, one machine, one run: the ratios are what to read (docs/levers.md).", "",
             "## Train epoch time (train.py, 2nd epoch, median)", "",
             f"train.py options: `--epochs 2 --data-mode memory {args.train_args.strip()}`", "",
             "| config | seconds | runs | vs plain | target |", "|---|---:|---|---:|---|"]
    results = {"epoch_seconds": seconds, "loader_images_per_s": rates}
    for name, values in seconds.items():
        ratio = statistics.median(values) / base_s
        target = "" if name == "plain" else ("ok" if ratio <= 1.10 else "OVER 10%")
        lines.append(f"| {name} | {statistics.median(values):.2f} | {', '.join(f'{v:.2f}' for v in values)} | "
                     f"{ratio:.3f} | {target} |")
    lines += ["", f"## Loader throughput per worker (decode + train transform at {pre.train_crop} px, one process)", "",
              "| transform | images/s | runs | vs plain | target |", "|---|---:|---|---:|---|"]
    for name, values in rates.items():
        ratio = statistics.median(values) / base_rate
        target = "" if name == "plain" else ("ok" if ratio >= 0.80 else "UNDER 80%")
        lines.append(f"| {name} | {statistics.median(values):.1f} | {', '.join(f'{v:.1f}' for v in values)} | "
                     f"{ratio:.3f} | {target} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
