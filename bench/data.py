"""tl's data path on large synthetic sets: start-up, loader throughput and memory per data mode.

Two parts:

- a synthetic ImageFolder generator: N JPEGs in K classes, train/ and val/, deterministic by seed;
  photo-like by default (about 500x375, smooth noise: 20-90 KB files), `--small` for ~64 px files
  (100k of them in a minute or two on 2 cores). A set already generated with the same parameters
  is reused (its `.tl-synth.json` marker);
- a loader benchmark that runs tl's own path (tl.data.listing.list_images, load_split or stream_split,
  ImageSet, make_loaders; packed: tl.data.packs) in a fresh process per configuration and measures the
  start-up to the first training batch, the loader's images/s over an epoch (no model), the peak
  RSS of the process and of its DataLoader workers, and in the same process a plain Python loop
  (tl.data.preprocess.decode + tl.data.preprocess.train_transform over the same files, one thread) for reference.
  A two-process variant (RANK/WORLD_SIZE, DistributedSampler shards, as torchrun would run tl)
  shows each rank's memory in stream mode.

Writes results-data.md and results-data.json (bench/ by default, --out elsewhere).

    .venv/bin/python bench/data.py --quick                         # a tiny run in seconds (to /tmp)
    .venv/bin/python bench/data.py --small --sizes 1000 10000 100000   # what `make bench-data` runs
    .venv/bin/python bench/data.py --generate-only --sizes 5000    # only make a set (photo-like)
"""

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
MARKER = ".tl-synth.json"
GENERATOR_VERSION = 1
MODES = ("memory", "stream", "packed")


# --------------------------------------------------------------------------- generator

def synth_image(rng, small: bool):
    """A photo-like RGB image: a coarse random colour field upscaled bicubically (smooth regions and
    edges, like a photo's), plus a little grain so that JPEG does not compress it to nothing."""
    import numpy as np
    from PIL import Image

    if small:
        w, h = int(rng.integers(56, 81)), int(rng.integers(48, 73))
    else:
        w = int(np.clip(rng.normal(500, 60), 320, 700))
        h = int(w * rng.choice([0.75, 0.75, 0.667, 1.0, 1.333]))
    cells = int(rng.integers(8, 40))
    base = rng.integers(0, 256, (max(2, h // cells), max(2, w // cells), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC)).astype(np.int16)
    img += rng.integers(-5, 6, (h, w, 1), dtype=np.int16)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _layout(n: int, classes: int, val_fraction: float):
    """Image i: class i % K; within its class, every image whose rank j crosses a multiple of
    1/val_fraction goes to val, so every class gets its share of val images."""
    for i in range(n):
        c, j = i % classes, i // classes
        split = "val" if math.floor((j + 1) * val_fraction) > math.floor(j * val_fraction) else "train"
        yield i, f"{split}/c{c:03d}/img{i:07d}.jpg"


def _write_chunk(job) -> int:
    import numpy as np

    root, seed, small, quality, items = job
    for i, rel in items:
        rng = np.random.default_rng([seed, i])  # image i depends on (seed, i) only: any chunking, any workers
        synth_image(rng, small).save(os.path.join(root, rel), quality=quality)
    return len(items)


def generate(root, n: int, classes: int = 10, seed: int = 0, small: bool = False, val_fraction: float = 0.1,
             workers: int | None = None, progress: bool = True) -> dict:
    """Make (or reuse) the set; returns its parameters plus "reused" and "seconds"."""
    from multiprocessing import get_context

    from tqdm import tqdm

    root = Path(root)
    params = {"generator_version": GENERATOR_VERSION, "images": n, "classes": classes, "seed": seed,
              "small": small, "val_fraction": val_fraction, "quality": 85}
    marker = root / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("params") == params:
                return {**params, "reused": True, "seconds": 0.0}
        except ValueError:
            pass
    if root.exists() and not marker.is_file() and any(root.iterdir()):
        sys.exit(f"{root} exists, is not empty and holds no {MARKER}: not a generated set; pass another --work-dir")
    t0 = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)  # a set with other parameters, or a half-written one
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    items = list(_layout(n, classes, val_fraction))
    for d in {os.path.dirname(rel) for _, rel in items}:
        (tmp / d).mkdir(parents=True, exist_ok=True)
    chunks = [items[k:k + 500] for k in range(0, n, 500)]
    workers = workers or len(os.sched_getaffinity(0))
    jobs = [(str(tmp), seed, small, params["quality"], c) for c in chunks]
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=n, desc=f"generate {root.name}", unit="img", disable=not progress,
                                       file=sys.stderr))
        pool = stack.enter_context(get_context("fork").Pool(workers)) if workers > 1 else None
        for done in pool.imap_unordered(_write_chunk, jobs) if pool else map(_write_chunk, jobs):
            bar.update(done)
    seconds = time.perf_counter() - t0
    (tmp / MARKER).write_text(json.dumps({"params": params, "seconds": round(seconds, 2)}) + "\n")
    tmp.rename(root)
    return {**params, "reused": False, "seconds": seconds}


def set_dir(work: Path, n: int, small: bool, classes: int, seed: int) -> Path:
    return work / f"synth-{'small' if small else 'photo'}-{n}-k{classes}-s{seed}"


def dir_bytes(root: Path) -> int:
    return sum(e.stat().st_size for e in os.scandir(root) if e.is_file()) if root.is_dir() else 0


def tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total


# --------------------------------------------------------------------------- one measured configuration

def _proc_mem(pid) -> tuple[int, int]:
    """(RSS, PSS) of one process in bytes, from /proc/PID/smaps_rollup; (0, 0) if it is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, pss


class TreeMemory(threading.Thread):
    """Polls this process and its children (DataLoader workers): the peak of the summed RSS and of
    the summed PSS (shared pages divided among the processes that map them)."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval, self.peak_rss, self.peak_pss, self.stopped = interval, 0, 0, threading.Event()

    def run(self):
        import psutil

        me = psutil.Process()
        while not self.stopped.is_set():
            pids = [me.pid]
            try:
                pids += [c.pid for c in me.children(recursive=True)]
            except psutil.Error:
                pass
            mem = [_proc_mem(p) for p in pids]
            self.peak_rss = max(self.peak_rss, sum(m[0] for m in mem))
            self.peak_pss = max(self.peak_pss, sum(m[1] for m in mem))
            self.stopped.wait(self.interval)

    def stop(self):
        self.stopped.set()
        self.join()


def child(cfg: dict) -> dict:
    """One configuration, in this (fresh) process. cfg: root, mode, workers (-1: tl's default),
    batch_size, image_size, max_loader_images, plain_images, plain_seconds, spawned (the parent's
    time.time() just before starting this process), pack (packed mode's folder)."""
    t_spawn = cfg["spawned"]
    import torch
    from accelerate import Accelerator

    from tl.data.loaders import ImageSet, make_loaders
    from tl.data.preprocess import Preprocess, decode, train_transform
    from tl.data.sources import open_data
    from tl.data.splits import choose_data_mode, usable_cpus
    from tl.train.setup import on_main, read_split
    accelerator = Accelerator(cpu=True)  # with RANK/WORLD_SIZE set (2 procs): a gloo group, as under torchrun
    t_imports = time.time()
    rank, world = accelerator.process_index, accelerator.num_processes
    node_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    mem = TreeMemory()
    mem.start()
    size, mode, root = cfg["image_size"], cfg["mode"], Path(cfg["root"])
    pre = Preprocess.tutorial(size)
    # tl's own defaults (tl.train.setup.setup): no workers in memory mode, else the usable cores shared out.
    workers = cfg["workers"] if cfg["workers"] >= 0 else \
        0 if mode == "memory" else max(1, usable_cpus() // node_processes)
    t0 = time.time()
    # tl.train.setup.setup's own path: the main process lists (and in stream mode checks) for all.
    data = on_main(accelerator, lambda: open_data(Path(cfg["pack"]) if mode == "packed" else root))
    listing = data.listing
    t_list = time.time()
    auto = choose_data_mode("auto", listing, pre, node_processes)
    data_mode = "memory" if mode == "memory" else "stream"
    train_split = read_split(accelerator, data, "train", data_mode, pre, True, False)
    val_split = read_split(accelerator, data, "val", data_mode, pre, False, False)
    t_load = time.time()
    train_set = ImageSet(train_split, train_transform(pre), seed=0)
    val_set = ImageSet(val_split)
    train_loader, sampler, _ = make_loaders(train_set, val_set, cfg["batch_size"], workers, 0, rank, world,
                                            batchnorm_training=True)
    sampler.set_epoch(1)
    train_set.set_epoch(1)
    t_loaders = time.time()
    it = iter(train_loader)
    x, _ = next(it)
    t_first = time.time()
    assert x.dtype == torch.uint8 and x.shape[1:] == (3, size, size), x.shape
    n, cap = 0, cfg["max_loader_images"] or len(sampler)
    t_start = time.perf_counter()
    for x, _ in it:  # loader only, no model: after the first batch, to the epoch's end (or the cap)
        n += len(x)
        if n >= cap:
            break
    loader_s = time.perf_counter() - t_start
    del it  # workers shut down and are reaped: RUSAGE_CHILDREN holds their peak
    mem.stop()
    rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rss_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    # The plain loop: the same kind of files, decoded and augmented one by one in one thread, as one
    # DataLoader worker does its work (workers run with one torch thread); same sampler order.
    torch.set_num_threads(1)
    if mode == "packed":
        listing = open_data(root, warn=False).listing  # the source folder: the plain loop reads files
    paths = [listing.train[i][0] for i in list(sampler)[:cfg["plain_images"]]]
    transform = train_transform(pre)
    torch.manual_seed(0)
    k, t_plain = 0, time.perf_counter()
    for path in paths:
        transform(decode(path, pre, True))
        k += 1
        if time.perf_counter() - t_plain > cfg["plain_seconds"]:
            break
    plain_s = time.perf_counter() - t_plain
    loader_ips = n / loader_s if loader_s > 0 else float("nan")
    plain_ips = k / plain_s
    mib = 2 ** 20
    return {
        "mode": mode, "rank": rank, "world": world, "workers": workers, "batch_size": cfg["batch_size"],
        "image_size": size, "train_images": len(train_split.targets), "val_images": len(val_split.targets),
        "shard_images": len(sampler), "auto_choice": auto,
        "imports_s": t_imports - t_spawn, "list_s": t_list - t0, "load_s": t_load - t_list,
        "loaders_s": t_loaders - t_load, "first_batch_s": t_first - t_loaders,
        "data_startup_s": t_first - t0, "startup_s": t_first - t_spawn,
        "loader_images": n, "loader_s": loader_s, "loader_ips": loader_ips,
        "per_worker_ips": loader_ips / max(1, workers),
        "plain_images": k, "plain_ips": plain_ips, "ratio": loader_ips / max(1, workers) / plain_ips,
        "rss_self_mib": rss_self / mib, "rss_worker_mib": rss_children / mib,
        "peak_rss_per_process_mib": max(rss_self, rss_children) / mib,
        "peak_tree_rss_mib": max(mem.peak_rss, rss_self) / mib, "peak_tree_pss_mib": mem.peak_pss / mib,
        "torch_threads_loader": torch.get_num_threads(),
    }


def run_child(cfg: dict, env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    cfg = {**cfg, "spawned": time.time()}
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115  (the child holds it)
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cfg)],
                            stdout=subprocess.PIPE, stderr=out, text=True, env={**os.environ, **(env or {})},
                            cwd=ROOT)


def collect(proc: subprocess.Popen, what: str, log: Path | None) -> dict:
    stdout, _ = proc.communicate()
    if proc.returncode:
        tail = log.read_text()[-3000:] if log and log.is_file() else ""
        sys.exit(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(stdout.strip().splitlines()[-1])


def cpu_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (all cores, steal included), from /proc/stat."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


class OtherCpu:
    """Cores busy with anything but this process and its children meanwhile (noise on a shared machine)."""

    def __enter__(self):
        self.busy, self.t = cpu_busy_seconds(), time.perf_counter()
        self.own = time.process_time() + self._children()
        return self

    @staticmethod
    def _children() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    def __exit__(self, *exc):
        own = time.process_time() + self._children() - self.own
        self.value = max(0.0, (cpu_busy_seconds() - self.busy - own) / (time.perf_counter() - self.t))
        return False


def wait_for_quiet(max_wait: float, threshold: float = 0.2) -> float:
    """On a shared machine, wait (at most max_wait s) until other work uses < threshold cores over 2 s."""
    deadline, said = time.monotonic() + max_wait, False
    while True:
        busy0 = cpu_busy_seconds()
        time.sleep(2)
        load = (cpu_busy_seconds() - busy0) / 2
        if load < threshold or time.monotonic() > deadline:
            return load
        print("" if said else "(machine busy, waiting)", end=".", flush=True)
        said = True


def least_disturbed(run, opts) -> list[dict]:
    """run() (a list of rows) after waiting for a quiet machine; again (--retries) while other work took
    more than --max-other-cpu cores during it; the least disturbed attempt."""
    best = None
    for attempt in range(opts.retries + 1):
        if attempt:
            print(f"(disturbed: other CPU {best[0]['other_cpu']:.2f}, again)", end=" ", flush=True)
        if opts.max_wait:
            wait_for_quiet(opts.max_wait)
        rows = run()
        best = rows if best is None or rows[0]["other_cpu"] < best[0]["other_cpu"] else best
        if best[0]["other_cpu"] <= opts.max_other_cpu:
            break
    return best


def measure(cfg: dict, what: str, log: Path) -> dict:
    with OtherCpu() as other:
        r = collect(run_child(cfg, log=log), what, log)
    return {**r, "other_cpu": other.value}


def measure_ranks(cfg: dict, world: int, what: str, logs: list[Path]) -> list[dict]:
    """`world` processes at once, as torchrun --nproc_per_node would start them: a gloo group; the main
    process lists and checks the set for all, each rank iterates its sampler shard."""
    with OtherCpu() as other:
        port = str(29500 + os.getpid() % 1000)
        procs = [run_child(cfg, {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                                 "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                           logs[r]) for r in range(world)]
        rows = [collect(p, f"{what} rank {r}", logs[r]) for r, p in enumerate(procs)]
    return [{**r, "other_cpu": other.value} for r in rows]


# --------------------------------------------------------------------------- report

def packed_available() -> tuple[bool, str]:
    if not ((ROOT / "tl" / "pack.py").is_file() and (ROOT / "tl" / "data" / "packs.py").is_file()):
        return False, "tl/pack.py and tl/data/packs.py are not in this tree"
    r = subprocess.run([sys.executable, "-c", "import tl.pack, tl.data.packs, wids, webdataset"], cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode:
        return False, f"tl.pack/tl.data.packs do not import here ({r.stderr.strip().splitlines()[-1]})"
    return True, "tl.pack + tl.data.packs (wids)"


def machine_info() -> dict:
    from importlib.metadata import version
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal:"))
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "memory_gib": round(mem / 2**20, 1),
            "python": platform.python_version(), "torch": version("torch"), "torchvision": version("torchvision"),
            "pillow": version("pillow"), "tl_commit": git.stdout.strip() or "?",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def crc_cost(pack: Path, n: int) -> dict:
    """What checking each image's CRC-32 costs a packed read, in this process: reading the first n train images
    with the check and without, interleaved and repeated (the fastest of 5 each: a loader's throughput on a
    busy machine varies by more than the check costs), against reading and decoding them as a worker does."""
    from tl.data.packs import PackedSplit, decode_bytes
    from tl.data.preprocess import Preprocess

    ds = PackedSplit(pack, "train")
    n = min(n, len(ds))
    best = {True: float("inf"), False: float("inf")}
    for _ in range(5):
        for check in (False, True):
            PackedSplit.check_bytes = check
            t0 = time.perf_counter()
            for i in range(n):
                ds.read(i)
            best[check] = min(best[check], time.perf_counter() - t0)
    PackedSplit.check_bytes = True
    pre = Preprocess.tutorial(224)
    t0 = time.perf_counter()
    for i in range(n):
        decode_bytes(ds.read(i), pre, True)
    read_decode = time.perf_counter() - t0
    ds.close()
    crc = max(0.0, best[True] - best[False])
    return {"images": n, "crc_us": crc / n * 1e6, "read_decode_us": read_decode / n * 1e6, "cost": crc / read_decode}


def find(rows, n, mode, world=1):
    """The row of tl's default workers (the first measured) for a set size, mode and process count."""
    return next((r for r in rows if r["set_images"] == n and r["mode"] == mode and r["world"] == world
                 and r.get("rank", 0) == 0), None)


def checks(res: dict) -> list[str]:
    """The issue's targets, on the smallest and the largest set measured."""
    main_kind = "small" if res["args"]["small"] else "photo"
    every = res["rows"]
    rows = [r for r in every if r.get("kind", main_kind) == main_kind]
    sizes = sorted({r["set_images"] for r in rows})
    lo, hi, out = sizes[0], sizes[-1], []
    if len(sizes) < 2:
        out.append("- (one set size only: the start-up and memory scaling targets need two)")

    def ok(b):
        return "**holds**" if b else "**fails**"

    for mode in ("stream", "packed", "memory"):
        a, b = find(rows, lo, mode), find(rows, hi, mode)
        if not (a and b) or lo == hi:
            continue
        s = b["startup_s"] / a["startup_s"]
        ds = b["data_startup_s"] / a["data_startup_s"]
        m = b["peak_rss_per_process_mib"] / a["peak_rss_per_process_mib"]
        out.append(f"- {mode}: start-up to the first batch {b['startup_s']:.1f} s at {hi:,} images vs "
                   f"{a['startup_s']:.1f} s at {lo:,} ({s:.2f}x; the data part alone {b['data_startup_s']:.1f} vs "
                   f"{a['data_startup_s']:.2f} s, {ds:.1f}x): < 30 s {ok(b['startup_s'] < 30)}, "
                   f"<= 1.5x {ok(s <= 1.5)}. "
                   f"Peak RSS per process {b['peak_rss_per_process_mib']:.0f} vs {a['peak_rss_per_process_mib']:.0f} "
                   f"MiB ({m:.2f}x): <= 1.3x {ok(m <= 1.3)} (tree PSS, workers included: "
                   f"{b['peak_tree_pss_mib']:.0f} vs {a['peak_tree_pss_mib']:.0f} MiB, "
                   f"{b['peak_tree_pss_mib'] / a['peak_tree_pss_mib']:.2f}x).")
    largest = {k: max(r["set_images"] for r in every if r.get("kind", main_kind) == k)
               for k in {r.get("kind", main_kind) for r in every}}
    for mode in ("stream", "packed", "memory"):
        for r in every:
            k = r.get("kind", main_kind)
            if r["mode"] != mode or r["world"] != 1 or r["set_images"] != largest[k]:
                continue
            out.append(f"- {mode}, {r['workers']} worker(s), {r['set_images']:,} {k} images: loader "
                       f"{r['per_worker_ips']:.0f} img/s per "
                       f"worker vs plain loop {r['plain_ips']:.0f} ({r['ratio']:.0%}): >= 80% {ok(r['ratio'] >= 0.8)}.")
    for s in res.get("sets", []):
        if s.get("crc"):
            c = s["crc"]
            out.append(f"- packed, {s['train'] + s['val']:,} {s['kind']} images: each image's CRC-32 check "
                       f"{c['crc_us']:.1f} us, "
                       f"{c['cost']:.2%} of reading and decoding it ({c['read_decode_us']:.0f} us; {c['images']} "
                       f"images, the fastest of 5 passes): <= 3% of loader throughput {ok(c['cost'] <= 0.03)}.")
    for n in sizes:
        ranks = [r for r in rows if r["set_images"] == n and r["world"] > 1]
        one = find(rows, n, ranks[0]["mode"]) if ranks else None
        if ranks and one:
            per = ", ".join(f"rank {r['rank']} {r['peak_rss_per_process_mib']:.0f}" for r in ranks)
            pss = ", ".join(f"{r['peak_tree_pss_mib']:.0f}" for r in ranks)
            worst = max(r["peak_rss_per_process_mib"] for r in ranks) / one["peak_rss_per_process_mib"]
            out.append(f"- {len(ranks)} processes, {ranks[0]['mode']}, {n:,} images: peak RSS per process {per} MiB "
                       f"vs {one['peak_rss_per_process_mib']:.0f} MiB for one process ({worst:.2f}x): "
                       f"about one process's (<= 1.1x) {ok(worst <= 1.1)}. Tree PSS (with workers) per rank "
                       f"{pss} vs "
                       f"{one['peak_tree_pss_mib']:.0f} MiB.")
    return out


def report(res: dict) -> str:
    m, a = res["machine"], res["args"]
    cap = f", at most {a['max_loader_images']} images" if a["max_loader_images"] else ""
    lines = [
        "# tl's data path on synthetic sets: start-up, loader throughput, memory\n",
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}, torch {m['torch']}, "
        f"torchvision {m['torchvision']}, Pillow {m['pillow']}; tl {m['tl_commit']}; {m['date']}.",
        f"Sets: small (~64 px) or photo-like (~500x375) JPEGs, {a['classes']} classes, "
        f"{a['val_fraction']:.0%} val, seed {a['seed']}, in the page cache (generated just before, or reused). "
        f"Train crops {a['image_size']} px, batch {a['batch_size']}, loader over a whole epoch of the train shard "
        f"(no model){cap}. "
        f"Packed: {res['packed_note']}.\n",
        "Each row is a fresh process (two at once for `2 procs`). *start-up*: from the process's start (interpreter "
        "and imports included) to the first train batch out of the DataLoader; *list*: "
        "tl.data.listing.list_images (packed: tl.data.packs.open_pack); *decode/check*: load_split decodes every "
        "image (memory), stream_split reads every "
        "header (stream), tl.data.packs.stream_packed_split reads nothing (packed); *first batch*: from iter() to "
        "the first batch (worker start-up "
        "included). *img/s per worker*: loader images/s after the first batch over max(1, workers). *plain loop*: "
        "tl.data.preprocess.decode + tl.data.preprocess.train_transform over the same files in this process, "
        "one torch thread, no DataLoader. *RSS per process*: the largest of the process and any of its DataLoader "
        "workers (ru_maxrss, "
        "exact; a forked worker counts the pages it shares with the main process); *tree PSS*: process + workers, "
        "shared pages divided among them (polled every 0.2 s). *other CPU*: cores busy with anything else during "
        "the row (noise from other work on the machine; above ~0.1 the row's speeds are disturbed).\n",
        "| set | mode | procs | workers | start-up s | imports s | list s | decode/check s | first batch s "
        "| loader img/s | img/s per worker | plain loop img/s | ratio | RSS per process MiB (main / worker) "
        "| tree PSS MiB | other CPU |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        procs = f"{r['world']} (rank {r['rank']})" if r["world"] > 1 else "1"
        lines.append(
            f"| {r['set_images']:,} {r.get('kind', '')} | {r['mode']} | {procs} | {r['workers']} | "
            f"{r['startup_s']:.2f} | "
            f"{r['imports_s']:.2f} | {r['list_s']:.2f} | {r['load_s']:.2f} | {r['first_batch_s']:.2f} | "
            f"{r['loader_ips']:.0f} | {r['per_worker_ips']:.0f} | {r['plain_ips']:.0f} | {r['ratio']:.0%} | "
            f"{r['peak_rss_per_process_mib']:.0f} ({r['rss_self_mib']:.0f} / {r['rss_worker_mib']:.0f}) | "
            f"{r['peak_tree_pss_mib']:.0f} | {r['other_cpu']:.2f} |")
    lines += ["\n## Sets\n", "| set | train / val | files MiB | generated in s | packed in s | pack MiB |",
              "|---:|---|---:|---:|---:|---:|"]
    for s in res["sets"]:
        gen = "reused" if s["reused"] else f"{s['seconds']:.0f}"
        packed = "" if s.get("pack_seconds") is None else f"{s['pack_seconds']:.0f}"
        packed = "reused" if s.get("pack_bytes") and not packed else packed
        size = f"{s['pack_bytes'] / 2**20:.0f}" if s.get("pack_bytes") else ""
        lines.append(f"| {s['images']:,} {s.get('kind', '')} | {s['train']:,} / {s['val']:,} | "
                     f"{s['bytes'] / 2**20:.0f} | {gen} | "
                     f"{packed} | {size} |")
    lines += ["\n## The issue's targets\n", *checks(res)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main

def count_split(root: Path) -> tuple[int, int]:
    return tuple(sum(len(files) for _, _, files in os.walk(root / s)) for s in ("train", "val"))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="set sizes (images, train + val)")
    p.add_argument("--small", action="store_true", help="~64 px JPEGs (fast to make: 100k in a minute or two)")
    p.add_argument("--photo-sizes", type=int, nargs="*", default=[], help="more sets, photo-like whatever --small "
                   "says, measured the same way (the loader-vs-plain-loop ratio on realistic files)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="packed is left out (with a note) when tl.pack/tl.data.packs are missing")
    p.add_argument("--workers", type=int, nargs="+", default=[-1], help="DataLoader workers per process to "
                   "measure; -1: tl's default (memory 0, stream and packed the usable cores)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224, help="train crop (tl's --image-size)")
    p.add_argument("--max-loader-images", type=int, default=0, help="stop the loader pass after this many "
                   "images (0: the whole epoch)")
    p.add_argument("--plain-images", type=int, default=3000, help="plain loop: at most this many images ...")
    p.add_argument("--plain-seconds", type=float, default=6.0, help="... and about this many seconds")
    p.add_argument("--two-proc", type=int, nargs="*", default=None, help="set sizes for the 2-process stream "
                   "variant (default: the largest; none: pass the flag alone)")
    p.add_argument("--max-wait", type=float, default=120, help="seconds to wait before each row for other work on "
                   "the machine to stop (0: don't wait)")
    p.add_argument("--retries", type=int, default=1, help="measure a row again (keeping the least disturbed) when "
                   "other work used more than --max-other-cpu cores during it")
    p.add_argument("--max-other-cpu", type=float, default=0.15)
    p.add_argument("--work-dir", default="/tmp/tl-bench-data", help="generated sets, packs and logs")
    p.add_argument("--out", help="where results-data.md/.json go (default: bench/, or --work-dir with --quick)")
    p.add_argument("--generate-only", action="store_true", help="make (or reuse) the sets, measure nothing")
    p.add_argument("--quick", action="store_true", help="a tiny run in seconds: 240 small images, short loops")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return
    if args.quick:
        args.sizes, args.small, args.classes, args.plain_images, args.plain_seconds = [200], True, 4, 100, 0.5
        args.image_size, args.photo_sizes, args.max_wait, args.retries = 64, [], 0, 0
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or (work if args.quick else BENCH))
    two_proc = [max(args.sizes)] if args.two_proc is None else args.two_proc
    has_packed, note = packed_available()
    modes = [m for m in args.modes if m != "packed" or has_packed]
    if "packed" in args.modes and not has_packed:
        note = f"skipped: {note}"
        print(f"packed mode {note}", flush=True)
    res = {"machine": machine_info(), "args": vars(args), "packed_note": note, "sets": [], "rows": []}
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    for n, small in [(n, args.small) for n in args.sizes] + [(n, False) for n in args.photo_sizes]:
        kind = "small" if small else "photo"
        root = set_dir(work, n, small, args.classes, args.seed)
        made = generate(root, n, args.classes, args.seed, small, args.val_fraction)
        train, val = count_split(root)
        info = {**made, "kind": kind, "root": str(root), "train": train, "val": val, "bytes": tree_bytes(root)}
        how = "reused" if made["reused"] else f"made in {made['seconds']:.0f} s"
        print(f"set {root}: {train} train / {val} val, {info['bytes'] / 2**20:.0f} MiB ({how})", flush=True)
        res["sets"].append(info)
        if args.generate_only:
            continue
        pack = work / f"{root.name}.pack"
        if "packed" in modes:
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "tl.pack", str(root), str(pack)], cwd=ROOT,
                               capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"python -m tl.pack failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
            already = "already packed" in (r.stdout + r.stderr)
            info["pack_seconds"] = None if already else time.perf_counter() - t0
            info["pack_bytes"] = dir_bytes(pack)
        base = {"root": str(root), "pack": str(pack), "batch_size": args.batch_size, "image_size": args.image_size,
                "max_loader_images": args.max_loader_images, "plain_images": args.plain_images,
                "plain_seconds": args.plain_seconds}
        if "packed" in modes:
            info["crc"] = crc_cost(pack, 2000 if not args.quick else 100)
            c = info["crc"]
            print(f"{kind}{n} packed CRC-32: {c['crc_us']:.1f} us an image, {c['cost']:.2%} of reading and decoding "
                  f"it ({c['read_decode_us']:.0f} us)", flush=True)
        for mode in modes:
            for workers in args.workers if mode != "memory" else [-1]:  # memory: tl's default (no workers)
                name = f"{kind}{n}-{mode}-w{workers}"
                print(f"{name} ...", end=" ", flush=True)
                r, = least_disturbed(lambda cfg={**base, "mode": mode, "workers": workers}, name=name:
                                     [measure(cfg, name, logs / f"{name}.log")], args)
                res["rows"].append({"set_images": n, "kind": kind, **r})
                print(f"start-up {r['startup_s']:.1f} s, {r['loader_ips']:.0f} img/s ({r['workers']} workers, "
                      f"{r['ratio']:.0%} of the plain loop per worker), RSS {r['peak_rss_per_process_mib']:.0f} MiB",
                      flush=True)
        if n in two_proc and small == args.small and "stream" in modes:
            name = f"{kind}{n}-stream-2procs"
            print(f"{name} ...", end=" ", flush=True)
            ranks = least_disturbed(lambda cfg={**base, "mode": "stream", "workers": -1}, name=name: measure_ranks(
                cfg, 2, name, [logs / f"{name}-rank{r}.log" for r in range(2)]), args)
            res["rows"] += [{"set_images": n, "kind": kind, **r} for r in ranks]
            print(", ".join(f"rank {r['rank']}: RSS {r['peak_rss_per_process_mib']:.0f} MiB" for r in ranks),
                  flush=True)
    if args.generate_only:
        return
    table = report(res)
    print("\n" + table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results-data.md").write_text(table)
    (out / "results-data.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out / 'results-data.md'} and results-data.json")


if __name__ == "__main__":
    main()
