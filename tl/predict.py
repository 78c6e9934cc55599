"""Classify images with a tl checkpoint (the tutorial's "inference on custom images").

    python -m tl.predict --checkpoint runs/X/best.safetensors IMAGE_OR_DIR... [--png out.png]

A feature-extract checkpoint holds only the head: the backbone is rebuilt from the base weights it
names (the torchvision weights, or the local file passed with --weights, checked by sha256).
--checkpoint may also be a model written by tl.export (ONNX or TorchScript), recognized by its content.
"""

import argparse
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from torchvision.datasets.folder import IMG_EXTENSIONS

from tl import checkpoint
from tl.checkpoint import Identity
from tl.data import TUTORIAL, ImageSet, Preprocess, Split, list_images, load_split
from tl.errors import UserError, run_cli
from tl.eval import evaluate
from tl.model import build_model, weights_id
from tl.pictures import pick_examples, save_predictions


def base_weights_arg(identity: Identity, weights: str | None) -> str:
    """The --weights value that rebuilds the checkpoint's base, checked against its identity."""
    base = identity.base_weights
    if weights is None:
        if base.startswith("sha256:"):
            used = f" ({identity.weights})" if identity.weights else ""
            raise UserError(f"this feature-extract checkpoint was trained on a local weights file{used}; pass "
                            "that file with --weights (its sha256 is checked)")
        if base.startswith("timm:"):  # timm's pretrained weights of the tag load_model puts in the model name
            return "DEFAULT"
        return "none" if base == "none" else base.rsplit(".", 1)[1]
    if weights_id(weights, identity.model) != base:
        used = f", the file {identity.weights}" if base.startswith("sha256:") and identity.weights else ""
        raise UserError(f"--weights {weights} is not the base this checkpoint was trained on ({base}{used}); "
                        "pass the same weights the run used")
    return weights


def load_model(path, weights: str | None = None) -> tuple[torch.nn.Module, dict]:
    """The trained classifier a checkpoint describes, in eval mode, on the CPU."""
    tensors, meta = checkpoint.load(path)
    identity = checkpoint.identity_of(path, meta)
    classes = identity.classes
    frozen = identity.mode == "feature-extract"
    set_seed(identity.seed)  # a random-init base is rebuilt from the run's seed
    base = base_weights_arg(identity, weights) if frozen else "none"
    if weights is not None and not frozen:
        weights_id(weights, identity.model)  # checked to exist, though a finetune checkpoint holds every weight
    # timm: the tag the run resolved (timm:ARCH.TAG), even if this timm's default tag for the name is another
    timm_tag = frozen and identity.base_weights.startswith("timm:")
    name = "timm/" + identity.base_weights.removeprefix("timm:") if timm_tag else identity.model
    model, head = build_model(name, base, len(classes), identity.mode)
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=not frozen)
    except RuntimeError as e:
        raise UserError(f"checkpoint {path} does not fit {meta['model']}: "
                        f"{str(e).splitlines()[1].strip()}") from None
    if unexpected or any(k.startswith(head + ".") for k in missing):
        raise UserError(f"checkpoint {path} does not hold the {head} head of {meta['model']}")
    return model.eval(), meta


def image_files(paths: list[str]) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMG_EXTENSIONS)
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{p} does not exist; pass image files or folders of images")
    if not files:
        raise UserError(f"no images ({', '.join(IMG_EXTENSIONS)}) in {' '.join(paths)}")
    return files


def read_images(paths: list[str], classes: list[str], pre: Preprocess) -> Split:
    """The images as tl evaluates them; the parent folder names the true class when it is one of
    `classes` (a val/ folder), else the label is -1."""
    files = image_files(paths)
    return load_split([(str(f), classes.index(f.parent.name) if f.parent.name in classes else -1)
                       for f in files], pre, False, False)


def probabilities(model, loader: DataLoader, mixed_precision: str = "no", cpu: bool = False,
                  pre: Preprocess = TUTORIAL) -> torch.Tensor:
    """A checkpoint's model over the loader's images, evaluated as a run does (under its mixed precision)."""
    accelerator = Accelerator(cpu=cpu or not torch.cuda.is_available(), mixed_precision=mixed_precision)
    model = accelerator.prepare(model.to(memory_format=torch.channels_last))
    return evaluate(model, loader, accelerator, len(loader.dataset), pre)


def val_images(data_dir: str, meta: dict) -> list[tuple[str, int]]:
    """The images a run on data_dir validated on: its val/ folder, or the part of train/ that the run's
    --val-split (recorded in the checkpoint) held out."""
    listing = list_images(Path(data_dir), warn=False, val_split=meta.get("recipe", {}).get("val_split", 0.0))
    if listing.classes != meta["classes"]:
        raise UserError(f"--val-of {data_dir} holds the classes {listing.classes}, the checkpoint {meta['classes']}; "
                        "pass the data set the run trained on")
    if meta.get("data") and listing.fingerprint != meta["data"]:
        warnings.warn(f"the files of {data_dir} differ from the run's: its val images may not be the run's",
                      stacklevel=2)
    return listing.val


def predict(checkpoint_path, paths: list[str], weights: str | None = None, png: str | None = None,
            batch_size: int | None = None, val_of: str | None = None) -> dict:
    """Print each image's class and probability; with labelled folders (class/img.jpg) the accuracy.
    The checkpoint may also be a model written by tl.export (ONNX or TorchScript). With val_of (a
    data dir) the images are the run's val images of it (val_images)."""
    if bool(paths) == bool(val_of):
        raise UserError("pass image files or folders, or --val-of DATA_DIR for a run's val images (one of them)")
    from tl.export import open_exported  # here: tl.export builds on this module

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
             else probabilities(model, loader, meta.get("mixed_precision", "no"), pre=pre))
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
    parser = argparse.ArgumentParser(prog="python -m tl.predict", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a run's best.safetensors, or a .onnx / "
                        ".torchscript.pt file written by python -m tl.export")
    parser.add_argument("--weights", help="the base weights file a feature-extract run used, when it "
                        "was a local file (torchvision weights are found by name)")
    parser.add_argument("--png", help="also write a picture of 16 of the images (across the classes, "
                        "mistakes included) titled with their predictions")
    parser.add_argument("--batch-size", type=int, help="default: the run's evaluation batch size")
    parser.add_argument("--val-of", metavar="DATA_DIR", help="instead of images: the run's val images of this data "
                        "set (its val/ folder, or what the run's --val-split held out of train/)")
    parser.add_argument("images", nargs="*", help="image files or folders (searched recursively)")
    args = parser.parse_args(argv)
    run_cli(lambda: predict(args.checkpoint, args.images, args.weights, args.png, args.batch_size, args.val_of))


if __name__ == "__main__":
    main()
