"""The bare model's speed: ResNet-18 on random tensors already in memory, no data pipeline.

Three figures in images/s, warm-up iterations excluded, each the median of 5 timed stretches:
- train: forward + backward + SGD step of the whole network (finetune);
- frozen: backbone frozen and in eval mode, only the new head trains (tl's feature-extract);
- inference: forward under torch.inference_mode, model in eval mode.
Precision `fp32`, or `bf16` the way tl runs on a CPU: torch.autocast("cpu", torch.bfloat16) with
model and input in channels_last. A training loop's images/s divided by these is its pipeline
efficiency (what the data loading, bookkeeping and logging cost).

    python bench/bare_model.py --batch-size 4 --precision bf16 --image-size 224 --json out.json
"""

import argparse
import contextlib
import itertools
import json
import statistics
import time

import torch
import torchvision
from torch import nn


def images_per_s(step, batch_size: int, warmup: int, seconds: float, repeats: int = 5) -> float:
    """Median of `repeats` timed stretches of seconds/repeats each (at least 2 steps): the model's
    typical speed here, as a training loop's average over an epoch sees it, robust to short bursts
    of other work on a shared machine."""
    for _ in range(warmup):  # the first ~10 steps pick kernels and allocate: not steady state
        step()
    speeds = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while n < 2 or time.perf_counter() - t0 < seconds / repeats:
            step()
            n += 1
        speeds.append(n * batch_size / (time.perf_counter() - t0))
    return statistics.median(speeds)


def measure(batch_size: int, precision: str, image_size: int = 224, warmup: int = 10, seconds: float = 10.0,
            num_classes: int = 2) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    # A few different batches in turn: one batch over and over is soon fitted, and the near-zero
    # gradients that follow (denormals) make steps slower than in real training.
    memory_format = torch.channels_last if precision == "bf16" else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    batches = [(torch.randn(batch_size, 3, image_size, image_size).contiguous(memory_format=memory_format),
                torch.randint(num_classes, (batch_size,))) for _ in range(8)]
    batch = itertools.cycle(batches).__next__

    def autocast():
        return torch.autocast("cpu", torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def train_step(optimizer):
        def step():
            x, y = batch()
            with autocast():
                loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    def infer_step():
        with torch.inference_mode(), autocast():
            model(batch()[0])

    kw = dict(batch_size=batch_size, warmup=warmup, seconds=seconds)
    result = {"batch_size": batch_size, "precision": precision, "image_size": image_size,
              "threads": torch.get_num_threads()}
    model.train()
    result["train"] = images_per_s(train_step(torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)), **kw)
    model.eval()
    result["inference"] = images_per_s(infer_step, **kw)
    model.requires_grad_(False)  # frozen backbone as in tl's feature-extract: eval mode, head-only backward
    model.fc.requires_grad_(True)
    result["frozen"] = images_per_s(train_step(torch.optim.SGD(model.fc.parameters(), lr=1e-3, momentum=0.9)), **kw)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[4])
    parser.add_argument("--precision", choices=("fp32", "bf16"), nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--image-size", type=int, default=224, help="input side in pixels")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per figure (median of 5 stretches)")
    parser.add_argument("--json", help="write the results here as a JSON list")
    args = parser.parse_args()
    results = []
    for precision in args.precision:
        for bs in args.batch_size:
            r = measure(bs, precision, args.image_size, seconds=args.seconds)
            print(f"{precision:>4} batch {bs:>3}, {args.image_size} px: train {r['train']:6.1f}  "
                  f"frozen {r['frozen']:6.1f}  inference {r['inference']:6.1f} images/s", flush=True)
            results.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
