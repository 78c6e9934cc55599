"""python -m tl.predict at scale: images/s at 1 and 2 processes, and peak memory at 10k vs 100k images.

- Scaling: one process given one core (taskset -c 0, one torch thread, one DataLoader worker) against
  two processes under torchrun given one core each (the same per process): what one GPU against two
  is, each process with the same resources. images/s counts the prediction loop (tl.predict's own
  `part K of N: ... images/s` line), not the start-up. The two processes' merged file must equal the
  one process's, byte for byte.
- Memory: peak RSS of the whole process tree (tl.predict and its DataLoader workers, polled from
  /proc) over 10k and 100k generated small JPEGs, with tl.predict's defaults.

The model is cheap on purpose (a resnet18 trained one epoch at 32 px on a small generated set), so
that decoding and tl.predict's own work show. Writes results-predict.md and results-predict.json
(bench/ by default, --out elsewhere).

    .venv/bin/python bench/predict.py            # what `make bench-predict` runs (~7 min on 2 cores)
    .venv/bin/python bench/predict.py --quick    # 1k vs 3k images, in /tmp: a smoke test
"""

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
import data as bench_data  # noqa: E402  (bench/data.py: the generator, /proc memory, machine info)

PY = sys.executable
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
OTHER = {}  # per run: cores busy with other work meanwhile (a shared machine)
RATE = re.compile(r"part (\d+) of (\d+): (\d+) images in ([\d.]+) s")


class TreeRss(threading.Thread):
    """The peak of the summed RSS of a process and all its descendants, polled every 0.1 s."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stopped = pid, 0, threading.Event()

    def run(self):
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.stopped.is_set():
            try:
                pids = [self.pid, *(c.pid for c in root.children(recursive=True))]
            except psutil.Error:
                break
            self.peak = max(self.peak, sum(bench_data._proc_mem(p)[0] for p in pids))
            self.stopped.wait(0.1)


def run(cmd: list[str], env: dict, log: Path, memory: bool = False) -> tuple[str, float, int]:
    """(stderr+stdout, wall seconds, peak tree RSS bytes or 0) of a command; exits on failure. Polling the
    memory reads every process's smaps_rollup 10 times a second: a good part of a core, which the speed
    runs must not pay (two processes pinned to both cores would share it; one process leaves it a core)."""
    t0 = time.perf_counter()
    with open(log, "w") as f, bench_data.OtherCpu() as other:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=f, stderr=subprocess.STDOUT)
        mem = TreeRss(proc.pid) if memory else None
        if mem:
            mem.start()
        code = proc.wait()
        if mem:
            mem.stopped.set()
            mem.join()
    text = log.read_text(errors="replace")
    OTHER[log.stem] = round(other.value, 2)
    if code:
        sys.exit(f"{' '.join(cmd)} failed ({code}):\n{text[-3000:]}")
    return text, time.perf_counter() - t0, mem.peak if mem else 0


def rate(text: str) -> tuple[int, float]:
    """(images, seconds of the slowest process) from tl.predict's `part K of N` lines."""
    found = [(int(m[3]), float(m[4])) for m in RATE.finditer(text)]
    return sum(n for n, _ in found), max(s for _, s in found)


def checkpoint(work: Path) -> Path:
    out = work / "predict-ckpt"
    if (out / "best.safetensors").is_file():
        return out / "best.safetensors"
    tiny = bench_data.set_dir(work, 500, True, 10, 1)
    bench_data.generate(tiny, 500, 10, 1, True, 0.2, progress=False)
    run([PY, "train.py", "--data-dir", str(tiny), "--output-dir", str(out), "--weights", "none", "--model", "resnet18",
         "--image-size", "32", "--epochs", "1", "--batch-size", "32", "--wandb", "disabled", "--overwrite"],
        {}, work / "predict-train.log")
    return out / "best.safetensors"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work-dir", default="/tmp/tl-bench-data", help="generated sets (shared with bench/data.py)")
    ap.add_argument("--out", default=str(BENCH), help="where results-predict.md/.json go")
    ap.add_argument("--sizes", type=int, nargs=2, default=[10_000, 100_000], help="the two set sizes for memory")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="1k and 3k images, results in /tmp/tl-bench-predict")
    opts = ap.parse_args()
    if opts.quick:
        opts.sizes, opts.out = [1000, 3000], "/tmp/tl-bench-predict"
    work, out = Path(opts.work_dir), Path(opts.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    sets = {}
    for n in opts.sizes:
        sets[n] = bench_data.set_dir(work, n, True, 10, 0)
        print(f"set of {n} images: {bench_data.generate(sets[n], n, 10, 0, True, 0.1)['seconds']:.0f} s to make")
    ckpt = checkpoint(work)
    scratch = work / "predict-out"
    scratch.mkdir(exist_ok=True)
    for f in scratch.glob("*"):
        if f.is_file():
            f.unlink()
    common = ["--checkpoint", str(ckpt), "--batch-size", str(opts.batch_size)]
    # The larger set: with 5k images a process, worker start-up and the first batches' warm-up are a
    # tenth of its loop; at 50k they are noise.
    scaled = str(sets[opts.sizes[1]])
    one_core = {"OMP_NUM_THREADS": "1"}

    print("scaling: 1 process on core 0 ...", flush=True)
    text, wall1, _ = run(["taskset", "-c", "0", PY, "-m", "tl.predict", *common, "--num-workers", "1",
                          "--out", str(scratch / "one.csv"), scaled], one_core, scratch / "one.log")
    n1, s1 = rate(text)
    print("scaling: 2 processes (torchrun), one core each ...", flush=True)
    pin = 'exec taskset -c "$LOCAL_RANK" "$0" -m tl.predict "$@"'
    text, wall2, _ = run([TORCHRUN, "--nproc_per_node", "2", "--no-python", "bash", "-c", pin, PY, *common,
                          "--num-workers", "1", "--out", str(scratch / "two.csv"), scaled], one_core,
                         scratch / "two.log")
    n2, s2 = rate(text)
    same = (scratch / "one.csv").read_bytes() == (scratch / "two.csv").read_bytes()
    ips1, ips2 = n1 / s1, n2 / s2

    memory = {}
    for n in opts.sizes:
        print(f"memory: {n} images, defaults ...", flush=True)
        text, wall, peak = run([PY, "-m", "tl.predict", *common, "--out", str(scratch / f"m{n}.csv"), str(sets[n])],
                               {}, scratch / f"m{n}.log", memory=True)
        images, seconds = rate(text)
        memory[n] = {"images": images, "wall_s": round(wall, 1), "loop_s": seconds,
                     "images_per_s": round(images / seconds, 1), "peak_tree_rss_mib": round(peak / 2**20, 1)}
    lo, hi = (memory[n]["peak_tree_rss_mib"] for n in opts.sizes)
    res = {"machine": bench_data.machine_info(), "batch_size": opts.batch_size, "checkpoint": str(ckpt),
           "scaling": {"set_images": n1, "one_process_ips": round(ips1, 1), "two_processes_ips": round(ips2, 1),
                       "speedup": round(ips2 / ips1, 2), "one_wall_s": round(wall1, 1), "two_wall_s": round(wall2, 1),
                       "merged_identical": same, "target": 1.8},
           "memory": {str(n): m for n, m in memory.items()}, "memory_ratio": round(hi / lo, 3), "memory_target": 1.3,
           "other_cpu": OTHER}
    (out / "results-predict.json").write_text(json.dumps(res, indent=1) + "\n")
    m = res["machine"]
    a, b = opts.sizes
    md = f"""# tl.predict at scale

`make bench-predict` ({m['date']}; {m['cores']} cores of {m['cpu']}, {m['memory_gib']} GiB; torch {m['torch']};
tl {m['tl_commit']}). Generated small JPEGs (~64 px, 10 classes), a resnet18 trained one epoch at 32 px,
batch {opts.batch_size}. The machine was shared with other work, so speeds vary between runs.

## Scaling: 1 vs 2 processes, one core each

One core per process stands for one GPU per process: each process gets the same resources (one
torch thread, one DataLoader worker, pinned with taskset), so the ratio is what a second GPU adds.
images/s: the prediction loop over the {n1} images of the {b} set (start-up excluded).

| processes | images/s | wall s (with start-up) | other work meanwhile (cores) |
|---:|---:|---:|---:|
| 1 (taskset -c 0) | {ips1:.0f} | {wall1:.1f} | {OTHER['one']:.2f} |
| 2 (torchrun, taskset -c RANK) | {ips2:.0f} | {wall2:.1f} | {OTHER['two']:.2f} |

Speed-up **{ips2 / ips1:.2f}x** (target >= 1.8x: {"holds" if ips2 / ips1 >= 1.8 else "fails"}); the merged
file of the two processes is {"identical" if same else "NOT identical"} to the one process's, byte for byte.

## Memory: {a} vs {b} images

Peak RSS of tl.predict and its DataLoader workers together (tl.predict's defaults: {m['cores']} workers,
{m['cores']} threads), polled every 0.1 s.

| images | peak tree RSS MiB | images/s | wall s | other work meanwhile (cores) |
|---:|---:|---:|---:|---:|
""" + "".join(f"| {n} | {memory[n]['peak_tree_rss_mib']:.0f} | {memory[n]['images_per_s']:.0f} | "
              f"{memory[n]['wall_s']:.1f} | {OTHER[f'm{n}']:.2f} |\n" for n in opts.sizes) + f"""
Ratio **{hi / lo:.2f}x** (target <= 1.3x: {"holds" if hi / lo <= 1.3 else "fails"}).
"""
    (out / "results-predict.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
