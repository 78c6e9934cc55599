"""Pictures a person looks at: image grids, learning curves, the confusion matrix."""

import math

import matplotlib

matplotlib.use("Agg")  # files only, no display needed (clusters, CI)
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def save_image_grid(images: list[torch.Tensor], titles: list[str], path, colors: list[str] | None = None,
                    cols: int = 4) -> None:
    """uint8 CHW images in a grid, each with a title (the tutorial's imshow and visualize_model)."""
    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, img, title) in enumerate(zip(axes.flat, images, titles)):
        ax.imshow(img.permute(1, 2, 0).numpy())
        ax.set_title(title, fontsize=10, color=colors[i] if colors else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_predictions(images, predicted: list[str], correct: list[bool], path) -> None:
    """Val images titled with their predicted class: green when right, red when wrong."""
    save_image_grid(images, [f"predicted: {p}" for p in predicted], path,
                    ["green" if ok else "red" for ok in correct])


def save_curves(rows: list[dict], path) -> None:
    """Loss and accuracy per epoch, train against val."""
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name in zip(axes, ("loss", "acc")):
        for split, style in (("train", "o-"), ("val", "s-")):
            ax.plot(epochs, [r[f"{split}_{name}"] for r in rows], style, label=split, markersize=4)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title("loss" if name == "loss" else "accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_confusion(matrix: torch.Tensor, classes: list[str], path) -> None:
    """Rows: true class, columns: predicted class, with the counts written in."""
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(4, 2 + 0.6 * n), max(3.5, 1.6 + 0.6 * n)))
    ax.imshow(matrix.numpy(), cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for t in range(n):
        for p in range(n):
            value = int(matrix[t, p])
            ax.text(p, t, value, ha="center", va="center",
                    color="white" if value > matrix.max() / 2 else "black")
    ax.set_title("confusion matrix (best epoch)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
