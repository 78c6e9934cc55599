"""Large backbones: memory and speed of a training step of a timm ViT, full finetune and --mode lora (rank 8,
the default targets), each with and without --grad-checkpointing, one fresh process per configuration; and the
bytes of a lora checkpoint against a full one; and per process, at 2 processes, what --shard-model holds of a
vit_base_patch16_224 against DDP.

    .venv/bin/python bench/large.py [--model vit_small_patch16_224] [--image-size 224] [--batch-size 8]
                                    [--steps 8] [--out bench/] [--quick]

Each configuration is a fresh Python (its peak RSS its own): the model built as tl builds it (random
weights, a new 2-class head), tl's optimizer groups and SGD, bf16 autocast where the CPU has it (tl's
default), warm-up steps, then timed steps on random tensors already in memory (no data pipeline).
*activations*: the bytes the forward pass keeps for the backward pass, counted exactly with
torch.autograd.graph.saved_tensors_hooks over one forward (each storage once); with checkpointing only what
the blocks' boundaries keep. *optimizer state*: the optimizer's tensors after the steps (SGD momentum, one
per trained parameter; AdamW's would be two). *peak RSS* is the process's, for scale (the allocator keeps freed
pages, so RSS differences do not measure activations). *checkpoint*: the safetensors bytes of what the mode
trains (best.safetensors), for the benchmarked model and for vit_base_patch16_224. Targets (issue #29):
checkpointing cuts activation memory by at least 40% at <= 40% more time per step; LoRA trains < 3% of the
parameters, with optimizer state in proportion; its checkpoint is well under 5% of a full one's bytes.
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
CONFIGS = {"finetune": [], "finetune + --grad-checkpointing": ["grad_checkpointing"], "lora": ["lora"],
           "lora + --grad-checkpointing": ["lora", "grad_checkpointing"]}
CHECKPOINT_MODELS = ("vit_base_patch16_224",)  # checkpoint bytes only, besides the benchmarked model
SHARDED_MODEL = "vit_base_patch16_224"  # --shard-model against DDP, at 2 processes


def sharded_child(cfg: dict) -> dict:
    """One process of a 2-process torchrun: the model under DDP (Accelerate's prepare) or sharded
    (tl.train.sharding.shard), AdamW, a few steps; this process's bytes of parameters, gradients and optimizer
    state (its local shards), its peak RSS and the time per step."""
    import torch
    from accelerate import Accelerator

    sys.path.insert(0, str(ROOT))
    from tl.model.network import build_model
    from tl.train.loop import cpu_has_bf16
    from tl.train.sharding import shard

    torch.manual_seed(0)
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16" if cpu_has_bf16() else "no")
    model, head = build_model(f"timm/{cfg['model']}", "none", 2, "finetune")
    if cfg["sharded"]:
        shard(model, head, accelerator)
        optimizer = accelerator.prepare(torch.optim.AdamW(model.parameters(), lr=1e-4))
    else:
        model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    model.train()
    x = torch.randn(cfg["batch_size"], 3, cfg["image_size"], cfg["image_size"])
    y = torch.randint(0, 2, (cfg["batch_size"],))

    def step():
        optimizer.zero_grad(set_to_none=False)
        accelerator.backward(torch.nn.functional.cross_entropy(model(x), y))
        optimizer.step()

    step()
    t0 = time.perf_counter()
    for _ in range(cfg["steps"]):
        step()
    seconds = (time.perf_counter() - t0) / cfg["steps"]

    def local(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = list(model.parameters())
    state = [v for s in optimizer.state_dict()["state"].values() for v in s.values()
             if isinstance(v, torch.Tensor) and v.dim()]
    mib = {"parameters_mib": sum(local(p) for p in params) / 2**20,
           "gradients_mib": sum(local(p.grad) for p in params if p.grad is not None) / 2**20,
           "optimizer_state_mib": sum(local(v) for v in state) / 2**20}
    return mib | {"step_s": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rank": accelerator.process_index}


def measure_sharded(cfg: dict) -> dict:
    """torchrun --nproc_per_node 2 of sharded_child; the main process's figures (the other's are the same size)."""
    torchrun = Path(sys.executable).parent / "torchrun"
    r = subprocess.run([str(torchrun), "--nproc_per_node", "2", __file__, "--sharded-child", json.dumps(cfg)],
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        sys.exit(f"bench/large.py sharded child failed:\n{r.stderr[-3000:]}")
    return json.loads(next(line for line in r.stdout.splitlines() if line.startswith("{")))


def checkpoint_bytes(name: str, mode: str) -> int:
    """The bytes of best.safetensors for a mode: what it trains, as float32 safetensors."""
    import torch
    from safetensors.torch import save

    sys.path.insert(0, str(ROOT))
    from tl.model.lora import add_adapters, default_targets
    from tl.model.network import build_model, trained_part

    torch.manual_seed(0)
    model, head = build_model(f"timm/{name}", "none", 2, mode)
    if mode == "lora":
        add_adapters(model, head, default_targets(model, head), 8, 16)
    return len(save({k: v.contiguous() for k, v in trained_part(model.state_dict(), mode, head).items()}))


def child(cfg: dict) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from tl.core.config import parse_args
    from tl.model.lora import add_adapters, default_targets
    from tl.model.network import build_model, set_grad_checkpointing
    from tl.train.loop import cpu_has_bf16
    from tl.train.optim import build_optimizer, param_groups

    torch.manual_seed(0)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    name = f"timm/{cfg['model']}"
    mode = "lora" if "lora" in cfg["flags"] else "finetune"
    model, head = build_model(name, "none", 2, mode)
    if mode == "lora":
        add_adapters(model, head, default_targets(model, head), 8, 16)
    if "grad_checkpointing" in cfg["flags"]:
        set_grad_checkpointing(model, name, head)
    train_cfg = parse_args(["--model", name, "--mode", mode])
    optimizer = build_optimizer(param_groups(model, model.get_submodule(head), train_cfg), train_cfg)
    x = torch.randn(cfg["batch_size"], 3, cfg["image_size"], cfg["image_size"])
    y = torch.randint(0, 2, (cfg["batch_size"],))
    bf16 = cpu_has_bf16()
    model.train(mode == "finetune")  # as tl's loop: a frozen base stays in eval mode

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
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor)) / 2**20
    return {"step_s": seconds, "images_per_s": cfg["batch_size"] / seconds, "peak_rss_mib": peak,
            "activations_mib": activations, "bf16": bf16, "optimizer_state_mib": state,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "parameters": sum(p.numel() for p in model.parameters()),
            "checkpoint_bytes": checkpoint_bytes(cfg["model"], mode)}


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
             "| configuration | trainable params | s/step | img/s | peak RSS MiB | activations MiB | "
             "optimizer state MiB | checkpoint MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['name']} | {r['trainable']:,} ({r['trainable'] / r['parameters']:.1%}) | "
                     f"{r['step_s']:.2f} | {r['images_per_s']:.1f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['activations_mib']:.0f} | {r['optimizer_state_mib']:.1f} | "
                     f"{r['checkpoint_bytes'] / 2**20:.1f} |")
    lines += ["", f"Sharded against DDP: timm {res['sharded'][0]['model']} (random weights), 2 processes on one core "
              f"each (torchrun, gloo), batch 4 a process, {a['image_size']} px, AdamW, bf16 autocast where the CPU has "
              "it; "
              "figures of the main process (the other holds the same amounts), its local shards counted:\n",
              "| configuration | parameters MiB | gradients MiB | optimizer state MiB | total MiB | s/step | "
              "peak RSS MiB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["sharded"]:
        lines.append(f"| {r['name']} | {r['parameters_mib']:.0f} | {r['gradients_mib']:.0f} | "
                     f"{r['optimizer_state_mib']:.0f} | "
                     f"{r['parameters_mib'] + r['gradients_mib'] + r['optimizer_state_mib']:.0f} | "
                     f"{r['step_s']:.2f} | {r['peak_rss_mib']:.0f} |")
    lines += ["", "Peak RSS includes the whole model each process builds before it shards it (a GPU holds only "
              "the shards: tl moves them after sharding).", ""]
    lines += ["", "Checkpoint bytes of other models (best.safetensors: what the mode trains, float32, 2 classes):\n",
              "| model | finetune MiB | lora MiB | lora / finetune |", "|---|---:|---:|---:|"]
    sizes = {a["model"]: {m: r["checkpoint_bytes"] for r in res["rows"] for m in ("finetune", "lora")
                          if r["name"] == m}} | res["checkpoints"]
    for model, by_mode in sizes.items():
        lines.append(f"| {model} | {by_mode['finetune'] / 2**20:.1f} | {by_mode['lora'] / 2**20:.2f} | "
                     f"{by_mode['lora'] / by_mode['finetune']:.2%} |")
    rows = {r["name"]: r for r in res["rows"]}
    full, ckpt, lora = rows["finetune"], rows["finetune + --grad-checkpointing"], rows["lora"]
    lora_ckpt = rows["lora + --grad-checkpointing"]
    ok = {True: "**holds**", False: "**fails**"}
    lines += ["", "## Targets\n"]
    saved = 1 - ckpt["activations_mib"] / full["activations_mib"]
    slower = ckpt["step_s"] / full["step_s"] - 1
    lines.append(f"- finetune: --grad-checkpointing cuts activation memory by {saved:.0%} (>= 40%: "
                 f"{ok[saved >= 0.4]}) at {slower:+.0%} time per step (<= 40%: {ok[slower <= 0.4]}).")
    saved = 1 - lora_ckpt["activations_mib"] / lora["activations_mib"]
    slower = lora_ckpt["step_s"] / lora["step_s"] - 1
    lines.append(f"- lora: --grad-checkpointing cuts activation memory by {saved:.0%} at {slower:+.0%} time per "
                 "step (not a target: a LoRA step computes no gradients of the frozen weights, so the recomputed "
                 "forward is a larger share of it than of a finetune step).")
    share, state = lora["trainable"] / lora["parameters"], lora["optimizer_state_mib"] / full["optimizer_state_mib"]
    proportional = abs(state - lora["trainable"] / full["trainable"]) < 0.001
    worst = max(by_mode["lora"] / by_mode["finetune"] for by_mode in sizes.values())
    ddp, fsdp = res["sharded"]
    total = {r["name"]: r["parameters_mib"] + r["gradients_mib"] + r["optimizer_state_mib"] for r in res["sharded"]}
    ratio = total["--shard-model"] / total["DDP"]
    lines += [f"- --shard-model at 2 processes ({fsdp['model']}, AdamW): each process holds {ratio:.2f}x of DDP's "
              f"parameters + gradients + optimizer state (<= 0.65x: {ok[ratio <= 0.65]}), at "
              f"{fsdp['step_s'] / ddp['step_s'] - 1:+.0%} time per step."]
    lines += [f"- lora trains {share:.2%} of the parameters (< 3%: {ok[share < 0.03]}); its optimizer state is "
              f"{state:.2%} of finetune's (in proportion to the parameters it trains: {ok[proportional]}).",
              f"- a lora checkpoint is at most {worst:.2%} of a full one's bytes (< 5%: {ok[worst < 0.05]})."]
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
    p.add_argument("--sharded-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return
    if args.sharded_child:
        row = sharded_child(json.loads(args.sharded_child))
        if row["rank"] == 0:  # one line: two ranks printing at once can interleave theirs
            print(json.dumps(row), flush=True)
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
    sharded_model = "test_vit" if args.quick else SHARDED_MODEL
    res["sharded"] = []
    for name, sharded in (("DDP", False), ("--shard-model", True)):
        print(f"{sharded_model}, 2 processes, {name} ...", end=" ", flush=True)
        row = measure_sharded({"model": sharded_model, "image_size": args.image_size, "batch_size": 4,
                               "steps": 2 if args.quick else 3, "sharded": sharded})
        res["sharded"].append({"name": name, "model": sharded_model, **row})
        held = row["parameters_mib"] + row["gradients_mib"] + row["optimizer_state_mib"]
        print(f"{row['step_s']:.2f} s/step, {held:.0f} MiB of parameters, gradients and optimizer state", flush=True)
    res["checkpoints"] = {} if args.quick else \
        {m: {mode: checkpoint_bytes(m, mode) for mode in ("finetune", "lora")} for m in CHECKPOINT_MODELS}
    text = report(res)
    print("\n" + text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results-large.md").write_text(text)
    (out / "results-large.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out / 'results-large.md'}")


if __name__ == "__main__":
    main()
