"""The data and GPU benchmarks run (tiny, on the CPU), and tl's train loop makes no host sync per step."""

import json
import math
import sys

import pytest
import torch
from accelerate import Accelerator
from conftest import ROOT, run_cli
from torch import nn

from tl.core.stop import Stopper
from tl.train.loop import AGREE_EVERY, train_epoch

sys.path.insert(0, str(ROOT / "bench"))
import data as bench_data  # noqa: E402  (bench/data.py)

SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")


@pytest.mark.slow
def test_data_bench_quick_writes_its_results(tmp_path):
    out = tmp_path / "out"
    r = run_cli("bench/data.py", "--quick", "--work-dir", str(tmp_path / "work"), "--out", str(out), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "## The issue's targets" in (out / "results-data.md").read_text()
    res = json.loads((out / "results-data.json").read_text())
    modes = {row["mode"] for row in res["rows"] if row["world"] == 1}
    assert {"memory", "stream"} <= modes
    assert ("packed" in modes) == ("skipped" not in res["packed_note"])
    ranks = [row for row in res["rows"] if row["world"] == 2]
    assert sorted(row["rank"] for row in ranks) == [0, 1]
    assert sum(row["shard_images"] for row in ranks) >= ranks[0]["train_images"]  # the two shards cover the set
    for row in res["rows"]:
        assert row["loader_images"] > 0 and row["plain_ips"] > 0 and row["peak_rss_per_process_mib"] > 0
        assert 0 < row["imports_s"] <= row["startup_s"]
    # A second run reuses the generated set (its marker) instead of writing it again.
    again = bench_data.generate(tmp_path / "work" / "synth-small-200-k4-s0", 200, 4, 0, True, 0.1, progress=False)
    assert again["reused"]


@pytest.mark.slow
def test_gpu_bench_cpu_smoke_writes_its_results(tmp_path):
    out = tmp_path / "out"
    r = run_cli("bench/gpu.py", "--cpu-smoke", "--work-dir", str(tmp_path / "work"), "--out", str(out), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Host syncs" in (out / "results-gpu.md").read_text()
    res = json.loads((out / "results-gpu.json").read_text())
    assert set(res["results"]) == {"bare", "loop", "train_py", "tutorial"}, res["skipped"]
    syncs = res["results"]["loop"]["syncs"]
    assert 1 <= syncs["tensor_calls"] <= syncs["expected_at_most"], syncs


def test_generator_is_deterministic_and_splits_every_class(tmp_path):
    a = bench_data.generate(tmp_path / "a", 40, 2, 7, True, 0.25, workers=1, progress=False)
    bench_data.generate(tmp_path / "b", 40, 2, 7, True, 0.25, workers=2, progress=False)
    assert not a["reused"]
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    assert len(files) == 40 and {f.parts[0] for f in files} == {"train", "val"}
    assert {f.parts[1] for f in files if f.parts[0] == "val"} == {"c000", "c001"}
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_checks_name_each_target():
    def row(n, mode, startup, rss, world=1, rank=0, ratio=0.9):
        return {"set_images": n, "kind": "small", "mode": mode, "world": world, "rank": rank, "workers": 1,
                "startup_s": startup, "data_startup_s": startup - 2, "peak_rss_per_process_mib": rss,
                "peak_tree_pss_mib": rss, "per_worker_ips": 900 * ratio, "plain_ips": 900, "ratio": ratio}

    res = {"args": {"small": True}, "rows": [
        row(1000, "stream", 2.5, 900), row(100000, "stream", 12.0, 1000, ratio=0.5),
        row(100000, "stream", 12.0, 990, world=2, rank=0), row(100000, "stream", 12.0, 995, world=2, rank=1)]}
    text = "\n".join(bench_data.checks(res))
    assert "< 30 s **holds**, <= 1.5x **fails**" in text
    assert "<= 1.3x **holds**" in text
    assert "(50%): >= 80% **fails**" in text
    assert "about one process's (<= 1.1x) **holds**" in text


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_train_epoch_makes_no_host_sync_per_step(monkeypatch):
    """The issue's requirement: on the CPU, the loop performs no .item()/.cpu() per step; only the
    processes' agreement every AGREE_EVERY steps and the epoch's totals read values back."""
    steps = 40
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=g),
                torch.randint(0, 3, (2,), generator=g)) for _ in range(steps)]
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = Tiny()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.01))
    stopper = Stopper()
    stopper.defer(accelerator)
    calls = []
    for name in SYNC_METHODS:
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda t, *a, _name=name, _orig=original, **k: calls.append(_name) or _orig(t, *a, **k))
    try:
        loss, acc, n = train_epoch(model, batches, optimizer, accelerator, stopper, 1, 1)
    finally:
        monkeypatch.undo()
        stopper.restore()
    assert n == 2 * steps and math.isfinite(loss) and 0 <= acc <= 1
    assert 1 <= len(calls) <= math.ceil(steps / AGREE_EVERY) + 2, calls


def test_large_bench_quick_measures_checkpointing(tmp_path):
    r = run_cli("bench/large.py", "--quick", "--out", str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "results-large.json").read_text())
    full, ckpt, lora, lora_ckpt = res["rows"]
    assert [r["name"] for r in res["rows"]] == ["finetune", "finetune + --grad-checkpointing", "lora",
                                                "lora + --grad-checkpointing"]
    assert 0 < ckpt["activations_mib"] < full["activations_mib"] and full["trainable"] == ckpt["trainable"]
    assert 0 < lora_ckpt["activations_mib"] < lora["activations_mib"]
    assert lora["trainable"] < full["trainable"] and lora["checkpoint_bytes"] < full["checkpoint_bytes"]
    assert 0 < lora["optimizer_state_mib"] < full["optimizer_state_mib"]
    ddp, sharded = res["sharded"]
    held = [r["parameters_mib"] + r["gradients_mib"] + r["optimizer_state_mib"] for r in (ddp, sharded)]
    assert (ddp["name"], sharded["name"]) == ("DDP", "--shard-model") and 0 < held[1] < 0.65 * held[0]
    text = (tmp_path / "results-large.md").read_text()
    assert "finetune: --grad-checkpointing cuts activation memory by" in text and "lora trains" in text
