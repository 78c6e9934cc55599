"""tl.train.targets and the balanced sampler: class weights, MixUp/CutMix with repeated images, the soft-target
loss and its honest accuracy; --sampler balanced is exact at any world size."""

import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, make_imagefolder, one_line_error, run_cli

from tl.data.loaders import PAD, BalancedSampler, ShardSampler
from tl.train.targets import batch_mix, class_weights, loss_and_hits


def test_class_weights_are_inverse_frequency():
    w = class_weights([0, 1, 1, 1, 2, 2], 3)
    assert torch.allclose(w, torch.tensor([2.0, 2 / 3, 1.0]))
    assert torch.equal(class_weights([0, 1, 0, 1], 2), torch.ones(2))


def test_mix_keeps_repeated_images_out_of_the_real_ones_targets():
    torch.manual_seed(0)
    x = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(4)])
    y_host = torch.tensor([1, 0, PAD, PAD])
    mixer = batch_mix(0.8, 0.0, 2, seed=0, rank=0)
    mixed, soft = mixer(x, y_host.clone(), y_host, 1, 1)
    assert soft.shape == (4, 2) and torch.allclose(soft.sum(1), torch.ones(4))
    # The repeats took image 0's pixels (all 0) and label (1), so no pixel of images 2 and 3 (2s and 3s)
    # is mixed in, and images 0 and 3, each mixed with a copy of image 0, keep label 1 whole.
    assert mixed.max() <= 1.0 + 1e-6
    assert torch.equal(soft[0], torch.tensor([0.0, 1.0])) and torch.equal(soft[3], soft[0])
    assert torch.allclose(soft[1], soft[2].flip(0))  # images 0 and 1 mixed both ways
    only_repeats = torch.tensor([PAD, PAD])
    same, none = batch_mix(0.8, 1.0, 2, 0, 0)(x[:2], only_repeats.clone(), only_repeats, 1, 2)
    assert none is None and torch.equal(same, x[:2])


def test_soft_one_hot_targets_give_the_hard_loss_and_hits_ignore_repeats():
    torch.manual_seed(0)
    logits, y = torch.randn(6, 3), torch.tensor([0, 2, 1, 1, PAD, 0])
    weight = torch.tensor([0.5, 2.0, 1.0])
    soft = F.one_hot(y.clamp_min(0), 3).float()
    for w in (None, weight):
        hard, hard_hits = loss_and_hits(logits, y, None, w, 0.1)
        loss, hits = loss_and_hits(logits, y, soft, w, 0.1)
        assert loss.item() == pytest.approx(hard.item(), rel=1e-6) and hits == hard_hits
    # Against the larger share: a 0.7/0.3 mix of classes 2 and 0 counts as class 2.
    mixed = torch.tensor([[0.3, 0.0, 0.7]])
    assert loss_and_hits(torch.tensor([[0.0, 0.0, 5.0]]), torch.tensor([0]), mixed, None, 0.0)[1] == 1
    assert loss_and_hits(torch.tensor([[5.0, 0.0, 0.0]]), torch.tensor([0]), mixed, None, 0.0)[1] == 0


def test_balanced_sampler_draws_classes_equally_and_shards_exactly():
    targets = [0] * 90 + [1] * 10
    data = list(range(100))
    whole = BalancedSampler(data, targets, num_replicas=1, rank=0, seed=3)
    counts = Counter()
    for epoch in range(20):
        whole.set_epoch(epoch)
        counts.update(targets[i] for i in whole)
    assert abs(counts[0] / counts[1] - 1) < 0.1  # 1000 draws a class, give or take sampling noise
    whole.set_epoch(5)
    once = list(whole)
    assert once == list(whole) and len(once) == 100  # the order is the epoch's
    for world in (2, 3):  # interleaving the shards gives back the one list, repeats marked once
        shards = []
        for rank in range(world):
            s = BalancedSampler(data, targets, num_replicas=world, rank=rank, seed=3)
            s.set_epoch(5)
            shards.append(list(s))
        merged = [shards[r][k] for k in range(len(shards[0])) for r in range(world)]
        assert [i for i in merged if i >= 0] == once
        assert sum(i < 0 for i in merged) == len(merged) - 100
    assert list(whole) != list(ShardSampler(data, num_replicas=1, rank=0, seed=3))


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    """Class `blue` with 16 train images, `red` with 4: imbalanced."""
    root = make_imagefolder(tmp_path_factory.mktemp("skew") / "d", n_train=16, n_val=4, size=48)
    for f in sorted((root / "train" / "red").iterdir())[4:]:
        f.unlink()
    return root


def test_balanced_sampler_and_class_weights_in_a_run(tmp_path, skewed, base_weights):
    """Both train, report balanced accuracy and macro-F1 per epoch and in the summary."""
    for extra in (["--sampler", "balanced"], ["--class-weights", "auto"]):
        out = tmp_path / extra[1]
        proc = run_cli("train.py", "--data-dir", skewed, "--output-dir", out, "--epochs", "2", *FAST,
                       "--weights", base_weights, *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(r["train_images"] == 20 and 0 <= r["val_balanced_acc"] <= 1 and 0 <= r["val_macro_f1"] <= 1
                   for r in rows)
        summary = json.loads((out / "summary.json").read_text())
        recalls = summary["per_class_recall"].values()
        assert summary["val_balanced_acc"] == pytest.approx(sum(recalls) / 2)
        assert json.loads((out / "config.json").read_text())["recipe"][extra[0][2:].replace("-", "_")] == extra[1]


@pytest.mark.parametrize("args, message", [
    (["--mixup", "-0.2"], "--mixup is a Beta distribution's alpha"),
    (["--cutmix", "-1"], "--cutmix is a Beta distribution's alpha"),
    (["--mode", "feature-extract", "--mixup", "0.8"], "add --feature-cache off"),
    (["--class-weights", "inverse"], "argument --class-weights: invalid choice"),
])
def test_impossible_values_are_one_line_errors(tmp_path, tiny_data, args, message):
    proc = run_cli("train.py", "--data-dir", tiny_data, "--output-dir", tmp_path / "run", *FAST, "--weights", "none",
                   *args)
    one_line_error(proc, message)
    assert not (tmp_path / "run").exists()


def test_balanced_sampler_on_one_class_is_refused(tmp_path):
    data = make_imagefolder(tmp_path / "d", classes=("only",), n_train=4, n_val=2, size=40)
    proc = run_cli("train.py", "--data-dir", data, "--output-dir", tmp_path / "run", *FAST, "--weights", "none",
                   "--sampler", "balanced")
    one_line_error(proc, "at least 2")
