"""Classify images with a tl checkpoint (the tutorial's "inference on custom images").

    python -m tl.predict --checkpoint runs/X/best.safetensors IMAGE_OR_DIR... [--png out.png]

A feature-extract checkpoint holds only the head: the backbone is rebuilt from the base weights it
names (the torchvision weights, or the local file passed with --weights, checked by sha256).
--checkpoint may also be a model written by tl.export (ONNX or TorchScript), recognized by its content.
"""

import warnings

import torch
from torch.utils.data import DataLoader

from tl.cli import Parser, number
from tl.errors import UserError, run_cli
from tl.exported import open_exported
from tl.image_files import read_images, val_images
from tl.loaders import ImageSet
from tl.pictures import pick_examples, save_predictions
from tl.preprocess import Preprocess
from tl.splits import load_split
from tl.trained import load_model, probabilities


def predict(checkpoint_path, paths: list[str], weights: str | None = None, png: str | None = None,
            batch_size: int | None = None, val_of: str | None = None) -> dict:
    """Print each image's class and probability; with labelled folders (class/img.jpg) the accuracy.
    The checkpoint may also be a model written by tl.export (ONNX or TorchScript). With val_of (a
    data dir) the images are the run's val images of it (val_images)."""
    if bool(paths) == bool(val_of):
        raise UserError("pass image files or folders, or --val-of DATA_DIR for a run's val images (one of them)")
    exported = open_exported(checkpoint_path)
    if exported is not None and weights is not None:
        warnings.warn(f"--weights is not needed: {checkpoint_path} holds the whole model; ignoring it", stacklevel=1)
    model, meta = (exported, exported.meta) if exported is not None else load_model(checkpoint_path, weights)
    classes = meta["classes"]
    pre = Preprocess.from_meta(meta)
    split = (load_split(val_images(val_of, meta), pre, False, False) if val_of
             else read_images(paths, classes, pre))
    loader = DataLoader(ImageSet(split), batch_size=batch_size or meta.get("eval_batch_size", 32))
    probs = (exported.probabilities(loader) if exported is not None
             else probabilities(model, loader, meta))
    conf, preds = probs.max(1)
    for path, c, p in zip(split.paths, preds.tolist(), conf.tolist()):
        print(f"{path}\t{classes[c]}\t{p:.4f}")
    result = {"predictions": [classes[c] for c in preds.tolist()], "skipped": split.skipped}
    labels = torch.tensor(split.targets)
    if (labels >= 0).all():
        correct = int((preds == labels).sum())
        result["accuracy"] = correct / len(labels)
        print(f"accuracy {result['accuracy']:.4f} ({correct}/{len(labels)})")
    if png:  # a sample across the classes, mistakes included, not the first files in sorted order
        truth, predicted = labels.tolist(), preds.tolist()
        shown = pick_examples(truth, predicted, 16)
        title = (f"accuracy {result['accuracy']:.4f} ({correct}/{len(labels)}); " if "accuracy" in result else "") + \
            f"{len(shown)} of {len(truth)} images"
        save_predictions([split.images[i] for i in shown],
                         [classes[truth[i]] if truth[i] >= 0 else None for i in shown],
                         [classes[predicted[i]] for i in shown], [conf[i].item() for i in shown], png, title)
        print(f"wrote {png}")
    return result


def main(argv=None):
    parser = Parser(prog="python -m tl.predict", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a run's best.safetensors, or a .onnx / "
                        ".torchscript.pt file written by python -m tl.export")
    parser.add_argument("--weights", help="the base weights file a feature-extract run used, when it "
                        "was a local file (torchvision weights are found by name)")
    parser.add_argument("--png", help="also write a picture of 16 of the images (across the classes, "
                        "mistakes included) titled with their predictions")
    parser.add_argument("--batch-size", type=number(int, 1), help="default: the run's evaluation batch size")
    parser.add_argument("--val-of", metavar="DATA_DIR", help="instead of images: the run's val images of this data "
                        "set (its val/ folder, or what the run's --val-split held out of train/)")
    parser.add_argument("images", nargs="*", help="image files or folders (searched recursively)")

    def go():
        args = parser.parse_args(argv)
        return predict(args.checkpoint, args.images, args.weights, args.png, args.batch_size, args.val_of)

    run_cli(go)


if __name__ == "__main__":
    main()
