"""Large backbones: memory and speed of a training step of a timm ViT, full finetune with and without
--grad-checkpointing (tl's own set_grad_checkpointing), one fresh process per configuration.

    .venv/bin/python bench/large.py [--model vit_small_patch16_224] [--image-size 224] [--batch-size 8]
                                    [--steps 8] [--out bench/] [--quick]

Each configuration is a fresh Python (its peak RSS its own): the model built as tl builds it (random
weights, a new 2-class head), tl's optimizer groups and SGD, bf16 autocast where the CPU has it (tl's
default), warm-up steps, then timed steps on random tensors already in memory (no data pipeline).
*activations*: the bytes the forward pass keeps for the backward pass, counted exactly with
torch.autograd.graph.saved_tensors_hooks over one forward (each storage once); with checkpointing only what
the blocks' boundaries keep. *peak RSS* is the process's, for scale (the allocator keeps freed pages, so RSS
differences do not measure activations). Targets (issue #29): checkpointing cuts activation memory by at
least 40% at <= 40% more time per step.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
CONFIGS = {"finetune": [], "finetune + --grad-checkpointing": ["grad_checkpointing"]}


def child(cfg: dict) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from tl.core.config import parse_args
    from tl.model.network import build_model, set_grad_checkpointing
    from tl.train.loop import cpu_has_bf16
    from tl.train.optim import build_optimizer, param_groups

    torch.manual_seed(0)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    name = f"timm/{cfg['model']}"
    model, head = build_model(name, "none", 2, "finetune")
    if "grad_checkpointing" in cfg["flags"]:
        set_grad_checkpointing(model, name, head)
    train_cfg = parse_args(["--model", name])
    optimizer = build_optimizer(param_groups(model, model.get_submodule(head), train_cfg), train_cfg)
    x = torch.randn(cfg["batch_size"], 3, cfg["image_size"], cfg["image_size"])
    y = torch.randint(0, 2, (cfg["batch_size"],))
    bf16 = cpu_has_bf16()
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=False)  # the gradients stay allocated: part of the baseline
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}  # weights a layer saves are not extra
    activations = sum(n for ptr, n in saved.items() if ptr not in params) / 2**20
    t0 = time.perf_counter()
    for _ in range(cfg["steps"]):
        step()
    seconds = (time.perf_counter() - t0) / cfg["steps"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_s": seconds, "images_per_s": cfg["batch_size"] / seconds, "peak_rss_mib": peak,
            "activations_mib": activations, "bf16": bf16,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def measure(cfg: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True,
                       cwd=ROOT)
    if r.returncode:
        sys.exit(f"bench/large.py child failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def report(res: dict) -> str:
    a = res["args"]
    lines = [f"# Large backbones: a training step of timm {a['model']}\n",
             f"{res['machine']}; Python {platform.python_version()}; {res['date']}. Batch {a['batch_size']}, "
             f"{a['image_size']} px, SGD, bf16 autocast: {res['rows'][0]['bf16']}, {a['steps']} timed steps after 2 "
             "warm-up steps, random tensors in memory, one fresh process per row (bench/large.py).\n",
             "| configuration | trainable params | s/step | img/s | peak RSS MiB | activations MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['name']} | {r['trainable']:,} | {r['step_s']:.2f} | {r['images_per_s']:.1f} | "
                     f"{r['peak_rss_mib']:.0f} | {r['activations_mib']:.0f} |")
    full, ckpt = res["rows"][0], res["rows"][1]
    saved = 1 - ckpt["activations_mib"] / full["activations_mib"]
    slower = ckpt["step_s"] / full["step_s"] - 1
    ok = {True: "**holds**", False: "**fails**"}
    lines += ["", "## Targets\n",
              f"- --grad-checkpointing cuts activation memory by {saved:.0%} (>= 40%: {ok[saved >= 0.4]}) at "
              f"{slower:+.0%} time per step (<= 40%: {ok[slower <= 0.4]})."]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", default=str(BENCH), help="where results-large.md/.json go")
    p.add_argument("--quick", action="store_true", help="timm's test_vit at 160 px, 2 steps: a smoke test")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return
    if args.quick:
        args.model, args.image_size, args.steps = "test_vit", 160, 2
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    res = {"machine": f"{cpu}, {len(os.sched_getaffinity(0))} cores", "args": vars(args), "rows": [],
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    for name, flags in CONFIGS.items():
        print(f"{name} ...", end=" ", flush=True)
        row = measure({"model": args.model, "image_size": args.image_size, "batch_size": args.batch_size,
                       "steps": args.steps, "flags": flags})
        res["rows"].append({"name": name, **row})
        print(f"{row['step_s']:.2f} s/step, peak RSS {row['peak_rss_mib']:.0f} MiB, activations "
              f"{row['activations_mib']:.0f} MiB", flush=True)
    text = report(res)
    print("\n" + text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results-large.md").write_text(text)
    (out / "results-large.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out / 'results-large.md'}")


if __name__ == "__main__":
    main()
