"""tl.data.augment: batched device augmentation matches v2's RandomResizedCrop + RandomHorizontalFlip."""

import io
import json
import math
import zipfile

import pytest
import torch
import torchvision.transforms as T
from conftest import FAST, HYMENOPTERA_ZIP, one_line_error, run_cli
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

from tl.data.augment import DeviceAugment, batch_augment, collate, crop_boxes, crop_resize, pad_batch
from tl.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, decode

MEAN, STD = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
DRAWS = 20_000
# Two-sample KS with n = m = 20k: the 1e-5 critical value is sqrt(-ln(5e-6)/2) * sqrt(2/n) = 0.0248;
# 16 comparisons then fail by chance with probability under 2e-4 (and the seeds are fixed).
KS_MAX = 0.025


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def levels(out):
    """Undo the normalization: back to the 0-255 scale."""
    return out * STD.view(1, 3, 1, 1) * 255 + MEAN.view(1, 3, 1, 1) * 255


def ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = a.double().sort().values, b.double().sort().values
    points = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, points, right=True) / len(a)
    cdf_b = torch.searchsorted(b, points, right=True) / len(b)
    return (cdf_a - cdf_b).abs().max().item()


def stats(boxes: torch.Tensor, h: int, w: int) -> dict[str, torch.Tensor]:
    x1, y1, x2, y2 = boxes.double().unbind(1)
    return {"area": (x2 - x1) * (y2 - y1) / (h * w), "log_ratio": ((x2 - x1) / (y2 - y1)).log(),
            "cx": (x1 + x2) / (2 * w), "cy": (y1 + y2) / (2 * h)}


def torchvision_boxes(h: int, w: int, n: int, seed: int) -> torch.Tensor:
    img = torch.empty(3, h, w)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        params = [T.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n)]
    i, j, hh, ww = torch.tensor(params, dtype=torch.float64).unbind(1)
    return torch.stack([j, i, j + ww, i + hh], 1)


def full_boxes(heights, widths):
    """crop_boxes forced to the whole image: scale 1 and each image's own aspect ratio."""
    boxes = []
    for h, w in zip(heights.tolist(), widths.tolist()):
        boxes.append(crop_boxes(torch.tensor([h]), torch.tensor([w]), gen(), scale=(1.0, 1.0), ratio=(w / h, w / h)))
    boxes = torch.cat(boxes)
    assert torch.equal(boxes, torch.stack([0 * widths, 0 * heights, widths, heights], 1).float())
    return boxes


def smooth_image(h, w, seed=0):
    """A photo-like image: random noise blurred, so resampling differences stay small."""
    noise = torch.rand(1, 3, h // 8, w // 8, generator=gen(seed))
    return (torch.nn.functional.interpolate(noise, size=(h, w), mode="bicubic")[0].clamp(0, 1) * 255).byte()


@pytest.mark.parametrize("h,w", [(300, 400), (400, 300), (224, 224), (50, 500)])
def test_crop_statistics_match_get_params(h, w):
    ref = torchvision_boxes(h, w, DRAWS, seed=1)
    ours = crop_boxes(torch.full((DRAWS,), h), torch.full((DRAWS,), w), gen(2))
    assert ours.dtype == torch.float32 and ours.shape == (DRAWS, 4)
    assert torch.equal(ours, ours.round())  # integer pixel boxes, like get_params
    for name, a in stats(ref, h, w).items():
        b = stats(ours, h, w)[name]
        se = math.sqrt(a.var().item() / DRAWS + b.var().item() / DRAWS)
        assert abs(a.mean().item() - b.mean().item()) < 4.5 * se + 1e-9, name
        assert ks(a, b) < KS_MAX, (name, ks(a, b))
        q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
        spread = (a.quantile(0.95) - a.quantile(0.05)).item() + 1e-9
        assert ((a.quantile(q) - b.quantile(q)).abs() / spread).max() < 0.03, name
    # The center-crop fallback (all 10 attempts fail): about 77% of the draws on a 1:10 image.
    fallback = torch.tensor([216.0, 0.0, 283.0, 50.0]) if (h, w) == (50, 500) else None
    if fallback is not None:
        p_ref = (ref.float() == fallback).all(1).double().mean().item()
        p_ours = (ours == fallback).all(1).double().mean().item()
        assert 0.5 < p_ref < 0.8
        assert abs(p_ref - p_ours) < 4.5 * math.sqrt(2 * p_ref * (1 - p_ref) / DRAWS)


def test_boxes_stay_inside_each_padded_image():
    g = gen(3)
    heights, widths = torch.randint(1, 400, (5000,), generator=g), torch.randint(1, 400, (5000,), generator=g)
    boxes = crop_boxes(heights, widths, g)
    x1, y1, x2, y2 = boxes.unbind(1)
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= widths).all() and (y2 <= heights).all()
    assert (x2 > x1).all() and (y2 > y1).all()


def test_full_box_upscale_is_bilinear_resize():
    """A whole-image box enlarged gets one sample per pixel: TF.resize without antialias, exactly on
    float input; on uint8 input TF.resize's fixed-point arithmetic and rounding differ by <= 1 level."""
    imgs = [torch.randint(0, 256, (3, h, w), generator=gen(i), dtype=torch.uint8)
            for i, (h, w) in enumerate([(40, 60), (64, 48), (30, 30)])]
    batch, heights, widths = pad_batch(imgs)
    for img, out in zip(imgs, crop_resize(batch, full_boxes(heights, widths), 96)):
        assert (out - TF.resize(img.float(), [96, 96], antialias=False)).abs().max() < 1e-3
        assert (out - TF.resize(img, [96, 96], antialias=False).float()).abs().max() <= 1 + 1e-3


def test_full_box_downscale_is_close_to_antialiased_resize():
    """Shrunk 3.6x, noise (the worst case for aliasing): roi_align's adaptive sampling averages like
    v2's antialiased resize (mean 6.8 levels apart) rather than plain bilinear (34 apart)."""
    img = torch.randint(0, 256, (3, 300, 400), generator=gen(), dtype=torch.uint8)
    out = crop_resize(img[None], torch.tensor([[0.0, 0.0, 400.0, 300.0]]), 112)[0]
    diff_aa = (out - TF.resize(img.float(), [112, 112], antialias=True)).abs().mean()
    diff_plain = (out - TF.resize(img.float(), [112, 112], antialias=False)).abs().mean()
    assert diff_aa < 8 and diff_plain > 4 * diff_aa


def test_batch_augment_full_box_matches_resize():
    imgs = [torch.randint(0, 256, (3, h, w), generator=gen(i), dtype=torch.uint8) for i, (h, w) in
            enumerate([(40, 40), (30, 30)])]
    batch, heights, widths = pad_batch(imgs)
    out = levels(batch_augment(batch, heights, widths, 64, gen(5), MEAN, STD, scale=(1.0, 1.0), ratio=(1.0, 1.0)))
    for img, o in zip(imgs, out):
        ref = TF.resize(img.float(), [64, 64], antialias=False)
        assert min((o - ref).abs().max(), (o - ref.flip(-1)).abs().max()) < 1e-3


def test_known_region_maps_to_its_pixels():
    img = torch.zeros(3, 100, 100, dtype=torch.uint8)
    img[0, :50, :50] = 255  # red top-left quadrant
    img[1, 50:, 50:] = 255  # green bottom-right quadrant
    out = crop_resize(img[None].repeat(2, 1, 1, 1), torch.tensor([[0.0, 0, 50, 50], [50, 50, 100, 100]]), 16)
    red, green = torch.tensor([255.0, 0, 0]).view(3, 1, 1), torch.tensor([0.0, 255, 0]).view(3, 1, 1)
    # Inside: exactly the quadrant's color; the outermost samples on the inner edges also weigh the
    # neighbor pixel, so the last row/column is close to it.
    assert torch.allclose(out[0, :, :-1, :-1], red.expand(3, 15, 15), atol=1e-3)
    assert torch.allclose(out[1, :, 1:, 1:], green.expand(3, 15, 15), atol=1e-3)
    assert (out[0] - red).abs().max() < 64 and (out[1] - green).abs().max() < 64


def test_padding_does_not_leak_into_crops():
    """Crops of a padded batch equal those of each image alone (pad_batch copies the edge pixel)."""
    imgs = [smooth_image(h, w, seed=i) for i, (h, w) in enumerate([(120, 80), (64, 200), (200, 200)])]
    batch, heights, widths = pad_batch(imgs)
    assert batch.shape == (3, 3, 200, 200) and heights.tolist() == [120, 64, 200]
    assert (batch[0, :, 121:] == 0).all() and (batch[0, :, :, 81:] == 0).all()
    g = gen(7)
    boxes = torch.cat([crop_boxes(heights, widths, g) for _ in range(20)])
    index = torch.arange(3).repeat(20)
    together = crop_resize(batch[index], boxes, 32)
    alone = torch.stack([crop_resize(imgs[i][None], b[None], 32)[0] for i, b in zip(index.tolist(), boxes)])
    assert torch.allclose(together, alone, atol=1e-3)


def test_flip_half_the_images_and_is_a_mirror():
    n, size = 1000, 8
    batch = torch.randint(0, 256, (n, 3, 12, 12), generator=gen(8), dtype=torch.uint8)
    heights, widths = torch.full((n,), 12), torch.full((n,), 12)
    g = gen(9)
    state = g.get_state()
    out = levels(batch_augment(batch, heights, widths, size, g, MEAN, STD))
    g.set_state(state)
    plain = crop_resize(batch, crop_boxes(heights, widths, g), size)  # same boxes, no flip
    same = torch.isclose(out, plain, atol=1e-3).flatten(1).all(1)
    mirrored = torch.isclose(out, plain.flip(-1), atol=1e-3).flatten(1).all(1)
    assert (same | mirrored).all() and not (same & mirrored).any()
    assert abs(mirrored.sum().item() - n / 2) < 4 * math.sqrt(n / 4)  # binomial(1000, 1/2): sd 15.8


def test_output_layout_and_normalization():
    gray = torch.full((2, 3, 50, 70), 128, dtype=torch.uint8)
    out = batch_augment(gray, torch.tensor([50, 40]), torch.tensor([70, 70]), 32, gen(), MEAN, STD)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    expect = (128 / 255 - MEAN) / STD
    assert torch.allclose(out.mean((0, 2, 3)), expect, atol=1e-5)
    assert out.std((0, 2, 3)).max() < 1e-5


def test_device_augment_is_deterministic_per_seed_epoch_rank():
    imgs = [smooth_image(h, w, seed=i) for i, (h, w) in enumerate([(90, 120), (120, 90), (100, 100), (60, 150)])]
    batch, heights, widths = pad_batch(imgs)

    def run(seed=0, epoch=0, rank=0, batches=3):
        aug = DeviceAugment(48, seed=seed, rank=rank)
        aug.set_epoch(epoch)
        return torch.stack([aug(batch, heights, widths) for _ in range(batches)])

    first = run()
    assert torch.equal(first, run())  # a resumed epoch repeats its crops and flips exactly
    assert not torch.equal(first[0], first[1])  # successive batches differ
    for other in (run(epoch=1), run(rank=1), run(seed=1)):
        assert not torch.equal(first, other)

    def boxes(epoch):
        aug = DeviceAugment(48)
        aug.set_epoch(epoch)
        return crop_boxes(heights, widths, aug.generator)

    assert torch.equal(boxes(0), boxes(0)) and not torch.equal(boxes(0), boxes(1))


def test_collate_in_a_dataloader():
    items = [(smooth_image(h, w, seed=i), i % 2) for i, (h, w) in enumerate([(30, 40), (50, 20), (25, 25)])]
    (batch, heights, widths), labels = next(iter(DataLoader(items, batch_size=3, collate_fn=collate)))
    assert batch.shape == (3, 3, 50, 40) and batch.dtype == torch.uint8
    assert heights.tolist() == [30, 50, 25] and widths.tolist() == [40, 20, 25] and labels.tolist() == [0, 1, 0]
    out = DeviceAugment(16)(batch, heights, widths)
    assert out.shape == (3, 3, 16, 16) and torch.isfinite(out).all()


@pytest.mark.skipif(not HYMENOPTERA_ZIP.is_file(), reason="needs ../shared/data/hymenoptera_data.zip")
def test_close_to_v2_on_real_photos():
    """roi_align's crop+resize vs v2's crop + antialiased resize, on real train photos and boxes."""
    with zipfile.ZipFile(HYMENOPTERA_ZIP) as z:
        names = sorted(n for n in z.namelist() if n.startswith("hymenoptera_data/train/") and n.endswith(".jpg"))
        imgs = [decode(io.BytesIO(z.read(n)), Preprocess.tutorial(224), train=True) for n in names[::25][:8]]
    g, diffs = gen(10), []
    for img in imgs:
        h, w = img.shape[-2:]
        boxes = crop_boxes(torch.full((6,), h), torch.full((6,), w), g)
        outs = crop_resize(img[None].expand(6, -1, -1, -1), boxes, 224)
        for (x1, y1, x2, y2), out in zip(boxes.int().tolist(), outs):
            ref = TF.resized_crop(img, y1, x1, y2 - y1, x2 - x1, [224, 224], antialias=True).float()
            diffs.append((out - ref).abs().mean().item())
    diffs = torch.tensor(diffs)
    print(f"mean abs difference from v2 (0-255 levels): mean {diffs.mean():.3f}, max {diffs.max():.3f}")
    assert diffs.mean() < 1.0 and diffs.max() < 2.5


# Augmentation policies (--augment randaugment|trivialaugment|autoaugment) and --random-erasing: torchvision v2
# on the uint8 image in the loader, seeded per image, the same in every data mode.

@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment", "autoaugment"])
def test_policies_work_on_uint8_seeded_per_image(policy):
    from tl.data.loaders import ImageSet
    from tl.data.preprocess import train_transform
    from tl.data.splits import Split

    torch.manual_seed(0)
    images = [torch.randint(0, 256, (3, 90, 120), dtype=torch.uint8) for _ in range(8)]
    split = Split(images, [0] * 8, [str(i) for i in range(8)])
    pre = Preprocess.tutorial(64)
    with_policy = ImageSet(split, train_transform(pre, policy), seed=1)
    plain = ImageSet(split, train_transform(pre), seed=1)
    a, b = [with_policy[i][0] for i in range(8)], [with_policy[i][0] for i in range(8)]
    assert all(x.dtype == torch.uint8 and x.shape == (3, 64, 64) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # seeded by (seed, epoch, index), not by call order
    assert sum(not torch.equal(x, plain[i][0]) for i, x in enumerate(a)) >= 4  # the policy changed most


def test_random_erasing_fills_the_mean_color():
    from tl.data.preprocess import train_transform

    pre = Preprocess.tutorial(64)
    erase = train_transform(pre, None, 1.0)
    torch.manual_seed(0)
    x = erase(torch.full((3, 80, 80), 255, dtype=torch.uint8))
    mean = torch.tensor([round(255 * m) for m in pre.mean], dtype=torch.uint8)
    erased = (x == mean.view(3, 1, 1)).all(0)
    assert 0 < erased.float().mean() < 1 and ((x == 255).all(0) | erased).all()


def test_a_policy_gives_the_same_run_in_every_data_mode(tmp_path, tiny_data, base_weights):
    from tl.pack import pack

    packed = tmp_path / "pack"
    pack(tiny_data, packed, progress=False)
    rows = []
    for name, data, mode in (("memory", tiny_data, "memory"), ("stream", tiny_data, "stream"),
                             ("packed", packed, "stream")):
        out = tmp_path / name
        proc = run_cli("train.py", "--data-dir", data, "--data-mode", mode, "--output-dir", out, "--epochs", "2",
                       *FAST, "--weights", base_weights, "--augment", "trivialaugment", "--random-erasing", "0.5",
                       "--num-workers", "1" if mode == "stream" else "0")
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows.append([{k: v for k, v in json.loads(line).items() if k not in ("seconds", "train_images_per_s")}
                     for line in (out / "metrics.jsonl").read_text().splitlines()])
    assert rows[0] == rows[1] == rows[2]


@pytest.mark.parametrize("args, message", [
    (["--random-erasing", "0.3", "--augment", "device"], "--random-erasing works image by image in the loader"),
    (["--random-erasing", "1.5"], "--random-erasing is a probability from 0 (off) to 1"),
    (["--mode", "feature-extract", "--augment", "randaugment"], "--augment randaugment changes train images"),
])
def test_impossible_augmentation_is_one_line(tmp_path, tiny_data, args, message):
    one_line_error(run_cli("train.py", "--data-dir", tiny_data, "--output-dir", tmp_path / "run", *FAST, *args),
                   message)
