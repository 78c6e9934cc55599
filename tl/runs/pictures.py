"""Pictures a person looks at: image grids, learning curves, the confusion matrix.

Plotting only: callers pass plain lists and tensors. Every figure has a fixed size in inches, saved at
DPI, so a picture's pixel size depends only on its inputs' counts, never on its text; no picture
grows past about 1000 px a side, whatever the number of images or classes.
"""

import io
import math
import random
import textwrap
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed (clusters, CI)
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from tl.core.files import write_atomic  # noqa: E402

# Class names in scripts the plot font lacks (CJK, ...) are drawn as boxes: one warning per glyph is noise.
warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font")

DPI = 80
NAME_CHARS = 18  # longer class names are cut to this, ellipsis included
SMALL, MEDIUM = 20, 60  # confusion matrix: counts in cells up to SMALL classes, tick labels up to MEDIUM


def short(name: str, limit: int = NAME_CHARS) -> str:
    """A class name cut to `limit` characters with an ellipsis, so neighbouring titles never overlap."""
    return name if len(name) <= limit else name[:limit - 1] + "\u2026"


def _save(fig: Figure, path) -> None:
    """Render in memory, then write atomically: a full disk or a kill never leaves half a PNG."""
    png = io.BytesIO()
    try:
        fig.savefig(png, dpi=DPI, format="png")
    finally:
        plt.close(fig)
    write_atomic(Path(path), png.getvalue())


def _round_robin(queues: dict[int, list[int]], order: list[int]):
    """Yield (class, queue) one class at a time, round after round, while any queue has images left."""
    while any(queues[c] for c in order):
        for c in order:
            if queues[c]:
                yield c, queues[c]


def pick_examples(truth: list[int], predicted: list[int], n: int = 16, seed: int = 0) -> list[int]:
    """Indices (sorted) of at most n images worth showing, the same for the same seed.

    Up to half of the picks are mistakes (truth >= 0 and predicted != truth), taken round-robin over
    their true classes in a random order; the rest go round-robin over the classes, classes not shown
    yet first, correct predictions first. Every class appears when n allows: mistakes give way when
    they would leave too few picks for the classes not shown yet. An unlabelled image (truth -1)
    counts under its predicted class and is never a mistake.
    """
    if len(truth) != len(predicted):
        raise ValueError(f"truth has {len(truth)} entries, predicted {len(predicted)}")
    n = max(0, min(n, len(truth)))
    rng = random.Random(seed)
    key = [t if t >= 0 else p for t, p in zip(truth, predicted)]  # the class an image is shown for
    wrong = [t >= 0 and t != p for t, p in zip(truth, predicted)]
    right: dict[int, list[int]] = {}
    mistakes: dict[int, list[int]] = {}
    for i, c in enumerate(key):
        (mistakes if wrong[i] else right).setdefault(c, []).append(i)
    classes = sorted(set(key))
    rng.shuffle(classes)
    for queues in (right, mistakes):
        for c in classes:
            rng.shuffle(queues.setdefault(c, []))
    picked: list[int] = []
    covered: set[int] = set()
    pool = {c: list(queue) for c, queue in mistakes.items()}
    for c, queue in _round_robin(pool, classes):
        if len(picked) == n // 2:
            break
        if len(classes) <= n and len(classes) - len(covered | {c}) > n - len(picked) - 1:
            queue.clear()  # its mistakes would take places the classes not shown yet need, now and later
            continue
        picked.append(queue.pop())
        mistakes[c].remove(picked[-1])
        covered.add(c)
    # The rest: classes not shown yet first, right predictions only (but, when n allows every class,
    # one mistake for a class not shown yet that has no right one); then, if n is not reached, the
    # mistakes left.
    order = sorted(classes, key=lambda c: c in covered)
    for c in order:
        if len(classes) <= n and c not in covered and not right[c] and mistakes[c]:
            right[c].append(mistakes[c].pop())
    for queues in (right, mistakes):
        for _, queue in _round_robin(queues, order):
            if len(picked) == n:
                break
            picked.append(queue.pop())
    return sorted(picked)


def _fit(fig: Figure, text, side: float) -> None:
    """Shrink a title of wide letters (W, M) to its image's width `side` (inches), 0.03 in each side; 6 pt at least."""
    for _ in range(4):
        wide = text.get_window_extent(fig.canvas.get_renderer()).width / fig.dpi
        if wide <= side + 0.06 or text.get_fontsize() <= 6:
            break
        text.set_fontsize(max(6.0, text.get_fontsize() * (side + 0.06) / wide * 0.98))


def _grid(images: list[torch.Tensor], titles: list[str], colors: list[str], cols: int, suptitle: str = "",
          side: float = 2.8, max_height: float = 13.0) -> Figure:
    """uint8 CHW images in rows of `cols`, each in a square `side` inches wide under its title.

    Placed by hand, not by tight_layout: a title's band is sized from its number of lines, so titles
    never run into the row above; images shrink when the rows would make the figure over max_height.
    """
    rows = max(1, math.ceil(len(images) / cols))
    lines = max((t.count("\n") + 1 for t in titles), default=1)
    band, gap, margin = 0.08 + 0.19 * lines, 0.08, 0.06  # inches: title band, between cells, around
    head = 0.2 + 0.24 * (suptitle.count("\n") + 1) if suptitle else 0.0
    side = min(side, (max_height - head - 2 * margin) / rows - band - gap)
    width = 2 * margin + cols * side + (cols - 1) * gap
    height = head + 2 * margin + rows * (band + side) + (rows - 1) * gap
    fig = plt.figure(figsize=(width, height), dpi=DPI)
    for k, (img, title, color) in enumerate(zip(images, titles, colors)):
        r, c = divmod(k, cols)
        left = margin + c * (side + gap)
        bottom = height - head - margin - r * (band + side + gap) - band - side
        ax = fig.add_axes((left / width, bottom / height, side / width, side / height))
        ax.axis("off")
        ax.imshow(img.permute(1, 2, 0).numpy())
        _fit(fig, ax.set_title(title, fontsize=10, color=color, linespacing=1.25, pad=3), side)
    if suptitle:
        fig.suptitle(suptitle, fontsize=12, y=1 - 0.1 / height, va="top")
    return fig


def save_image_grid(images: list[torch.Tensor], titles: list[str], path, colors: list[str] | None = None,
                    cols: int = 4, title: str = "") -> None:
    """uint8 CHW images in a grid, each with a title (the tutorial's imshow and visualize_model), `title`
    above them all."""
    _save(_grid(images, titles, colors or ["black"] * len(images), cols, "\n".join(textwrap.wrap(title, 95)[:2])),
          path)


def predictions_figure(images: list[torch.Tensor], truth: list[str | None], predicted: list[str],
                       confidence: list[float], title: str, cols: int = 4) -> Figure:
    """The figure save_predictions writes."""
    if not len(images) == len(truth) == len(predicted) == len(confidence):
        raise ValueError("images, truth, predicted and confidence must have the same length")
    titles, colors = [], []
    for t, p, c in zip(truth, predicted, confidence):
        if t is None:
            titles.append(f"pred: {short(p)} ({c:.2f})")
            colors.append("black")
        else:
            titles.append(f"true: {short(t)}\npred: {short(p)} ({c:.2f})")
            colors.append("green" if t == p else "red")
    suptitle = "\n".join(textwrap.wrap(title, 95)[:3])
    return _grid(images, titles, colors, cols, suptitle)


def save_predictions(images: list[torch.Tensor], truth: list[str | None], predicted: list[str],
                     confidence: list[float], path, title: str) -> None:
    """Images in a grid of 4 columns, each titled "true: X / pred: Y (0.93)": green when right, red when
    wrong, black with only "pred: Y (0.93)" when the truth is unknown (None); `title` above them all."""
    _save(predictions_figure(images, truth, predicted, confidence, title), path)


def curves_figure(rows: list[dict], title: str = "") -> Figure:
    """The figure save_curves writes."""
    epochs = [r["epoch"] for r in rows]
    best = max(rows, key=lambda r: r["val_acc"]) if rows else None  # max() keeps the first of equals
    if not title:
        title = (f"{len(rows)} epoch{'s' if len(rows) > 1 else ''}; best val acc {best['val_acc']:.4f} "
                 f"at epoch {best['epoch']}" if best else "no epochs")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), dpi=DPI)
    for ax, name in zip(axes, ("loss", "acc")):
        for split, style in (("train", "o-"), ("val", "s-")):
            ax.plot(epochs, [r[f"{split}_{name}"] for r in rows], style, label=split, markersize=4)
        if best:
            ax.axvline(best["epoch"], color="gray", linestyle="--", linewidth=1, label=f"best epoch {best['epoch']}")
        ax.set_xlabel("epoch")
        if epochs:
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
    losses = [v for r in rows for v in (r["train_loss"], r["val_loss"]) if math.isfinite(v)]
    low, high = min(losses, default=0.0), max(losses, default=1.0)
    pad = (high - low) * 0.08 or 0.05 * high or 0.05  # the curves' own range: from 0 they would lie flat
    axes[0].set_ylim(max(0.0, low - pad), high + pad)
    axes[0].set_title("loss")
    axes[1].set_ylim(-0.02, 1.02)
    axes[1].set_title("accuracy")
    if best:  # its value in the legend, not on the curve it would cover
        axes[1].plot([best["epoch"]], [best["val_acc"]], "*", color="red", markersize=12, zorder=3, linestyle="none",
                     label=f"best val {best['val_acc']:.4f}")
    for ax in axes:
        ax.legend(loc="best", fontsize=9)
    fig.suptitle(short(title, 110), fontsize=12)
    fig.tight_layout(pad=0.5)
    return fig


def save_curves(rows: list[dict], path, title: str = "") -> None:
    """Loss (over its own range) and accuracy (0 to 1) per epoch, train against val, the best val epoch marked.

    rows: one dict per epoch with epoch, train_loss, val_loss, train_acc, val_acc. The title defaults
    to the number of epochs and the best val accuracy."""
    _save(curves_figure(rows, title), path)


def confusion_figure(matrix: torch.Tensor, classes: list[str],
                     title: str = "confusion matrix (best epoch)") -> Figure:
    """The figure save_confusion writes."""
    n = len(classes)
    if tuple(matrix.shape) != (n, n):
        raise ValueError(f"a confusion matrix for {n} classes must be {n}x{n}, not {tuple(matrix.shape)}")
    counts = matrix.detach().cpu().to(torch.float64)
    fraction = (counts / counts.sum(1, keepdim=True).clamp_min(1)).numpy()
    names = [short(c) for c in classes]
    longest = max((len(c) for c in names), default=1)
    if n <= SMALL:
        grid, font = min(9.0, max(2.4, 0.5 * n)), 10
    elif n <= MEDIUM:
        grid, font = min(9.0, 0.2 * n), 7
    else:
        grid, font = 9.0, 0
    text = longest * font * 0.6 / 72  # inches a tick label takes at most
    rotate = n > 3 or longest > 8
    left = 0.45 + text
    bottom = 0.45 + (0.72 * text if rotate else font / 72 + 0.1) if font else 0.45
    title = "\n".join(textwrap.wrap(title, 70)[:2])
    top = 0.38 + 0.22 * title.count("\n")
    width, height = left + grid + 1.15, bottom + grid + top  # 1.15: the colorbar and its labels
    fig = plt.figure(figsize=(width, height), dpi=DPI)
    ax = fig.add_axes((left / width, bottom / height, grid / width, grid / height))
    cax = fig.add_axes(((left + grid + 0.15) / width, bottom / height, 0.2 / width, grid / height))
    cell_px = grid * DPI / max(n, 1)
    image = ax.imshow(fraction, cmap="Blues", vmin=0, vmax=1, aspect="auto",
                      interpolation="nearest" if cell_px >= 2 else "antialiased")
    bar = fig.colorbar(image, cax=cax)
    bar.set_label("fraction of the true class", fontsize=9)
    bar.ax.tick_params(labelsize=8)
    if font:
        ax.set_xticks(range(n), names, rotation=45 if rotate else 0, ha="right" if rotate else "center",
                      fontsize=font, rotation_mode="anchor")
        ax.set_yticks(range(n), names, fontsize=font)
        ax.set_xlabel("predicted", fontsize=10)
        ax.set_ylabel("true", fontsize=10)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"predicted ({n} classes, in class order)", fontsize=10)
        ax.set_ylabel(f"true ({n} classes, in class order)", fontsize=10)
    if n <= SMALL:
        for t in range(n):
            for p in range(n):
                ax.text(p, t, f"{int(counts[t, p])}", ha="center", va="center", fontsize=font if n <= 12 else 8,
                        color="white" if fraction[t, p] > 0.5 else "black")
    fig.suptitle(title, fontsize=12, y=1 - 0.08 / height, va="top")
    return fig


def save_confusion(matrix: torch.Tensor, classes: list[str], path,
                   title: str = "confusion matrix (best epoch)") -> None:
    """Rows: true class, columns: predicted class; colour: the row-normalised fraction.

    Up to 20 classes the counts are written in the cells and the classes named on the axes; up to 60
    only named; beyond, neither (one image, no per-cell text: fast and small at thousands of classes).
    """
    _save(confusion_figure(matrix, classes, title), path)


def save_reliability(before: dict, after: dict, temperature: float, path) -> None:
    """--calibrate: accuracy against confidence per bin (tl.model.calibration.reliability), before and after
    temperature scaling, each bar labelled with its images; the diagonal is perfect calibration, bar widths
    are the bins."""
    _save(reliability_figure(before, after, temperature), path)


def reliability_figure(before: dict, after: dict, temperature: float) -> Figure:
    """The figure save_reliability writes."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.4), dpi=DPI, sharey=True)
    bins = len(before["counts"])
    edges = [i / bins for i in range(bins)]
    for ax, bars, name in ((axes[0], before, "before"), (axes[1], after, f"after (T = {temperature:.3g})")):
        shown = [c > 0 for c in bars["counts"]]
        drawn = ax.bar([e for e, s in zip(edges, shown) if s], [a for a, s in zip(bars["accuracy"], shown) if s],
                       width=1 / bins, align="edge", color="#4c72b0", edgecolor="white", label="accuracy")
        ax.bar_label(drawn, labels=[f"n={c}" for c in bars["counts"] if c > 0], fontsize=7, padding=1,
                     rotation=90 if bins > 10 else 0)  # how many images each bar stands for
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.15)  # room for the counts above a full bar
        ax.set_xlabel("confidence")
        ax.set_title(f"{name}: ECE {bars['ece']:.4f}", fontsize=11)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=9)
    fig.suptitle("reliability on val (best epoch)", fontsize=12)
    fig.tight_layout(pad=0.5)
    return fig


def save_lr_range(lrs: list[float], losses: list[float], window: tuple[int, int], steep: int, low: int, path,
                  title: str) -> None:
    """python -m tl.lr_find: smoothed loss against lr (log x): the points read in blue, the left-out ends in gray, the
    suggestion and the minimum marked."""
    first, last = window
    fig, ax = plt.subplots(figsize=(8, 5), dpi=DPI)
    ax.plot(lrs, losses, color="lightgray", linewidth=1.5, label="left out of the suggestion")
    ax.plot(lrs[first:last], losses[first:last], color="tab:blue", linewidth=1.5, label="smoothed training loss")
    i, j = steep, low
    ax.plot([lrs[i]], [losses[i]], "o", color="red", markersize=8, zorder=3,
            label=f"suggested --lr {lrs[i]:.1e} (steepest descent)")
    ax.plot([lrs[j]], [losses[j]], "v", color="black", markersize=7, zorder=3,
            label=f"minimum loss at {lrs[j]:.1e} (/10: {lrs[j] / 10:.1e})")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (the head's; log scale)")
    ax.set_ylabel("training loss (smoothed)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best", fontsize=9)
    ax.set_title(title, fontsize=11)
    fig.tight_layout(pad=0.5)
    _save(fig, path)


WORST_SHOWN, PAIRS_SHOWN = 20, 10  # errors_figure's bar charts: the worst classes, the most-confused pairs


def errors_figure(images: list[torch.Tensor], truth: list[str], predicted: list[str], confidence: list[float],
                  worst: list[tuple[str, float, int]], pairs: list[tuple[str, str, int]], title: str) -> Figure:
    """The figure save_errors writes: 1000 px wide; its charts as tall as their bars need (2 classes: a
    short figure, 20: at most 840 px), so no part of it stays empty."""
    worst, pairs = worst[:WORST_SHOWN], pairs[:PAIRS_SHOWN]
    if not len(images) == len(truth) == len(predicted) == len(confidence):
        raise ValueError("images, truth, predicted and confidence must have the same length")
    width, margin, gap = 12.5, 0.15, 0.1  # inches
    cols, rows, band = 8, 2, 0.42  # up to 16 images; a title band of two lines
    side = (width - 2 * margin - (cols - 1) * gap) / cols
    title = "\n".join(short(line, 130) for line in title.splitlines()[:2])
    head = 0.25 + 0.24 * (title.count("\n") + 1)
    bars = max(len(worst), len(pairs), 2)
    low, chart_h = 0.55, 0.45 + 0.22 * bars  # inches: below the charts (their axis labels), the charts
    height = head + rows * (band + side + gap) + 0.45 + chart_h + low
    fig = plt.figure(figsize=(width, height), dpi=DPI)
    fig.suptitle(title, fontsize=12, y=1 - 0.08 / height, va="top")
    for k, (img, t, p, c) in enumerate(list(zip(images, truth, predicted, confidence))[:cols * rows]):
        r, col = divmod(k, cols)
        left = margin + col * (side + gap)
        bottom = height - head - r * (band + side + gap) - band - side
        ax = fig.add_axes((left / width, bottom / height, side / width, side / height))
        ax.axis("off")
        ax.imshow(img.permute(1, 2, 0).numpy())
        _fit(fig, ax.set_title(f"true: {short(t, 15)}\npred: {short(p, 15)} ({c:.2f})", fontsize=8, linespacing=1.2,
                               pad=2, color="green" if t == p else "red"), side)
    if not images:
        fig.text(0.5, 1 - (head + band + side / 2) / height, "no images", ha="center", fontsize=12)
    names = [f"{short(n)} ({count})" for n, _, count in worst]
    ax = fig.add_axes((1.9 / width, low / height, 3.4 / width, chart_h / height))
    ax.barh(range(len(worst)), [a for _, a, _ in worst], color="#c44e52", height=0.7)
    ax.set_yticks(range(len(worst)), names, fontsize=8)
    ax.set_ylim(bars - 0.5, -0.5)  # worst at the top; the bars as thick as the other chart's
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy (recall)", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"the {len(worst)} worst classes (images)", fontsize=10)
    for i, (_, a, _) in enumerate(worst):
        ax.text(min(a + 0.02, 0.85), i, f"{a:.2f}", va="center", fontsize=7)
    ax = fig.add_axes((8.6 / width, low / height, 3.6 / width, chart_h / height))
    ax.barh(range(len(pairs)), [n for *_, n in pairs], color="#4c72b0", height=0.7)
    ax.set_yticks(range(len(pairs)), [f"{short(t)} \u2192 {short(p)}" for t, p, _ in pairs], fontsize=8)
    ax.set_ylim(bars - 0.5, -0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("images (true \u2192 predicted)", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"the {len(pairs)} most-confused pairs" if pairs else "no mistakes", fontsize=10)
    return fig


def save_errors(images: list[torch.Tensor], truth: list[str], predicted: list[str], confidence: list[float],
                worst: list[tuple[str, float, int]], pairs: list[tuple[str, str, int]], path, title: str) -> None:
    """python -m tl.report --errors: the highest-loss images (up to 16, titled true / predicted (its
    probability), red when wrong), the worst classes' accuracy (name, accuracy, images; worst first, up
    to 20) and the most-confused pairs (true, predicted, count; up to 10) as bars. Its size is fixed."""
    _save(errors_figure(images, truth, predicted, confidence, worst, pairs, title), path)
