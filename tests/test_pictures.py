"""The pictures at 2, 10 and 200 classes: written, bounded in size, not blank, saying what they should."""

import matplotlib.text
import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgba
from PIL import Image

from tl.model.calibration import reliability
from tl.runs.pictures import (
    _grid,
    confusion_figure,
    curves_figure,
    pick_examples,
    predictions_figure,
    reliability_figure,
    save_confusion,
    save_curves,
    save_image_grid,
    save_predictions,
    save_reliability,
)

MAX_SIDE = 1100


def made_up_run(n_classes: int, n_val: int = 0, accuracy: float = 0.58, seed: int = 0):
    """Class names (some long), truth and predictions at about `accuracy`, confidences, a confusion matrix."""
    g = torch.Generator().manual_seed(seed)
    n_val = n_val or max(153, 5 * n_classes)
    classes = [f"class {i} with a rather long name" if i % 3 == 0 else f"c{i}" for i in range(n_classes)]
    truth = torch.randint(0, n_classes, (n_val,), generator=g)
    wrong = torch.rand(n_val, generator=g) > accuracy
    predicted = torch.where(wrong, (truth + torch.randint(1, max(n_classes, 2), (n_val,), generator=g)) % n_classes,
                            truth)
    confidence = torch.rand(n_val, generator=g) * 0.5 + 0.5
    matrix = torch.bincount(truth * n_classes + predicted, minlength=n_classes ** 2).view(n_classes, n_classes)
    return classes, truth.tolist(), predicted.tolist(), confidence.tolist(), matrix


def photo(seed: int, size: int = 64) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (3, size, size), dtype=np.uint8))


def check_png(path) -> tuple[int, int]:
    with Image.open(path) as img:
        size = img.size
        pixels = np.asarray(img.convert("L"), dtype=float)
    assert max(size) <= MAX_SIDE, (path, size)
    assert pixels.std() > 10, f"{path} looks blank"
    return size


def texts(fig) -> list[str]:
    """Every non-empty Text artist the drawn figure holds (titles, labels, tick labels, cell counts)."""
    fig.canvas.draw()
    return [t.get_text() for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text()]


# pick_examples

def test_pick_examples_is_deterministic_sorted_and_bounded():
    _, truth, predicted, _, _ = made_up_run(10)
    picks = pick_examples(truth, predicted, 16, seed=3)
    assert picks == pick_examples(truth, predicted, 16, seed=3)
    assert picks == sorted(set(picks)) and len(picks) == 16
    assert any(pick_examples(truth, predicted, 16, seed=s) != picks for s in range(4, 8))
    assert pick_examples(truth[:5], predicted[:5], 16) == [0, 1, 2, 3, 4]  # n > len: every image
    assert pick_examples(truth, predicted, 0) == [] and pick_examples([], [], 16) == []


def test_pick_examples_shows_mistakes_up_to_half():
    _, truth, predicted, _, _ = made_up_run(2, accuracy=0.58)
    picks = pick_examples(truth, predicted, 16)
    mistakes = [i for i in picks if truth[i] != predicted[i]]
    assert len(mistakes) == 8  # half, though evenly spaced picks could all be right
    truth, predicted = [0] * 90 + [1] * 10, [0] * 90 + [0] * 10  # 10% mistakes, all of class 1
    picks = pick_examples(truth, predicted, 16)
    assert sum(truth[i] != predicted[i] for i in picks) == 8 and {truth[i] for i in picks} == {0, 1}
    assert len(pick_examples([1, 1, 0], [0, 0, 1], 16)) == 3  # all wrong: still all shown
    assert len(pick_examples([0] * 6 + [1] * 6 + [2] * 2, [1] * 6 + [0] * 6 + [2] * 2, 4)) == 4
    perfect = pick_examples([0, 1] * 20, [0, 1] * 20, 16)
    assert len(perfect) == 16


@pytest.mark.parametrize("n_classes", [2, 10, 16])
def test_pick_examples_covers_every_class_when_n_allows(n_classes):
    _, truth, predicted, _, _ = made_up_run(n_classes, accuracy=0.3)
    picks = pick_examples(truth, predicted, 16)
    assert {truth[i] for i in picks} == set(range(n_classes))


def test_pick_examples_spreads_unlabelled_images_over_predicted_classes():
    predicted = [0] * 50 + [1] * 50 + [2] * 3
    picks = pick_examples([-1] * len(predicted), predicted, 6)
    assert len(picks) == 6 and [predicted[i] for i in picks].count(2) == 2  # round-robin: 2 of each
    # Labelled and not: the 3 labelled mistakes (100..102), then round-robin over class 0 (by prediction)
    # and class 1 (by truth).
    mixed = pick_examples([-1] * 50 + [1] * 53, [0] * 50 + [1] * 50 + [0] * 3, 8)
    assert len(mixed) == 8 and mixed[-3:] == [100, 101, 102]
    assert sum(i < 50 for i in mixed) == 3 and sum(50 <= i < 100 for i in mixed) == 2


def test_pick_examples_properties_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(300):
        size, n_classes, n = int(rng.integers(0, 60)), int(rng.integers(1, 25)), int(rng.integers(0, 30))
        truth = rng.integers(-1, n_classes, size).tolist()
        predicted = [int(t) if t >= 0 and rng.random() < 0.6 else int(rng.integers(0, n_classes)) for t in truth]
        picks = pick_examples(truth, predicted, n, seed=int(rng.integers(0, 100)))
        assert picks == sorted(set(picks)) and len(picks) == min(n, size)
        shown = {t if t >= 0 else p for t, p in zip(truth, predicted)}
        if len(shown) <= n:
            assert {truth[i] if truth[i] >= 0 else predicted[i] for i in picks} == shown
        wrong = sum(truth[i] >= 0 and truth[i] != predicted[i] for i in picks)
        right_left = sum(t < 0 or t == p for t, p in zip(truth, predicted)) - (len(picks) - wrong)
        assert wrong <= n // 2 or right_left == 0 or len(shown) <= n  # more only when nothing else or coverage


# the pictures at 2, 10 and 200 classes

@pytest.mark.parametrize("n_classes", [2, 10, 200])
def test_predictions_picture(tmp_path, n_classes):
    classes, truth, predicted, confidence, _ = made_up_run(n_classes)
    picks = pick_examples(truth, predicted, 16)
    names_true, names_pred = [classes[truth[i]] for i in picks], [classes[predicted[i]] for i in picks]
    args = ([photo(i) for i in picks], names_true, names_pred, [confidence[i] for i in picks])
    save_predictions(*args, tmp_path / "p.png", "val acc 0.5817 (89/153), best epoch 4; 16 shown, 8 of them mistakes")
    check_png(tmp_path / "p.png")
    fig = predictions_figure(*args, "val acc 0.5817")
    assert fig._suptitle.get_text() == "val acc 0.5817"
    for ax, t, p, c in zip(fig.axes, names_true, names_pred, args[3]):
        title = ax.title.get_text()
        assert title.startswith("true: ") and f"({c:.2f})" in title
        assert ("\u2026" in title) == (len(t) > 18 or len(p) > 18)
        assert all(len(line) <= 6 + 18 + 7 for line in title.splitlines())
        assert to_rgba(ax.title.get_color()) == to_rgba("green" if t == p else "red")


def test_predictions_without_truth_are_black_and_show_only_the_prediction(tmp_path):
    images = [photo(i, 48) for i in range(5)]
    save_predictions(images, [None] * 5, ["ants", "bees", "x" * 40, "ants", "bees"], [0.9] * 5, tmp_path / "p.png",
                     "5 images")
    check_png(tmp_path / "p.png")
    fig = predictions_figure(images, [None, "bees", None, None, None], ["ants", "bees", "x" * 40, "ants", "bees"],
                             [0.93] * 5, "5 images")
    assert fig.axes[0].title.get_text() == "pred: ants (0.93)"
    assert to_rgba(fig.axes[0].title.get_color()) == to_rgba("black")
    assert fig.axes[2].title.get_text() == "pred: " + "x" * 17 + "\u2026 (0.93)"
    assert to_rgba(fig.axes[1].title.get_color()) == to_rgba("green")


def test_many_images_stay_within_bounds(tmp_path):
    save_predictions([photo(i) for i in range(40)], ["a"] * 40, ["b"] * 40, [0.5] * 40, tmp_path / "p.png", "40")
    check_png(tmp_path / "p.png")


def epochs(n: int) -> list[dict]:
    return [{"epoch": e, "train_loss": 0.7 / e, "val_loss": 0.69 - 0.001 * e, "train_acc": 0.5 + 0.01 * e,
             "val_acc": 0.58 + 0.002 * (e % 3)} for e in range(1, n + 1)]


@pytest.mark.parametrize("n", [1, 2, 25])
def test_curves_show_accuracy_from_0_to_1_loss_over_its_range_and_the_best_epoch(tmp_path, n):
    rows = epochs(n)
    save_curves(rows, tmp_path / "c.png")
    check_png(tmp_path / "c.png")
    fig = curves_figure(rows, "run X")
    loss, acc = fig.axes[:2]
    assert acc.get_ylim() == pytest.approx((-0.02, 1.02))  # not zoomed onto noise of 0.004
    values = [v for r in rows for v in (r["train_loss"], r["val_loss"])]
    low, high = loss.get_ylim()
    assert low <= min(values) and high >= max(values)  # every point shown ...
    assert (max(values) - min(values)) / (high - low) > 0.8 or n == 1  # ... filling the axis, not flat near the top
    assert fig._suptitle.get_text() == "run X"
    best = max(rows, key=lambda r: r["val_acc"])
    assert best["epoch"] == (1 if n == 1 else 2)  # the first of equal maxima
    assert f"best epoch {best['epoch']}" in texts(fig)
    legend = [t.get_text() for t in acc.get_legend().get_texts()]
    assert f"best val {best['val_acc']:.4f}" in legend  # in the legend: a label on the curve covered it
    assert not [t for t in acc.texts if "best" in t.get_text()]
    assert f"best val acc {best['val_acc']:.4f} at epoch {best['epoch']}" in curves_figure(rows)._suptitle.get_text()


@pytest.mark.parametrize("n_classes", [2, 10, 200])
def test_confusion_picture(tmp_path, n_classes):
    classes, *_, matrix = made_up_run(n_classes)
    save_confusion(matrix, classes, tmp_path / "m.png")
    check_png(tmp_path / "m.png")
    drawn = texts(confusion_figure(matrix, classes))
    if n_classes <= 20:  # counts in the cells, names on the axes
        assert len(drawn) >= n_classes ** 2 + 2 * n_classes
        assert str(int(matrix[0, 0])) in drawn and "class 0 with a ra\u2026" in drawn
    else:
        assert len(drawn) < 30, drawn  # no per-cell text, no tick labels
        assert not any(t.isdigit() for t in drawn) and not any(t.startswith("c1") for t in drawn)
        assert "predicted (200 classes, in class order)" in drawn


def test_confusion_of_many_classes_is_medium_then_bare(tmp_path):
    classes, *_, matrix = made_up_run(40)
    drawn = texts(confusion_figure(matrix, classes))
    assert "c1" in drawn and not any(t.isdigit() for t in drawn)  # names, no counts
    classes, *_, matrix = made_up_run(1000, n_val=3000)
    save_confusion(matrix, classes, tmp_path / "m.png")
    check_png(tmp_path / "m.png")
    assert len(texts(confusion_figure(matrix, classes))) < 30


def test_image_grid_is_kept_with_its_title(tmp_path):
    save_image_grid([photo(i) for i in range(8)], ["blue", "red"] * 4, tmp_path / "b.png", title="8 train images")
    assert check_png(tmp_path / "b.png")[0] > 400
    assert _grid([photo(0)], ["x"], ["black"], 4, "8 train images")._suptitle.get_text() == "8 train images"


def test_reliability_bars_say_how_many_images_each_holds(tmp_path):
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(200, 2) * 2, 1)
    targets = torch.randint(0, 2, (200,))
    before, after = reliability(probs, targets), reliability(torch.softmax(probs.log() / 2, 1), targets)
    save_reliability(before, after, 2.0, tmp_path / "r.png")
    check_png(tmp_path / "r.png")
    drawn = texts(reliability_figure(before, after, 2.0))
    for bins in (before, after):
        assert sum(bins["counts"]) == 200
        assert all(f"n={c}" in drawn for c in bins["counts"] if c > 0), drawn
