"""Pictures a person looks at: val images titled with the model's predictions."""

import math

import matplotlib

matplotlib.use("Agg")  # files only, no display needed (clusters, CI)
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def save_predictions(images: list[torch.Tensor], titles: list[str], correct: list[bool], path,
                     cols: int = 4) -> None:
    """A grid of uint8 CHW images titled with their predictions, green when right, red when wrong
    (the tutorial's visualize_model)."""
    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title, ok in zip(axes.flat, images, titles, correct):
        ax.imshow(img.permute(1, 2, 0).numpy())
        ax.set_title(title, fontsize=10, color="green" if ok else "red")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
