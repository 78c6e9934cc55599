"""tl against the PyTorch transfer-learning tutorial's own loop: same machine, data and weights.

For each mode (finetune, feature-extract) and seed, runs bench/tutorial.py and tl's train.py as
subprocesses and measures wall time, s/epoch (mean of the epochs after the first), train
images/s, best val accuracy and peak memory of each process tree. Then measures the bare model
(bench/bare_model.py) at both sides' batch size and precision, to give each loop's pipeline
efficiency (its train images/s over the bare model's). Writes results.md and results.json.

Both sides load the same weights file and are seeded with the same seed right before the model is
built, so their new heads start equal (checked, see `head_init_equal`); data order and
augmentation use different RNG streams, which is why accuracy is compared over several seeds.

    .venv/bin/python bench/bench.py --quick                  # smoke test: 2 epochs, one seed
    .venv/bin/python bench/bench.py --epochs 3 --seeds 0     # short real figures
    .venv/bin/python bench/bench.py                          # the full benchmark (25 epochs, seeds 0 1 2)
    .venv/bin/python bench/bench.py --variant "--batch-size 16 --lr 0.004"   # extra finetune rows
"""

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
import zipfile
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SHARED = ROOT.parent / "shared"
MODES = ("finetune", "feature-extract")
TUTORIAL = {"batch_size": 4, "precision": "fp32", "crop": 224}  # the tutorial's loop is fixed


def cpu_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (all cores), from /proc/stat."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


def wait_for_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """On a shared machine, wait (at most max_wait s) until other work uses < threshold cores
    over 3 s; returns the load last seen. Each run's `other_cpu` still says if it got disturbed."""
    deadline, said = time.monotonic() + max_wait, False
    while True:
        busy0 = cpu_busy_seconds()
        time.sleep(3)
        load = (cpu_busy_seconds() - busy0) / 3
        if load < threshold or time.monotonic() > deadline:
            return load
        print("" if said else "(machine busy, waiting)", end=".", flush=True)
        said = True


def run_measured(cmd: list[str], log: Path, epoch_end: str | None, cwd: Path = ROOT, interval: float = 0.5) -> dict:
    """Run cmd to completion; wall time, epoch boundaries, peak memory and CPU use of its tree.

    epoch_ends: seconds from start at which output lines matching the regex `epoch_end` arrived,
    so both sides' epochs are timed the same way from outside, checkpoint writing included.
    peak_rss_mib: the largest RSS of any single process of the tree (exact, from wait4).
    peak_tree_rss_mib: the largest sum of RSS over the process and its children (DataLoader
    workers, W&B's service), polled every 0.5 s: pages they share (libraries, memory inherited at
    fork) count once per process, so an upper bound for workers. (PSS would share them out, but it
    depends on what else runs on the machine and costs ~20 ms of CPU per GB to read.)
    other_cpu: CPU (in cores) used by anything else on the machine meanwhile; above ~0.1 on a
    small machine the timings of that run are disturbed.
    """
    busy0, self0, t0 = cpu_busy_seconds(), time.process_time(), time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # lines arrive when printed
    ends, out = [], open(log, "w")

    def read():  # a thread: the pipe must be drained while the main thread polls memory
        for line in proc.stdout:
            if epoch_end and re.match(epoch_end, line):
                ends.append(time.perf_counter() - t0)
            out.write(line)

    reader = threading.Thread(target=read)
    reader.start()
    root, peak_tree = psutil.Process(proc.pid), 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # wait4: rusage of the whole tree
        if pid:
            break
        tree = 0
        for p in [root, *root.children(recursive=True)]:
            try:
                tree += p.memory_info().rss
            except psutil.Error:  # a worker that just exited
                pass
        peak_tree = max(peak_tree, tree)
        time.sleep(interval)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    reader.join()
    out.close()
    own_cpu = usage.ru_utime + usage.ru_stime  # includes reaped workers
    other = cpu_busy_seconds() - busy0 - own_cpu - (time.process_time() - self0)  # minus this polling
    if proc.returncode:
        sys.exit(f"failed (exit {proc.returncode}): {shlex.join(cmd)}\n{log.read_text()[-3000:]}")
    return {"wall_s": wall, "epoch_ends": ends, "peak_rss_mib": usage.ru_maxrss / 1024,
            "peak_tree_rss_mib": max(peak_tree / 2**20, usage.ru_maxrss / 1024), "cpu_s": own_cpu,
            "other_cpu": max(0.0, other / wall)}


def epoch_figures(measured: dict, epochs: list[dict]) -> dict:
    """s/epoch and train images/s over the epochs after the first (start-up, first-call costs).

    s/epoch from the epoch boundaries seen in the output; the loop's own per-epoch seconds only
    if those are missing (tl's seconds stop before its checkpoints are written, the tutorial's
    include its torch.save). Train images/s as each loop reports it: over its train phase.
    """
    steady = epochs[1:] or epochs
    ends = measured["epoch_ends"]
    by_output = len(ends) == len(epochs) > 1
    return {"s_per_epoch": statistics.mean(b - a for a, b in zip(ends, ends[1:])) if by_output
            else statistics.mean(e["seconds"] for e in steady),
            "s_per_epoch_from": "output" if by_output else "reported",
            "reported_s_per_epoch": statistics.mean(e["seconds"] for e in steady),
            "train_images_per_s": statistics.harmonic_mean([e["train_images_per_s"] for e in steady]),
            "reported_epoch_seconds": [e["seconds"] for e in epochs]}


def run_tutorial(mode: str, seed: int, args, work: Path) -> dict:
    out = work / f"tutorial-{mode}-seed{seed}.json"
    cmd = [sys.executable, str(BENCH / "tutorial.py"), "--data-dir", args.data_dir, "--mode", mode,
           "--weights", args.weights, "--epochs", str(args.epochs), "--seed", str(seed), "--json", str(out)]
    # An epoch ends where the next one's "Epoch N/M" header or the final line is printed.
    measured = run_measured(cmd, out.with_suffix(".log"), r"Epoch [1-9]\d*/\d+$|Training complete")
    record = json.loads(out.read_text())
    return {**measured, **epoch_figures(measured, record["epochs"]), "best_val_acc": record["best_val_acc"], **TUTORIAL}


def run_tl(mode: str, seed: int, args, work: Path, variant: int = 0) -> dict:
    """tl with --tl-args, plus the flags of --variant number `variant` (0: none)."""
    name = f"tl-{mode}-seed{seed}" + (f"-variant{variant}" if variant else "")
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    extra = shlex.split(args.tl_args) + (shlex.split(args.variant[variant - 1]) if variant else [])
    cmd = [sys.executable, "train.py", "--mode", mode, "--data-dir", args.data_dir, "--weights", args.weights,
           "--epochs", str(args.epochs), "--seed", str(seed), "--output-dir", str(out), *extra]
    # tl prints "epoch  N/M  train loss ..." once the epoch's checkpoints are written.
    measured = run_measured(cmd, work / f"{name}.log", r"epoch +\d+/\d+ ", cwd=args.tl_root)
    config = json.loads((out / "config.json").read_text())
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    precision = {"bf16": "bf16"}.get(config["mixed_precision"], "fp32")  # fp16 has no CPU autocast here
    summary = json.loads((out / "summary.json").read_text())
    # tl's feature cache (feature-extract): the backbone runs once, on un-augmented images, and the
    # epochs train only the head on stored features; not the tutorial's algorithm, so flagged.
    cached = mode == "feature-extract" and config.get("feature_cache", "off") == "on"
    return {**measured, **epoch_figures(measured, epochs), "best_val_acc": summary["best_val_acc"],
            "batch_size": config["batch_size"], "precision": precision, "feature_cache": cached,
            "crop": config["recipe"]["train_size"], "output_dir": str(out)}


HEAD_CHECK = """
import sys, torch, torchvision
from accelerate.utils import set_seed
from tl.model.network import build_model
seed, weights = int(sys.argv[1]), sys.argv[2]
set_seed(seed)
tl_head = build_model("resnet18", weights, 2, "finetune")[0].fc
torch.manual_seed(seed)  # bench/tutorial.py's order: seed, build, load, new fc
m = torchvision.models.resnet18()
m.load_state_dict(torch.load(weights, weights_only=True))
head = torch.nn.Linear(m.fc.in_features, 2)
print(torch.equal(tl_head.weight, head.weight) and torch.equal(tl_head.bias, head.bias))
"""


def head_init_equal(seed: int, weights: str, tl_root: str) -> bool | None:
    """Whether tl and the tutorial copy draw the same initial head for a seed (None: check failed,
    e.g. tl's build_model changed)."""
    r = subprocess.run([sys.executable, "-c", HEAD_CHECK, str(seed), weights], cwd=tl_root,
                       capture_output=True, text=True)
    return {"True": True, "False": False}.get(r.stdout.strip())


def sides(mode: str, args) -> dict:
    """What runs in a mode: the tutorial, tl, and for finetune each --variant (named by its flags)."""
    runs = {"tutorial": run_tutorial, "tl": run_tl}
    if mode == "finetune":
        for i, flags in enumerate(args.variant, 1):
            runs[f"tl {flags}"] = lambda mode, seed, args, work, i=i: run_tl(mode, seed, args, work, i)
    return runs


def run_bare(bs: int, precision: str, crop: int, args, work: Path) -> dict:
    """Bare-model figures at one batch size, precision and input size: the median of --bare-repeats
    fresh processes (the same steps run ~10% faster or slower from one process to the next on this
    kind of VM), so that they compare with a loop's typical speed, not with a lucky process."""
    out, runs = work / f"bare-{precision}-bs{bs}-{crop}px.json", []
    cmd = [sys.executable, str(BENCH / "bare_model.py"), "--batch-size", str(bs), "--precision", precision,
           "--image-size", str(crop), "--seconds", str(args.bare_seconds), "--json", str(out)]
    for _ in range(args.bare_repeats):
        other = run_measured(cmd, out.with_suffix(".log"), epoch_end=None)["other_cpu"]
        runs.append(json.loads(out.read_text())[0] | {"other_cpu": other})
    return runs[0] | {k: statistics.median(r[k] for r in runs) for k in ("train", "frozen", "inference")} | {
        "other_cpu": max(r["other_cpu"] for r in runs), "processes": runs}


def least_disturbed(run, args) -> dict:
    """run() after waiting for a quiet machine; again (--retries) while other work took more than
    --max-other-cpu cores during it. Returns the least disturbed attempt."""
    best = None
    for attempt in range(args.retries + 1):
        if attempt:
            print(f"(disturbed: other CPU {best['other_cpu']:.2f}, again)", end=" ", flush=True)
        if args.max_wait:
            wait_for_quiet(args.max_wait)
        r = run()
        best = r if best is None or r["other_cpu"] < best["other_cpu"] else best
        if best["other_cpu"] <= args.max_other_cpu:
            break
    return best


def read_text(path: Path) -> str | None:
    return path.read_text().strip() if path.is_file() else None


def machine_info(tl_root: str) -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    field = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "").split())
    git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=tl_root, capture_output=True, text=True)
    return {"cpu": field, "cores": os.cpu_count(), "bf16_flags": sorted(flags & {"avx512_bf16", "amx_bf16"}),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "torch": version("torch"),
            "torchvision": version("torchvision"), "accelerate": version("accelerate"),
            "python": sys.version.split()[0], "tl_root": tl_root,
            "tl_commit": git.stdout.strip() or read_text(Path(tl_root) / "COMMIT") or "not a git checkout",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def report(res: dict) -> str:
    m, a = res["machine"], res["args"]
    seeds, first = a["seeds"], str(a["seeds"][0])

    def label(side: str, r: dict) -> str:
        return "tl (feature cache)" if r.get("feature_cache") else f"`{side}`" if side.startswith("tl ") else side

    def setup(r: dict) -> str:
        return f"{r['batch_size']}, {r['precision']}, {r['crop']} px"

    lines = ["# tl vs the PyTorch transfer-learning tutorial's loop\n",
             f"{m['cpu']}, {m['cores']} cores ({', '.join(m['bf16_flags']) or 'no bf16'}), {m['memory_gib']} GiB; "
             f"torch {m['torch']}, torchvision {m['torchvision']}; tl {m['tl_commit']} ({m['tl_root']}); {m['date']}.",
             f"{a['epochs']} epochs; timings from seed {first}, best val acc over seeds {seeds} (mean ± std); "
             f"tl args: `{a['tl_args'] or '(defaults)'}`; rows named by flags are finetune variants on top of them. "
             "Speed-up = tutorial ÷ tl for times, tl ÷ tutorial for images/s. Setup: batch, precision, train "
             "crop (validation is at 224 px everywhere). Peak RSS: the largest single process (exact); tree: the sum "
             "over the process and its children (DataLoader workers, W&B), polled, shared pages counted per "
             "process. Other CPU: cores busy with anything else during the run (noise). Initial heads equal on "
             f"both sides: {res['head_init_equal']}."
             + (" *tl (feature cache)*: the frozen backbone runs once on un-augmented images, the epochs "
                "train the head on stored features (`--feature-cache off` for the tutorial's algorithm)."
                if any(r.get("feature_cache") for m in res["runs"].values() for r in m["tl"].values()) else "")
             + "\n",
             "| mode | side | setup | wall s | s/epoch | train img/s | best val acc | peak RSS MiB "
             "| peak tree RSS MiB | other CPU |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for mode in a["modes"]:
        runs = {side: by_seed[first] for side, by_seed in res["runs"][mode].items()}
        t = runs["tutorial"]
        for side, r in runs.items():
            accs = [res["runs"][mode][side][str(s)]["best_val_acc"] for s in seeds]
            lines.append(f"| {mode} | {label(side, r)} | {setup(r)} | {r['wall_s']:.0f} | "
                         f"{r['s_per_epoch']:.2f} | {r['train_images_per_s']:.1f} | {mean_std(accs)} | "
                         f"{r['peak_rss_mib']:.0f} | {r['peak_tree_rss_mib']:.0f} | {r['other_cpu']:.2f} |")
        for side, r in runs.items():
            if side != "tutorial":
                lines.append(f"| {mode} | **speed-up** {label(side, r)} | | **{t['wall_s'] / r['wall_s']:.2f}x** | "
                             f"**{t['s_per_epoch'] / r['s_per_epoch']:.2f}x** | "
                             f"**{r['train_images_per_s'] / t['train_images_per_s']:.2f}x** | | | | |")
    lines += ["\n## Bare ResNet-18 (random tensors in memory, SGD step included, warm-up excluded, median of "
              f"{a['bare_repeats']} processes)\n",
              "| batch | precision | input px | fwd+bwd img/s | frozen backbone img/s | inference img/s | other CPU |",
              "|---:|---|---:|---:|---:|---:|---:|"]
    for b in res["bare"]:
        lines.append(f"| {b['batch_size']} | {b['precision']} | {b['image_size']} | {b['train']:.1f} | "
                     f"{b['frozen']:.1f} | {b['inference']:.1f} | {b['other_cpu']:.2f} |")
    lines += ["\n## Pipeline efficiency: train img/s ÷ bare img/s at the same batch size, precision and crop\n",
              "Finetune against bare fwd+bwd, feature-extract against the frozen-backbone figure (backbone in "
              "eval mode, as tl runs it; the tutorial's runs in train mode, which costs a little more). "
              "The train img/s speed-up is the product of the model's speed at each side's setup and of the "
              "pipeline efficiencies' ratio.\n",
              "| mode | side | setup | train img/s | bare img/s | efficiency |",
              "|---|---|---|---:|---:|---:|"]
    bare = {(b["batch_size"], b["precision"], b["image_size"]): b for b in res["bare"]}
    for mode in a["modes"]:
        refs = {}
        for side, by_seed in res["runs"][mode].items():
            r = by_seed[first]
            ref = bare[(r["batch_size"], r["precision"], r["crop"])]
            ref = ref["train" if mode == "finetune" else "frozen"]
            if r.get("feature_cache"):  # epochs never run the backbone: nothing to compare with
                lines.append(f"| {mode} | {label(side, r)} | {setup(r)} | {r['train_images_per_s']:.0f} | "
                             f"{ref:.1f} | n/a |")
                continue
            lines.append(f"| {mode} | {label(side, r)} | {setup(r)} | {r['train_images_per_s']:.1f} | "
                         f"{ref:.1f} | {r['train_images_per_s'] / ref:.0%} |")
            refs[side] = (r["train_images_per_s"], ref, r)
        if "tutorial" not in refs:
            continue
        t_ips, t_ref, _ = refs["tutorial"]
        for side, (ips, ref, r) in refs.items():
            if side != "tutorial":
                lines.append(f"| {mode} | **{label(side, r)} ÷ tutorial** | | **{ips / t_ips:.2f}x** | "
                             f"{ref / t_ref:.2f}x model | {(ips / ref) / (t_ips / t_ref):.2f}x pipeline |")
    return "\n".join(lines) + "\n"


def default_data_dir(work: Path) -> str:
    """The tutorial's data set, extracted from ../shared into the scratch dir once."""
    target, zip_path = work / "hymenoptera_data", SHARED / "data" / "hymenoptera_data.zip"
    if not target.is_dir():
        if not zip_path.is_file():
            sys.exit(f"no --data-dir given and {zip_path} is missing; pass --data-dir")
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(work)
    return str(target)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", help="ImageFolder root (default: ../shared/data/hymenoptera_data.zip "
                   "extracted into --work-dir)")
    p.add_argument("--weights", default=str(SHARED / "weights" / "resnet18-catsdogs-proxy.pth"),
                   help="torchvision-format resnet18 state dict both sides start from")
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tl-args", default="", help='extra train.py flags for every tl run, e.g. "--wandb disabled"')
    p.add_argument("--variant", action="append", default=[], help='another tl configuration for finetune, as '
                   'train.py flags on top of --tl-args, e.g. "--batch-size 16 --lr 0.004"; its own rows in the '
                   "tables (repeatable)")
    p.add_argument("--bare-seconds", type=float, default=10.0, help="timed seconds per bare-model figure")
    p.add_argument("--bare-repeats", type=int, default=3, help="bare-model processes per configuration (median kept)")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 epochs, first seed, short bare figures, "
                   "no retries, results in --work-dir instead of bench/")
    p.add_argument("--retries", type=int, default=2, help="runs again (keeping the least disturbed) "
                   "when other work used more than --max-other-cpu cores during a run")
    p.add_argument("--max-other-cpu", type=float, default=0.1)
    p.add_argument("--tl-root", default=str(ROOT), help="the tl checkout to run (its train.py and tl/), e.g. a "
                   "`git archive HEAD` snapshot so that edits in progress cannot break a long run (a file COMMIT "
                   "in it names the commit in the results)")
    p.add_argument("--max-wait", type=float, default=600, help="seconds to wait before each run for other "
                   "work on the machine to stop (0: don't wait)")
    p.add_argument("--work-dir", default="/tmp/tl-bench", help="scratch: data, run outputs, logs")
    p.add_argument("--results-dir", help="where results.md/json go (default: bench/, or --work-dir with --quick)")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.seeds, args.bare_seconds, args.bare_repeats, args.retries = 2, args.seeds[:1], 2.0, 1, 0
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    args.data_dir = args.data_dir or default_data_dir(work)
    results_dir = Path(args.results_dir or (work if args.quick else BENCH))
    if not Path(args.weights).is_file():
        sys.exit(f"weights file {args.weights} missing; pass --weights")

    res = {"machine": machine_info(args.tl_root), "args": vars(args),
           "head_init_equal": head_init_equal(args.seeds[0], args.weights, args.tl_root),
           "runs": {mode: {side: {} for side in sides(mode, args)} for mode in args.modes}}
    for seed in args.seeds:
        for mode in args.modes:
            for side, run in sides(mode, args).items():
                print(f"seed {seed} {mode} {side} ...", end=" ", flush=True)
                r = least_disturbed(lambda run=run, mode=mode, seed=seed: run(mode, seed, args, work), args)
                res["runs"][mode][side][str(seed)] = r
                print(f"{r['wall_s']:.0f} s, {r['s_per_epoch']:.1f} s/epoch, best val acc {r['best_val_acc']:.3f}, "
                      f"other CPU {r['other_cpu']:.2f}", flush=True)
    first = str(args.seeds[0])
    configs = {(r["batch_size"], r["precision"], r["crop"])
               for m in res["runs"].values() for s in m.values() for r in [s[first]]}
    res["bare"] = []
    for bs, precision, crop in sorted(configs):
        print(f"bare model, batch {bs}, {precision}, {crop} px ...", end=" ", flush=True)
        b = least_disturbed(lambda bs=bs, precision=precision, crop=crop: run_bare(bs, precision, crop, args, work),
                            args)
        res["bare"].append(b)
        print(f"fwd+bwd {b['train']:.1f}, frozen {b['frozen']:.1f}, inference {b['inference']:.1f} img/s, "
              f"other CPU {b['other_cpu']:.2f}", flush=True)

    table = report(res)
    print("\n" + table)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "results.md").write_text(table)
    (results_dir / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {results_dir / 'results.md'} and results.json")


if __name__ == "__main__":
    main()
