"""tl on a GPU: training images/s against the bare model, the tutorial's loop against tl, host syncs per step.

For a lent GPU machine, at most about 8 minutes on one GPU (`make bench-gpu`); writes results-gpu.md
and results-gpu.json (bench/ by default, --out elsewhere). Sections, each in budget order:

1. bare: ResNet-18 fwd+bwd+SGD on random tensors already on the GPU (batch 256, bf16 autocast,
   channels_last), the ceiling for any loop;
2. tl loop: tl.train.loop.train_epoch on tl's memory-mode path (tl.data.loaders.ImageSet of uint8 images of
   decoded-train size, tl.data.loaders.make_loaders, on CUDA tl.data.augment's padded collate + DeviceAugment),
   steady-state epoch; and the same loop on batches collated in advance (loader cost removed),
   which splits what the loop costs from what the loader costs;
3. host syncs per step in that steady-state epoch: on CUDA counted by
   torch.cuda.set_sync_debug_mode("warn") (each synchronizing call warns), on any device by
   wrapping Tensor.item/.tolist/.cpu/.numpy/__bool__/__int__/__float__; the DataLoader's own work
   (CPU-side collate, crop parameters) is not counted. tl agrees every 16 steps: expect about
   steps/16 + 1;
4. tl's train.py end to end on a generated photo-like ImageFolder (bench/data.py), batch 256, bf16;
5. bench/tutorial.py against tl's train.py on hymenoptera (../shared/data/hymenoptera_data.zip, or
   --hymenoptera-zip), a few epochs each, when the zip is there.

`--cpu-smoke` runs every section on the CPU, tiny-sized, in well under a minute (no CUDA needed):
a check that the code paths work, not figures to quote.

    .venv/bin/python bench/gpu.py                 # on a GPU machine (make bench-gpu)
    .venv/bin/python bench/gpu.py --cpu-smoke     # anywhere
"""

import argparse
import contextlib
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(BENCH))  # bench/data.py (the generator) and bench/bench.py (the tutorial runner)


# --------------------------------------------------------------------------- host-sync counting

SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")


class SyncCounter:
    """Counts host syncs while active and not paused: calls of the Tensor methods that read values
    back to the host (any device), and on CUDA the warnings of set_sync_debug_mode("warn").
    `calls` holds per-method counts, `cuda` the CUDA warnings."""

    def __init__(self, cuda: bool = False):
        self.cuda, self.calls, self.cuda_syncs, self.paused_depth = cuda, {}, 0, 0
        self.where: dict[str, int] = {}  # "file:line (function)" of the caller outside torch -> count
        self._saved = {}

    def _note(self, name: str | None):
        import traceback
        frames = [f for f in traceback.extract_stack()[:-2] if f.filename != __file__
                  and "/torch/" not in f.filename and "/accelerate/" not in f.filename]
        if frames:
            f = frames[-1]
            key = f"{name or 'cuda sync'} at {Path(f.filename).name}:{f.lineno} ({f.name})"
            self.where[key] = self.where.get(key, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    @contextlib.contextmanager
    def paused(self):
        self.paused_depth += 1
        try:
            yield
        finally:
            self.paused_depth -= 1

    def _wrap(self, name):
        import torch
        original = getattr(torch.Tensor, name)

        def wrapper(t, *a, **k):
            if not self.paused_depth:
                self.calls[name] = self.calls.get(name, 0) + 1
                self._note(name)
            return original(t, *a, **k)

        self._saved[name] = (name in torch.Tensor.__dict__, original)
        setattr(torch.Tensor, name, wrapper)

    def __enter__(self):
        import torch
        for name in SYNC_METHODS:
            self._wrap(name)
        if self.cuda:
            self._warnings = warnings.catch_warnings()
            self._warnings.__enter__()
            warnings.simplefilter("always")
            previous = warnings.showwarning

            def show(message, category, *a, **k):
                if "synchroniz" in str(message):
                    if not self.paused_depth:
                        self.cuda_syncs += 1
                        self._note(None)
                    return None
                return previous(message, category, *a, **k)

            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        import torch
        if self.cuda:
            torch.cuda.set_sync_debug_mode(0)
            self._warnings.__exit__(*exc)
        for name, (own, original) in self._saved.items():
            if own:
                setattr(torch.Tensor, name, original)
            else:
                delattr(torch.Tensor, name)
        return False


class PausedLoader:
    """A loader whose batch fetching is not counted (collate and CPU augmentation read values on the
    host by design, in workers or not); the training step's work between fetches is."""

    def __init__(self, loader, counter: SyncCounter):
        self.loader, self.counter = loader, counter

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        with self.counter.paused():
            it = iter(self.loader)
        while True:
            with self.counter.paused():
                try:
                    batch = next(it)
                except StopIteration:
                    return
            yield batch


# --------------------------------------------------------------------------- tl's loop in this process

def synthetic_split(n: int, classes: int, short_side: tuple[int, int], seed: int = 0):
    """A tl.data.splits.Split of random uint8 CHW images of the size tl.data.preprocess.decode keeps for train images
    (short side up to 2x the crop, 4:3 or 3:4), as memory mode holds them."""
    import torch

    from tl.data.splits import Split
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i in range(n):
        s = int(torch.randint(short_side[0], short_side[1] + 1, (), generator=g))
        long = s * 4 // 3
        h, w = (s, long) if i % 3 else (long, s)
        images.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g))
        targets.append(i % classes)
    return Split(images, targets, [f"synthetic/{i}" for i in range(n)])


def make_tl_loop(device: str, batch_size: int, crop: int, steps: int, short_side, classes: int = 10,
                 workers: int = 0, precision: str = "bf16", augment: str = "auto"):
    """Everything tl.train.setup.setup builds for finetune in memory mode, on synthetic images: the
    accelerator, the prepared model and optimizer, the loader, the device augmentation, a Stopper."""
    import torch
    from accelerate import Accelerator

    from tl.core.stop import Stopper
    from tl.data.augment import DeviceAugment
    from tl.data.augment import collate as padded_batches
    from tl.data.loaders import ImageSet, make_loaders
    from tl.data.preprocess import Preprocess, train_transform
    from tl.model.network import build_model

    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=precision)
    torch.backends.cudnn.benchmark = True
    on_device = (augment == "device") or (augment == "auto" and accelerator.device.type == "cuda")
    torch.manual_seed(0)
    model, _ = build_model("resnet18", "none", classes, "finetune")
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    split = synthetic_split(batch_size * steps, classes, short_side)
    train_set = ImageSet(split, None if on_device else train_transform(Preprocess.tutorial(crop)), seed=0)
    loader, sampler, _ = make_loaders(train_set, ImageSet(split), batch_size, workers, 0, accelerator.process_index,
                                      accelerator.num_processes, True, padded_batches if on_device else None)
    net, optimizer = accelerator.prepare(model, optimizer)
    augment_fn = DeviceAugment(crop, accelerator.device, 0, accelerator.process_index) if on_device else None
    stopper = Stopper()
    stopper.defer(accelerator)
    return SimpleNamespace(accelerator=accelerator, net=net, optimizer=optimizer, loader=loader, sampler=sampler,
                           train_set=train_set, augment=augment_fn, stopper=stopper, on_device=on_device)


def run_tl_epoch(s, epoch: int, loader=None, counter: SyncCounter | None = None) -> tuple[float, int]:
    """One tl.train.loop.train_epoch; returns (seconds, images). Its result's .tolist() waits for the device."""
    from tl.train.loop import train_epoch

    s.sampler.set_epoch(epoch)
    s.train_set.set_epoch(epoch)
    if s.augment:
        s.augment.set_epoch(epoch)
    s.net.train()
    loader = loader if loader is not None else s.loader
    if counter is not None:
        loader = PausedLoader(loader, counter)
    t0 = time.perf_counter()
    _, _, n = train_epoch(s.net, loader, s.optimizer, s.accelerator, s.stopper, epoch, epoch + 10, s.augment)
    return time.perf_counter() - t0, n


def count_syncs(s, epoch: int, cuda: bool) -> dict:
    """Host syncs during one steady-state train_epoch (the DataLoader's fetching excluded)."""
    steps = len(s.loader)
    with SyncCounter(cuda=cuda) as counter:
        run_tl_epoch(s, epoch, counter=counter)
    from tl.train.loop import AGREE_EVERY
    return {"steps": steps, "tensor_calls": counter.total, "calls": counter.calls, "where": counter.where,
            "cuda_sync_warnings": counter.cuda_syncs if cuda else None,
            "expected_at_most": math.ceil(steps / AGREE_EVERY) + 2}


def section_loop(cfg, device: str) -> dict:
    import torch
    s = make_tl_loop(device, cfg.batch_size, cfg.crop, cfg.steps, cfg.short_side)
    try:
        run_tl_epoch(s, 1)  # warm-up: kernel selection (cudnn.benchmark), allocator
        seconds, n = run_tl_epoch(s, 2)
        # The same steps on batches collated in advance: the loop and the model without the loader.
        s.sampler.set_epoch(3)
        s.train_set.set_epoch(3)
        batches = list(s.loader)
        if device == "cuda":
            torch.cuda.synchronize()
        pre_seconds, pre_n = run_tl_epoch(s, 3, loader=batches)
        del batches
        syncs = count_syncs(s, 4, cuda=device == "cuda")
        ordinary = count_syncs(s, 5, cuda=False) if device == "cuda" else syncs
    finally:
        s.stopper.restore()
    return {"images_per_s": n / seconds, "prebatched_images_per_s": pre_n / pre_seconds, "images": n,
            "steps": len(s.loader), "device_augment": s.on_device, "precision": s.accelerator.mixed_precision,
            "syncs": syncs, "syncs_tensor_calls": ordinary}


# --------------------------------------------------------------------------- bare model

def section_bare(cfg, device: str) -> dict:
    """ResNet-18 fwd+bwd+SGD on tensors already on the device: bf16 autocast, channels_last."""
    import torch
    import torchvision
    from torch import nn

    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    model = torchvision.models.resnet18()
    model.fc = nn.Linear(model.fc.in_features, 10)
    model = model.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    batches = [(torch.randn(cfg.batch_size, 3, cfg.crop, cfg.crop, device=device)
                .contiguous(memory_format=torch.channels_last),
                torch.randint(10, (cfg.batch_size,), device=device)) for _ in range(4)]
    batch = itertools.cycle(batches).__next__

    def step():
        x, y = batch()
        with torch.autocast(device, torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(cfg.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(cfg.bare_steps):
        step()
    sync()
    seconds = time.perf_counter() - t0
    return {"images_per_s": cfg.bare_steps * cfg.batch_size / seconds, "steps": cfg.bare_steps}


# --------------------------------------------------------------------------- train.py and the tutorial

def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def section_train_py(cfg, work: Path) -> dict:
    """tl's train.py end to end on a generated ImageFolder; train images/s of the epochs after the first."""
    from data import generate

    root = work / f"synth-{'small' if cfg.small else 'photo'}-{cfg.set_images}"
    made = generate(root, cfg.set_images, cfg.classes, 0, cfg.small, cfg.val_fraction, progress=False)
    out = work / "tl-train-py"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "train.py", "--data-dir", str(root), "--output-dir", str(out), "--weights", "none",
           "--epochs", str(cfg.train_epochs), "--batch-size", str(cfg.batch_size), "--image-size", str(cfg.crop),
           "--precision", "bf16", "--wandb", "disabled", "--data-mode", "memory"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    (work / "tl-train-py.log").write_text(r.stdout + r.stderr)
    if r.returncode:
        raise RuntimeError(f"train.py failed (exit {r.returncode}): {(r.stdout + r.stderr)[-2000:]}")
    rows = read_metrics(out)
    steady = rows[1:] or rows
    return {"wall_s": wall, "set_images": cfg.set_images, "generated_s": made["seconds"],
            "images_per_s": sum(x["train_images"] for x in steady) / sum(
                x["train_images"] / x["train_images_per_s"] for x in steady),
            "epoch_images_per_s": [x["train_images_per_s"] for x in rows], "command": " ".join(cmd[1:])}


def base_weights(work: Path) -> str:
    proxy = SHARED / "weights" / "resnet18-catsdogs-proxy.pth"
    if proxy.is_file():
        return str(proxy)
    import torch
    import torchvision
    path = work / "resnet18-random.pth"
    if not path.is_file():
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18().state_dict(), path)
    return str(path)


def section_tutorial(cfg, work: Path, data_dir: str) -> dict:
    """bench/tutorial.py against tl's train.py (tl's defaults), same data and initial weights,
    measured as bench/bench.py measures them."""
    import bench as full

    args = SimpleNamespace(data_dir=data_dir, weights=base_weights(work), epochs=cfg.tutorial_epochs,
                           tl_args="--wandb disabled" + cfg.tl_extra, variant=[], tl_root=str(ROOT))
    out = {}
    for side, run in (("tutorial", full.run_tutorial), ("tl", full.run_tl)):
        r = run("finetune", 0, args, work)
        out[side] = {k: r[k] for k in ("wall_s", "s_per_epoch", "train_images_per_s", "best_val_acc", "batch_size",
                                        "precision", "peak_rss_mib")}
    out["data_dir"], out["epochs"], out["weights"] = data_dir, cfg.tutorial_epochs, args.weights
    return out


def hymenoptera(zip_path: Path, work: Path) -> str | None:
    import zipfile
    target = work / "hymenoptera_data"
    if target.is_dir():
        return str(target)
    if not zip_path.is_file():
        return None
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(work)
    return str(target)


# --------------------------------------------------------------------------- report

def report(res: dict) -> str:
    m, a, r = res["machine"], res["args"], res["results"]
    lines = ["# tl on a GPU: images/s against the bare model, the tutorial's loop, host syncs\n",
             f"{m['device']}; {m['cpu_cores']} CPU cores; torch {m['torch']}; tl {m['tl_commit']}; {m['date']}; "
             f"{'CPU SMOKE RUN (tiny sizes): not figures to quote' if a['cpu_smoke'] else 'one GPU'}; "
             f"{res['seconds']:.0f} s in all.\n"]
    if "bare" in r and "loop" in r:
        b, lp = r["bare"], r["loop"]
        lines += [f"## Training images/s, ResNet-18, batch {a['batch_size']}, {a['crop']} px, bf16, channels_last\n",
                  "| what | images/s | of the bare model |", "|---|---:|---:|",
                  f"| bare model (random tensors on the device, {b['steps']} steps) | {b['images_per_s']:.0f} | 100% |",
                  f"| tl.train.loop.train_epoch, tl's memory-mode loader "
                  f"({'device' if lp['device_augment'] else 'CPU'} "
                  f"augmentation, {lp['steps']} steps, steady state) | {lp['images_per_s']:.0f} | "
                  f"{lp['images_per_s'] / b['images_per_s']:.0%} |",
                  f"| tl.train.loop.train_epoch on batches collated in advance (no loader) | "
                  f"{lp['prebatched_images_per_s']:.0f} | {lp['prebatched_images_per_s'] / b['images_per_s']:.0%} |"]
        if "train_py" in r:
            t = r["train_py"]
            lines.append(f"| train.py end to end ({t['set_images']} generated JPEGs, memory mode, epochs after the "
                         f"first) | {t['images_per_s']:.0f} | {t['images_per_s'] / b['images_per_s']:.0%} |")
        lines.append("")
    if "loop" in r:
        sy, plain = r["loop"]["syncs"], r["loop"]["syncs_tensor_calls"]
        cuda = sy["cuda_sync_warnings"]
        where = "; ".join(f"{n}x {k}" for k, n in {**plain["where"], **sy["where"]}.items()) or "none"
        verdict = "as expected" if max(plain["tensor_calls"], cuda or 0) <= sy["expected_at_most"] else \
            "more than expected"
        lines += ["## Host syncs in tl.train.loop.train_epoch, steady state (the DataLoader's fetching excluded)\n",
                  f"{sy['steps']} steps: "
                  + (f"{cuda} synchronizing CUDA calls (set_sync_debug_mode warnings), " if cuda is not None else "")
                  + f"{plain['tensor_calls']} value reads by Tensor methods ({where}); tl agrees every 16 "
                  f"steps and once at the end, so at most {sy['expected_at_most']} are expected: **{verdict}**.\n"]
    if "tutorial" in r:
        t = r["tutorial"]
        lines += [f"## The tutorial's loop against tl, finetune, {t['epochs']} epochs ({t['data_dir']})\n",
                  "| side | batch, precision | wall s | s/epoch | train img/s | best val acc | peak RSS MiB |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for side in ("tutorial", "tl"):
            x = t[side]
            lines.append(f"| {side} | {x['batch_size']}, {x['precision']} | {x['wall_s']:.1f} | "
                         f"{x['s_per_epoch']:.2f} | {x['train_images_per_s']:.1f} | {x['best_val_acc']:.3f} | "
                         f"{x['peak_rss_mib']:.0f} |")
        lines.append(f"| **tl ÷ tutorial** | | **{t['tutorial']['wall_s'] / t['tl']['wall_s']:.2f}x** | "
                     f"**{t['tutorial']['s_per_epoch'] / t['tl']['s_per_epoch']:.2f}x** | "
                     f"**{t['tl']['train_images_per_s'] / t['tutorial']['train_images_per_s']:.2f}x** | | |\n")
    if res["skipped"]:
        lines += ["## Not measured\n", *[f"- {s}" for s in res["skipped"]], ""]
    return "\n".join(lines)


def machine(device: str) -> dict:
    import torch
    git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    return {"device": name, "cpu_cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "tl_commit": git.stdout.strip() or "?", "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="every section on the CPU, tiny: a check, not figures")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=40, help="steps per tl loop epoch (synthetic images: steps x batch)")
    p.add_argument("--bare-steps", type=int, default=50)
    p.add_argument("--train-epochs", type=int, default=3, help="train.py epochs on the generated set")
    p.add_argument("--set-images", type=int, default=5632, help="generated photo-like JPEGs for train.py")
    p.add_argument("--tutorial-epochs", type=int, default=3)
    p.add_argument("--hymenoptera-zip", default=str(SHARED / "data" / "hymenoptera_data.zip"))
    p.add_argument("--budget", type=float, default=480, help="seconds: sections that would start later are skipped")
    p.add_argument("--sections", nargs="+", default=["bare", "loop", "train_py", "tutorial"])
    p.add_argument("--work-dir", default="/tmp/tl-bench-gpu")
    p.add_argument("--out", help="where results-gpu.md/.json go (default: bench/, or --work-dir with --cpu-smoke)")
    a = p.parse_args()
    t_start = time.perf_counter()
    import torch

    cfg = SimpleNamespace(batch_size=a.batch_size, crop=224, steps=a.steps, short_side=(224, 320), warmup=10,
                          bare_steps=a.bare_steps, train_epochs=a.train_epochs, set_images=a.set_images, small=False,
                          tutorial_epochs=a.tutorial_epochs, tl_extra="", classes=10, val_fraction=0.1)
    if a.cpu_smoke:
        device = "cpu"
        cfg = SimpleNamespace(batch_size=4, crop=32, steps=40, short_side=(36, 64), warmup=1, bare_steps=3,
                              train_epochs=2, set_images=40, small=True, tutorial_epochs=1,
                              tl_extra=" --image-size 64 --num-workers 0", classes=2, val_fraction=0.25)
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run this on a GPU machine, or pass --cpu-smoke")
        device = "cuda"
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.out or (work if a.cpu_smoke else BENCH))
    res = {"machine": machine(device), "args": vars(a) | {"crop": cfg.crop, "batch_size": cfg.batch_size},
           "results": {}, "skipped": []}

    def elapsed():
        return time.perf_counter() - t_start

    for section in a.sections:
        if elapsed() > a.budget:
            res["skipped"].append(f"{section}: over the {a.budget:.0f} s budget")
            continue
        t0 = elapsed()
        print(f"{section} ...", end=" ", flush=True)
        if section == "bare":
            r = section_bare(cfg, device)
        elif section == "loop":
            r = section_loop(cfg, device)
        elif section == "train_py":
            r = section_train_py(cfg, work)
        elif section == "tutorial":
            if a.cpu_smoke:  # the tutorial's own set would take minutes on a CPU: a tiny generated one
                from data import generate
                data_dir = work / "synth-smoke-tutorial"
                generate(data_dir, 24, 2, 0, True, 0.34, progress=False)
                data_dir = str(data_dir)
            else:
                data_dir = hymenoptera(Path(a.hymenoptera_zip), work)
            if data_dir is None:
                res["skipped"].append(f"tutorial: {a.hymenoptera_zip} not found (pass --hymenoptera-zip)")
                print("skipped", flush=True)
                continue
            r = section_tutorial(cfg, work, data_dir)
        else:
            sys.exit(f"unknown section {section}")
        res["results"][section] = r
        print(f"{elapsed() - t0:.0f} s", flush=True)
    res["seconds"] = elapsed()
    table = report(res)
    print("\n" + table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results-gpu.md").write_text(table)
    (out / "results-gpu.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(f"wrote {out / 'results-gpu.md'} and results-gpu.json")


if __name__ == "__main__":
    main()
