"""tl.inference.mistakes's analysis and its files on generated probabilities: exact figures on a small case, and
1000 classes over 20,000 images (pure tensors, a second or two). The CLI on real runs: test_report.py."""

import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from tl.inference.mistakes import analyse, html_page, save_outputs
from tl.runs.pictures import save_errors
from tl.train.finish import scores

CLASSES = ["ant", "bee", "cat", "dog"]


def probs_of(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


@pytest.fixture
def small():
    """Eight images of four classes; dog has none. Mistakes: bee->ant twice, ant->bee once, cat->ant once."""
    targets = [0, 0, 0, 1, 1, 1, 2, 2]
    probs = probs_of([[0.9, 0.1, 0, 0], [0.6, 0.4, 0, 0], [0.3, 0.7, 0, 0],  # ant: right, right, wrong
                      [0.8, 0.2, 0, 0], [0.5, 0.4, 0.1, 0], [0.1, 0.9, 0, 0],  # bee: wrong, wrong, right
                      [0.7, 0, 0.3, 0], [0, 0, 1.0, 0]])  # cat: wrong, right
    paths = [f"{CLASSES[t]}/{i}.jpg" for i, t in enumerate(targets)]
    return paths, targets, probs


def test_top_losses_pairs_and_classes_worst_first(small):
    paths, targets, probs = small
    result = analyse(paths, targets, probs, CLASSES, top=5)
    assert (result["images"], result["correct"], result["accuracy"]) == (8, 4, 0.5)
    # loss = -log p(true): 0.2 (bee 3), 0.3 (ant 2, cat 6), 0.4 (bee 4) ...; equal losses in file order
    top = result["top_losses"]
    assert [r["index"] for r in top] == [3, 2, 6, 4, 1]  # p(true) 0.2, 0.3, 0.3 (a tie: file order), 0.4, 0.6
    assert [r["rank"] for r in top] == [1, 2, 3, 4, 5]
    first = top[0]
    assert (first["path"], first["true"], first["predicted"], first["correct"]) == ("bee/3.jpg", "bee", "ant", False)
    assert first["probability"] == pytest.approx(0.8) and first["p_true"] == pytest.approx(0.2)
    assert first["loss"] == pytest.approx(-math.log(0.2))
    assert top[4]["correct"] is True and top[4]["predicted"] == "ant"  # right, with p(true) 0.6: a loss of 0.51
    assert [r["loss"] for r in top] == sorted((r["loss"] for r in top), reverse=True)

    assert result["confused_pairs"] == [
        {"true": "bee", "predicted": "ant", "count": 2, "share": 2 / 3},
        {"true": "ant", "predicted": "bee", "count": 1, "share": 1 / 3},  # ties: by class index, true first
        {"true": "cat", "predicted": "ant", "count": 1, "share": 1 / 2}]

    per_class = result["per_class"]
    assert [r["class"] for r in per_class] == ["bee", "cat", "ant", "dog"]  # 1/3, 1/2, 2/3; no images last
    bee = per_class[0]
    assert (bee["accuracy"], bee["correct"], bee["images"]) == (1 / 3, 1, 3)
    assert (bee["confused_with"], bee["confused_count"]) == ("ant", 2)
    assert per_class[-1] | {"precision": 0, "f1": 0} == {"class": "dog", "accuracy": None, "correct": 0, "images": 0,
                                                         "precision": 0, "f1": 0, "confused_with": None,
                                                         "confused_count": 0}
    # the run's own figures (tl.train.finish.scores, as summary.json has them) from the same probabilities
    run = scores(probs, torch.tensor(targets), CLASSES, "")
    assert result["accuracy"] == run["acc"] and result["balanced_accuracy"] == run["balanced_acc"]
    assert result["macro_f1"] == run["macro_f1"]
    assert {r["class"]: r["accuracy"] or 0.0 for r in per_class} == run["per_class_acc"]
    assert result["mean_loss"] == pytest.approx(torch.nn.functional.nll_loss(probs.log(), torch.tensor(targets)).item())


def test_ties_in_accuracy_go_by_name_and_a_sure_mistake_has_a_finite_loss():
    classes = ["b", "a", "c"]
    probs = probs_of([[0, 1, 0], [1, 0, 0], [0, 0, 1]])  # b and a wrong with p(true) 0, c right
    result = analyse(["x", "y", "z"], [0, 1, 2], probs, classes, top=10)
    assert [r["class"] for r in result["per_class"]] == ["a", "b", "c"]
    assert len(result["top_losses"]) == 3 and math.isfinite(result["top_losses"][0]["loss"])
    json.dumps(result, allow_nan=False)  # no inf, no nan: plain JSON


def test_no_mistakes_and_bad_input():
    result = analyse(["x", "y"], [0, 1], probs_of([[1, 0], [0, 1]]), ["a", "b"], top=0)
    assert result["accuracy"] == 1 and result["confused_pairs"] == [] and result["top_losses"] == []
    with pytest.raises(ValueError, match="do not agree"):
        analyse(["x"], [0, 1], probs_of([[1, 0], [0, 1]]), ["a", "b"])
    with pytest.raises(ValueError, match="do not agree"):
        analyse(["x", "y"], [0, 1], probs_of([[1, 0], [0, 1]]), ["a", "b", "c"])
    with pytest.raises(ValueError, match="every image needs its true class"):
        analyse(["x", "y"], [0, -1], probs_of([[1, 0], [0, 1]]), ["a", "b"])


def generated(classes: int, images: int, seed: int = 0):
    """Probabilities of a model right about 70% of the time, its mistakes leaning to the next class."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.arange(images) % classes
    logits = torch.randn(images, classes, generator=g)
    logits[torch.arange(images), targets] += 3.0
    logits[torch.arange(images), (targets + 1) % classes] += 2.0
    return [f"img/{i}.jpg" for i in range(images)], targets, logits.softmax(1)


def images_of(n: int, side: int = 48) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (3, side, side), dtype=torch.uint8, generator=g) for _ in range(n)]


def test_a_thousand_classes_and_twenty_thousand_images(tmp_path):
    classes = [f"class-{k:04d}-with-a-long-name" for k in range(1000)]
    paths, targets, probs = generated(1000, 20_000)
    result = analyse(paths, targets, probs, classes, top=16)  # nothing grows with the classes squared but counts
    assert len(result["per_class"]) == 1000 and len(result["confused_pairs"]) == 20
    assert result["images"] == 20_000 and 0.3 < result["accuracy"] < 0.95
    counts = [p["count"] for p in result["confused_pairs"]]
    assert counts == sorted(counts, reverse=True) and all(p["true"] != p["predicted"] for p in result["confused_pairs"])
    accuracy = [r["accuracy"] for r in result["per_class"]]
    assert accuracy == sorted(accuracy) and all(r["images"] == 20 for r in result["per_class"])
    losses = [r["loss"] for r in result["top_losses"]]
    assert losses == sorted(losses, reverse=True) and len(losses) == 16

    files = save_outputs(result, images_of(16), tmp_path, "a thousand classes", ["accuracy", "mean loss"],
                         {"split": "val"})
    page = files["html"].read_text()
    assert page.count("<img ") == 16 and page.count('src="data:image/jpeg;base64,') == 16
    per_class = page.split("Per class, worst first")[1]
    assert per_class.count("<tr><td>class-") == 1000
    assert all(r["class"] in per_class for r in result["per_class"])
    assert json.loads(files["json"].read_text())["per_class"] == result["per_class"]

    small = analyse(*generated(3, 30), ["a", "b", "c"], top=16)
    (tmp_path / "small").mkdir()
    save_outputs(small, images_of(16), tmp_path / "small", "three classes", ["accuracy"], {})
    with Image.open(files["png"]) as big, Image.open(tmp_path / "small" / "errors.png") as little:
        big.verify()
        assert big.size[0] == little.size[0] <= 1000 and little.size[1] < big.size[1] <= 1000


def test_picture_is_as_tall_as_its_bars_need(tmp_path):
    """errors.png's charts take the height their bars need: for 2 classes no half-empty figure, and never
    beyond the 20 worst classes' (a newcomer saw the lower half of a 2-class picture empty)."""
    heights = {}
    for n, worst, pairs in ((0, 0, 0), (3, 2, 1), (16, 20, 20), (40, 50, 50)):
        path = tmp_path / f"{n}.png"
        save_errors(images_of(n, 32), ["a" * 40] * n, ["b"] * n, [0.5] * n,
                    [(f"c{k}", k / 60, 10) for k in range(worst)], [("x", f"y{k}", 60 - k) for k in range(pairs)],
                    path, "title\nsecond line")
        with Image.open(path) as img:
            heights[n] = img.size
            rows = np.asarray(img.convert("L")).min(1)  # the darkest pixel of each row
        drawn = np.nonzero(rows < 200)[0]
        assert drawn[-1] > 0.85 * len(rows), (n, drawn[-1], len(rows))  # something near the bottom
    assert len({w for w, _ in heights.values()}) == 1  # the same width
    assert heights[3][1] < heights[16][1] == heights[40][1]  # taller with more bars, up to the 20 shown


def test_html_escapes_class_names_and_paths():
    result = analyse(["<b>&.jpg"], [0], probs_of([[0.2, 0.8]]), ["<i>", "a&b"], top=1)
    page = html_page(result, [b"\xff\xd8"], "t <x>", ["f"])
    assert "<i>" not in page and "&lt;i&gt;" in page and "a&amp;b" in page and "&lt;b&gt;&amp;.jpg" in page
    assert re.search(r"<title>t &lt;x&gt;</title>", page)
